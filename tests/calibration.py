"""A calibration file for tests: qconvert calibrate's statistics of a test model."""

from __future__ import annotations


def make_calibration(model, out, *, size: int = 64, prompts: int = 2):
    """``qconvert calibrate``'s statistics of ``model``: ``prompts`` synthetic prompts, two steps at ``size``."""
    from qconvert.core.checkpoint import open_checkpoint
    from qconvert.running.calibrate import run_calibrate
    from qconvert.running.sample import SampleOptions

    with open_checkpoint(model) as src:
        run_calibrate(src, SampleOptions(height=size, width=size, steps=2, cfg=1.0), [], prompts, out,
                      echo=lambda _: None)
    return out
