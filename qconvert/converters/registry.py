"""Every command that writes a file, by name: the CLI makes a command of each, recipes check their options
against them and releases run them.  Adding a converter is its module, one line here and its paragraph in
catalog.py (what `qconvert --help` lists without importing it)."""

from __future__ import annotations

from qconvert.converters import bake, calibrate, comfy, diffusers, fp8, gguf, svdquant
from qconvert.converters.base import Converter

CONVERTERS: dict[str, Converter] = {c.name: c for c in (
    gguf.CONVERTER, fp8.CONVERTER, comfy.CONVERTER, diffusers.CONVERTER, svdquant.CONVERTER, bake.CONVERTER,
    calibrate.CONVERTER)}
# What ``qconvert demo`` runs, in order: each module's demo_step(model, out, quiet, echo) -> written paths
DEMO_STEPS = (gguf.demo_step, fp8.demo_step, comfy.demo_step, diffusers.demo_step, svdquant.demo_step,
              bake.demo_step)
