"""slmkit: define, train, compress, evaluate, export and serve small language models on a CPU."""

__version__ = "0.1.0"
