"""ComfyUI's per-layer formats, one module and one registry entry each (``registry.py``)."""
