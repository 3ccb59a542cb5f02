"""Compression: quantization (quant/), unstructured and structured pruning, low-rank factorization,
over one calibration module (calibrate.py) that captures block inputs and per-linear statistics."""
