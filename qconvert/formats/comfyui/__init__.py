"""ComfyUI safetensors: the FP8 layouts (``fp8.py``), the per-layer block formats (``writer.py``) and the
loader every ComfyUI-layout file is read through (``loader.py``)."""
