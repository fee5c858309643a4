"""Layer 3, file formats: plans with exact sizes, writers, strict readers, and one opener (``opener.py``)
that turns any qconvert output into a weight source for inspect, verify and bake-lora."""
