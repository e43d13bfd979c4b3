from .npu_fused_sgd import NpuFusedSGD  # noqa: F401
