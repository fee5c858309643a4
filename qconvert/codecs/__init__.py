"""Layer 2, codecs: pure tensor <-> stored-tensor functions per format (GGUF types, ComfyUI's layer formats,
SVDQuant packing and quantizers).  No files, no model.  The three families know nothing of each other."""
