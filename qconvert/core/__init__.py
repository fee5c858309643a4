"""Layer 1, basics: errors, hostile-input helpers, atomic outputs, checkpoints (sources), the LoRA view over a
source, test models and the Qwen-Image model map (``models/``).  Imports nothing else of qconvert."""
