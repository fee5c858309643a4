"""``qconvert demo``: every conversion on a tiny model, with how to load each file."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

from .inspection import inspect_path
from .tiny import make_tiny


def run_demo(out: Path, *, quiet: bool = False, echo: Callable[[str], None] = print) -> list[Path]:
    out = Path(out)
    written: list[Path] = []
    model = out / "tiny-qwen-image"
    make_tiny(model)
    written.append(model)
    s = inspect_path(model)
    echo(f"tiny model      {model}  ({s['tensors']} tensors, {s['parameters']:,} parameters, diffusers layout)")
    echo("                loads in diffusers: QwenImageTransformer2DModel.from_pretrained("
         f"'{model}', subfolder='transformer')")
    for module in _STEPS:
        written.extend(importlib.import_module(module).demo_step(model, out, quiet, echo))
    echo(f"done: {len(written)} outputs under {out}/")
    return written


# Each converter module offers demo_step(model, out, quiet, echo) -> written paths;
# they are imported only when the demo runs, to keep every command's start-up fast.
_STEPS = ("qconvert.formats.gguf.writer", "qconvert.formats.fp8", "qconvert.bake")
