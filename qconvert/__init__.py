"""qconvert: quantize the Qwen-Image family into files that load everywhere."""

__version__ = "0.1.0"
