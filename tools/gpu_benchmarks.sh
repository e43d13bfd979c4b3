#!/usr/bin/env bash
# Every GPU measurement behind the README's Performance table, in one run:
#
#     bash tools/gpu_benchmarks.sh [OUT_DIR] [IMAGE]
#
# OUT_DIR (default ./gpu_bench) receives results.jsonl (one JSON object per benchmark, with
# its name and command) and log.txt (stderr of every run). IMAGE is the picture bench_infer.py
# resizes to 640x480 (default: the real WIDER val image of ../shared, else a synthetic scene).
# Each benchmark runs on its own under a time limit, so one failure does not stop the rest.
# Set PYTHON to choose the interpreter (default python3) and BENCH_LIMIT_S for the limit of
# one benchmark (default 150 s), BENCH_TOTAL_S for the whole run (default 480 s; benchmarks
# that would start later are recorded as skipped).
set -u
OUT_DIR=${1:-gpu_bench}
IMAGE=${2:-}
PY=${PYTHON:-python3}
LIMIT=${BENCH_LIMIT_S:-150}
TOTAL=${BENCH_TOTAL_S:-480}
DATA_DIR=${BENCH_DATA_DIR:-/tmp/s3fd_bench_wider}
mkdir -p "$OUT_DIR"
RESULTS="$OUT_DIR/results.jsonl"
LOG="$OUT_DIR/log.txt"
export PYTHONUNBUFFERED=1

bench() {
    local name=$1
    shift
    local start=$SECONDS out rc limit=$((TOTAL - SECONDS))
    [ "$limit" -gt "$LIMIT" ] && limit=$LIMIT
    if [ "$limit" -lt 20 ]; then
        echo "{\"name\": \"$name\", \"rc\": null, \"skipped\": \"BENCH_TOTAL_S reached\"}" >>"$RESULTS"
        echo "$name skipped: BENCH_TOTAL_S reached"
        return
    fi
    echo "== $name: $*" >>"$LOG"
    out=$(timeout "$limit" "$PY" "$@" 2>>"$LOG")
    rc=$?
    local line
    line=$(printf '%s\n' "$out" | tail -n 1)
    "$PY" - "$name" "$rc" "$((SECONDS - start))" "$*" "$line" >>"$RESULTS" <<'EOF'
import json, sys
name, rc, seconds, command, line = sys.argv[1:]
try:
    result = json.loads(line)
except ValueError:
    result = {'output': line[-300:]}
print(json.dumps({'name': name, 'rc': int(rc), 'seconds': int(seconds), 'command': command, 'result': result}))
EOF
    echo "$name rc=$rc $((SECONDS - start))s: $(printf '%s' "$line" | cut -c1-400)"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  "$PY" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__,
  "cuDNN", torch.backends.cudnn.version(), torch.cuda.get_device_name(0))'
  nproc; } 2>&1 | tee -a "$LOG"

T=tools/bench_train.py
I=tools/bench_infer.py
IMG=()
[ -n "$IMAGE" ] && IMG=(--image "$IMAGE")

# The CUDA paths against the CPU's, and no host synchronisation in the loss.
"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -n 15 | tee -a "$LOG"
bench layers_gpu tools/bench_layers.py --device cuda

# Training, data already on the GPU: the network, loss and update alone.
bench train_bf16_b16 $T --device gpu --batch_size 16 --amp native --amp_dtype bf16
bench train_bf16_b16_cl $T --device gpu --batch_size 16 --amp native --amp_dtype bf16 --channels_last
bench train_bf16_b16_cl_fused $T --device gpu --batch_size 16 --amp native --amp_dtype bf16 --channels_last --sgd fused
bench train_bf16_b32_cl $T --device gpu --batch_size 32 --amp native --amp_dtype bf16 --channels_last
bench train_fp32_b16 $T --device gpu --batch_size 16 --amp off
# The whole pipeline: DataLoader workers decoding and augmenting synthetic WIDER JPEGs. The
# timed steps far outnumber the batches the workers prefetch (16 x 4) during the warm-up.
bench train_loader_bf16_b16_cl_w16 $T --device gpu --batch_size 16 --amp native --amp_dtype bf16 --channels_last \
    --data loader --num_workers 16 --images 512 --data_dir "$DATA_DIR" --warmup 10 --steps 200
bench train_loader_bf16_b32_cl_w16 $T --device gpu --batch_size 32 --amp native --amp_dtype bf16 --channels_last \
    --data loader --num_workers 16 --images 512 --data_dir "$DATA_DIR" --warmup 10 --steps 100
# Inference at 640x480, post-processing to pixel boxes included.
bench infer_fp32 $I --device gpu "${IMG[@]}"
bench infer_bf16_cl $I --device gpu --amp bf16 --channels_last "${IMG[@]}"
# bf16 against float32 (TF32 off) from the same weights on the same batches.
bench precision_bf16 tools/check_precision.py --device gpu --amp_dtype bf16 --steps 20
# torch.compile last: its compilation is the slowest part.
bench train_bf16_b16_cl_compile $T --device gpu --batch_size 16 --amp native --amp_dtype bf16 --channels_last --compile
bench infer_bf16_cl_compile $I --device gpu --amp bf16 --channels_last --compile --batch_sizes 16 "${IMG[@]}"
