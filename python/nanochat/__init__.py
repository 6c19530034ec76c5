"""nanochat-ternary: train ternary-weight GPTs with QAT, export to GGUF, serve on CPUs."""

__version__ = "0.1.0"
