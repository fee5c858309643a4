"""Layer 5, converters: one function per output family, with a typed options object whose fields are also
its command-line options and recipe keys (``base.py``), all listed in ``registry.py``."""
