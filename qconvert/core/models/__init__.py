"""The model map: what each Qwen-Image tensor is (config, roles, blocks, expected shapes)."""
