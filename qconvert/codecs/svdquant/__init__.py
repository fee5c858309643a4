"""SVDQuant's 4-bit quantizers, Nunchaku's packing and the smoothing/low-rank algorithm."""
