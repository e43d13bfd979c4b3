"""What the benchmark scripts share: the options of a training-step benchmark and the peak
figures of known GPUs (for the fraction of the peak a run reaches)."""


# Per GPU: dense tensor-core peaks in TFLOP/s (no sparsity) for bf16/fp16 and fp32 (TF32 where
# used), and HBM bandwidth in TB/s. Looked up by substring of the device name, in this order
# ('H100 PCIe' before 'H100').
DEVICE_SPECS = {
    'H100 PCIe': {'bf16': 756.0, 'fp16': 756.0, 'fp32': 378.0, 'hbm_tbs': 2.0},
    'H100': {'bf16': 989.0, 'fp16': 989.0, 'fp32': 494.5, 'hbm_tbs': 3.35},
    'H200': {'bf16': 989.0, 'fp16': 989.0, 'fp32': 494.5, 'hbm_tbs': 4.8},
    'A100': {'bf16': 312.0, 'fp16': 312.0, 'fp32': 156.0, 'hbm_tbs': 2.0},
    'L40S': {'bf16': 362.0, 'fp16': 362.0, 'fp32': 183.0, 'hbm_tbs': 0.86},
    'V100': {'bf16': None, 'fp16': 125.0, 'fp32': 15.7, 'hbm_tbs': 0.9},
}


def device_spec(device_name):
    """DEVICE_SPECS' entry for a device name (e.g. 'NVIDIA H100 80GB HBM3'), None if unknown."""
    return next((spec for key, spec in DEVICE_SPECS.items() if key in device_name), None)


def add_step_arguments(parser, batch_size=16, amp_choices=('native', 'off'), amp_default='native'):
    """The options every training-step tool shares: --device, --device_id, --batch_size,
    --input_size, --amp (when amp_choices is not empty) and --amp_dtype."""
    parser.add_argument('--device', default='gpu', choices=['gpu', 'npu', 'cpu'])
    parser.add_argument('--device_id', default=0, type=int)
    parser.add_argument('--batch_size', default=batch_size, type=int)
    parser.add_argument('--input_size', default=640, type=int)
    if amp_choices:
        parser.add_argument('--amp', default=amp_default, choices=list(amp_choices))
    parser.add_argument('--amp_dtype', default='bf16', choices=['bf16', 'fp16'])
