"""Layer 4, model-running: the reference transformer, weight providers, the sampler, calibrate, verify,
the mix's sensitivity and choice, and the SVDQuant search."""
