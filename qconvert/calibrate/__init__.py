"""Activation statistics from the reference sampler: importance matrices, absmax, sampled input rows.

``qconvert calibrate`` runs the sampler with a weight provider whose linears
record what they see: per input channel the mean of squares (the importance
matrix llama.cpp's quantizers weight their error by), the absolute maximum
(for FP8 input scales), and a bounded, seeded sample of input rows (for
SVDQuant's smoothing search).  ``to-gguf --imatrix`` reads the means back.
"""
