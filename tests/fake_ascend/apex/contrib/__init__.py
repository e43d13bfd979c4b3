from . import combine_tensors  # noqa: F401
