"""GGUF's block types, byte-identical to ggml's quantizers (``quants.py``; CPU kernels in ``_cpu*``)."""
