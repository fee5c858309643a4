"""ComfyUI's layer formats, one module each (a ``LayerFormat`` and its tensor math), independent of each other;
``..registry`` lists them."""
