"""GGUF output: ggml-exact quantizers, the Qwen-Image type policy and the writer."""
