"""Weight quantization: int8/int4 round-to-nearest, GPTQ and AWQ, on PyTorch's packed CPU kernels."""
