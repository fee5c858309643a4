"""FP8 ``calibrated``: which layers run an FP8 matmul, decided by measuring it as the native runtime computes it.

A calibrated FP8 file gives each layer a static ``input_scale`` (margin ·
calibrated amax / 448).  On a GPU with FP8 matmuls ComfyUI then quantizes the
layer's input with that scale: inputs beyond ±448·scale saturate, and inputs
far below it fall under FP8's normal range and keep fewer bits.  Whether that
costs a layer too much is measured here, not guessed from the statistics, and
on prompts the calibration did not see (a static scale fitted to one set of
activations can saturate on another: issue 22 measured exactly that in ComfyUI):
a short reference run over held-out seeded synthetic prompts (Lightning
schedule, one block in memory at a time) computes, at every call of every quantized layer and on
its real input, the layer's output three ways: in full precision (the
reference), with the FP8 weight and a full-precision input (what
``full_precision_matrix_mult`` runs), and with the FP8 weight and the input
quantized with the static scale (the FP8 matmul).  Each layer's two error
energies, relative to its output's, are summed over the run.

A layer keeps the FP8 matmul when its error is at most ``1 + tolerance``
times the full-precision matmul's: with a well-fitting scale the input's
rounding costs about what the weight's does (e4m3 both), so the default
tolerance of 2 passes those and keeps full precision where the static scale
saturates or starves the input.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from qconvert.codecs.comfyui.layouts.fp8 import FP8, FP8_E5M2
from qconvert.running import inputs, sampler
from qconvert.running.model import QwenImageTransformer
from qconvert.running.providers import DenseProvider

DEFAULT_TOLERANCE = 2.0
LAYERS = {layer.fp8.name: layer for layer in (FP8, FP8_E5M2)}  # --dtype -> the layer format ComfyUI runs


class _Measuring(DenseProvider):
    """Dense weights; the layers with a static input scale also measure their two FP8 variants."""

    def __init__(self, source, scales: dict, layer, **kwargs):
        super().__init__(source, **kwargs)
        self.scales, self.layer = scales, layer
        self.sums = {m: [0.0, 0.0, 0.0] for m in scales}  # reference energy, full-precision error, FP8 matmul's

    def linear(self, module: str):
        run = super().linear(module)
        scale = self.scales.get(module)
        if scale is None:
            return run
        weight, bias = self.tensor(f"{module}.weight"), self.tensor(f"{module}.bias")
        w_fp8 = self.layer.roundtrip(weight)
        s = torch.tensor(scale, dtype=torch.float32)
        sums = self.sums[module]

        def measured(x: torch.Tensor) -> torch.Tensor:
            y = run(x)
            x_fp8 = self.layer.activations(x.float(), {}, s)  # as ComfyUI's FP8 matmul quantizes its input
            ref = y.double()
            sums[0] += float(ref.pow(2).sum())
            sums[1] += float((F.linear(x.float(), w_fp8, bias).double() - ref).pow(2).sum())
            sums[2] += float((F.linear(x_fp8, w_fp8, bias).double() - ref).pow(2).sum())
            return y
        return measured


HELD_OUT_SEEDS = (1000, 1001)  # calibrate's synthetic prompts are seeds --seed (default 0), --seed + 1, ...


def matmul_errors(source, scales: dict, dtype: str = "e4m3fn", *, size: int = 256, steps: int = 2,
                  seeds=HELD_OUT_SEEDS, device: str = "cpu", echo=print) -> dict[str, dict[str, float]]:
    """{layer: {"full_precision": e, "fp8_matmul": e}}: each layer's output error energy relative to its
    output's, over a short reference run, with the FP8 weight and a full-precision input, and with the input
    quantized by the layer's static scale (``scales``: {layer: input_scale}); one run per prompt seed."""
    config = source.config
    provider = _Measuring(source, {m: s for m, s in scales.items() if s is not None}, LAYERS[dtype],
                          device=torch.device(device))
    model = QwenImageTransformer(config, provider)
    echo(f"  measuring {len(provider.scales)} layers' FP8 matmul on {len(seeds)} {steps}-step {size}x{size} reference "
         f"runs (held-out prompts, seeds {', '.join(map(str, seeds))}), as the native runtime computes it")
    start = time.monotonic()
    for seed in seeds:
        prompt = inputs.synthetic_prompt(config, seed).to(torch.device(device), torch.float32)
        noise = inputs.seeded_noise(seed, size, size).to(device)
        with torch.no_grad():
            sampler.sample(model, noise, prompt.embeds, prompt.mask, steps=steps, schedule="lightning",
                           img_shapes=[(1, size // 16, size // 16)])
    echo(f"  measured in {time.monotonic() - start:.1f} s")
    return {m: {"full_precision": full / ref if ref else 0.0, "fp8_matmul": fp8 / ref if ref else 0.0}
            for m, (ref, full, fp8) in provider.sums.items()}


def full_precision_layers(errors: dict, tolerance: float = DEFAULT_TOLERANCE) -> set[str]:
    """The layers whose FP8 matmul errs more than ``1 + tolerance`` times their full-precision matmul."""
    return {m for m, e in errors.items() if e["fp8_matmul"] > (1 + tolerance) * e["full_precision"]}
