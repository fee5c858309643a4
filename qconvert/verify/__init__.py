"""Running Qwen-Image: the reference transformer, weight providers (and, to come, sampler, metrics, reports)."""
