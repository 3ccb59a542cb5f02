"""Training: the one loop (loop.py) and the thin recipes built on it (pretrain, ...)."""
