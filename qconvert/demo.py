"""``qconvert demo``: every conversion on a tiny model, with how to load each file."""

from __future__ import annotations

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
    for step in _STEPS:
        written.extend(step(model, out, quiet, echo))
    echo(f"done: {len(written)} outputs under {out}/")
    return written


# Each converter registers a step here: (model, out, quiet, echo) -> written paths.
_STEPS: list[Callable] = []


def _bake_lora_step(model, out, quiet, echo):
    from .lora import demo_step

    return demo_step(model, out, quiet, echo)


_STEPS.append(_bake_lora_step)


def _fp8_step(model, out, quiet, echo):
    from .formats.fp8 import demo_step

    return demo_step(model, out, quiet, echo)


_STEPS.append(_fp8_step)
