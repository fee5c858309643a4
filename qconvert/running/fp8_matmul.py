"""FP8 ``calibrated``: which layers run an FP8 matmul, decided by measuring it as the native runtime computes it.

A calibrated FP8 file gives each layer a static ``input_scale`` (margin ·
calibrated amax / 448).  On a GPU with FP8 matmuls ComfyUI then quantizes the
layer's input with that scale: inputs beyond ±448·scale saturate, and inputs
far below it fall under FP8's normal range and keep fewer bits.  Whether that
costs a layer too much is measured here, not guessed from the statistics, and
on prompts the calibration did not see (a static scale fitted to one set of
activations can saturate on another: issue 22 measured exactly that in ComfyUI):
the block measure of the size-budgeted mixes (``running.sensitivity``), run on
held-out seeded synthetic prompts: each layer alone gets its FP8 weight with a
full-precision input (what ``full_precision_matrix_mult`` runs) or with the
input quantized by its static scale (the FP8 matmul), and the error each
causes in the image stream after the following block, relative to the
full-precision block's, is averaged over the recorded steps and prompts.
Judging where the error reaches the image, not at the layer's own output,
keeps a layer whose FP8 matmul is loud but harmless (a text-side layer) and
catches one whose small error the network amplifies.

A layer keeps the FP8 matmul when its error is at most ``1 + tolerance``
times the full-precision matmul's: with a well-fitting scale the input's
rounding costs about what the weight's does (e4m3 both), so the default
tolerance of 2 passes those and keeps full precision where the static scale
saturates or starves the input.
"""

from __future__ import annotations

import time

import torch

from qconvert.codecs.comfyui.layouts.fp8 import FP8, FP8_E5M2
from qconvert.running.sensitivity import Candidates, block_sensitivity

DEFAULT_TOLERANCE = 2.0
LAYERS = {layer.fp8.name: layer for layer in (FP8, FP8_E5M2)}  # --dtype -> the layer format ComfyUI runs
HELD_OUT_SEEDS = (1000, 1001)  # calibrate's synthetic prompts are seeds --seed (default 0), --seed + 1, ...
FULL, MATMUL = "full_precision", "fp8_matmul"


def candidates(scales: dict, layer) -> Candidates:
    """The two ways a calibrated FP8 layer can run: the FP8 weight with a full-precision input, and the FP8
    matmul, its input quantized with the layer's static ``scales[module]`` as ComfyUI quantizes it."""
    def as_run(module: str, w: torch.Tensor, how: str):
        weight = layer.roundtrip(w)
        if how == FULL:
            return weight, None
        s = torch.tensor(scales[module], dtype=torch.float32)
        return weight, lambda x: layer.activations(x.float(), {}, s).to(x.dtype)
    return Candidates((FULL, MATMUL), lambda how, shape: how, as_run)


def matmul_errors(source, scales: dict, dtype: str = "e4m3fn", *, size: int = 256, steps: int = 2,
                  seeds=HELD_OUT_SEEDS, device: str = "cpu", echo=print) -> dict[str, dict[str, float]]:
    """{layer: {"full_precision": e, "fp8_matmul": e}}: the block measure of each layer run both ways (its static
    scale from ``scales``: {layer: input_scale}), averaged over the held-out seeds' prompts, run as one batch."""
    scales = {m: s for m, s in scales.items() if s is not None}
    layers = sorted(scales)
    echo(f"  measuring {len(layers)} layers' FP8 matmul by the block measure on {len(seeds)} {steps}-step "
         f"{size}x{size} reference runs (held-out prompts, seeds {', '.join(map(str, seeds))}), as the native "
         "runtime computes it")
    start = time.monotonic()
    found = block_sensitivity(source, layers, size=size, steps=steps, seeds=tuple(seeds), device=device, echo=echo,
                              candidates=candidates(scales, LAYERS[dtype]))
    echo(f"  measured in {time.monotonic() - start:.1f} s")
    return found


def full_precision_layers(errors: dict, tolerance: float = DEFAULT_TOLERANCE) -> set[str]:
    """The layers whose FP8 matmul errs more than ``1 + tolerance`` times their full-precision matmul."""
    return {m for m, e in errors.items() if e[MATMUL] > (1 + tolerance) * e[FULL]}
