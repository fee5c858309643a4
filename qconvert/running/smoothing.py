"""AWQ-style smoothing for ComfyUI's NVFP4 layers (``pre_quant_scale``), chosen per layer by measured error.

ComfyUI multiplies a smoothed layer's input by ``pre_quant_scale`` (per input channel) before it quantizes
it, and the file stores the weight divided by the same factor (``codecs.comfyui.base.smoothed``).  A large
factor on a channel whose activations are small and whose weights are large moves quantization error from
the weight to the activations; which trade wins depends on the layer, so each layer tries the candidates of
SVDQuant's smoothing search (DeepCompressor's grid: ``s = xmax^a / wmax^b``, here ``pre_quant_scale = 1/s``,
the plain layer among them) and keeps the one whose output, computed as the runtime computes it, is closest
to the full-precision layer's on the calibration's input rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qconvert.codecs.comfyui import registry
from qconvert.codecs.comfyui.base import smoothed
from qconvert.codecs.svdquant.algorithm import candidates, output_error, smooth_scale

DEFAULT_GRID = 10  # 19 candidates a layer (SVDQuant's default grid of 20 tries 39)


@dataclass
class Smoothing:
    pre_quant_scale: torch.Tensor  # BF16 [in]: what the file stores (ones: the plain layer won)
    alpha: float
    beta: float
    error: float  # relative output error on the calibration rows, smoothed
    plain_error: float  # the same without smoothing


def pre_quant_scale(xmax: torch.Tensor, wmax: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """ComfyUI's factor for SVDQuant's ``s = xmax^alpha / wmax^beta``: ``1/s``, in BF16 (as stored: the weight
    is divided by the rounded value, so the runtime's product undoes it exactly)."""
    return (1.0 / smooth_scale(xmax, wmax, alpha, beta).double()).to(torch.bfloat16)


def layer_output(w: torch.Tensor, b: torch.Tensor | None, rows: torch.Tensor, fmt: str, runtime: str,
                 factor: torch.Tensor | None) -> torch.Tensor:
    """The layer's output on ``rows`` as ComfyUI computes it from a file storing ``w`` smoothed by ``factor``
    in format ``fmt``, under ``runtime`` (``registry.as_run``)."""
    f = None if factor is None else factor.float()
    weight, inputs = registry.as_run(w.float() if f is None else smoothed(w, f), fmt, runtime)
    x = rows if f is None else rows * f
    y = (x if inputs is None else inputs(x)) @ weight.T
    return y if b is None else y + b.float()


def search(w: torch.Tensor, b: torch.Tensor | None, rows: torch.Tensor, xmax: torch.Tensor, *, fmt: str = "nvfp4",
           runtime: str = "native", grid: int = DEFAULT_GRID) -> Smoothing:
    """The candidate whose output on ``rows`` has the least error against ``rows @ w.T + b``; a tie keeps the
    earlier candidate, the plain layer first, so a layer smoothing cannot help is stored unsmoothed (factor 1)."""
    w, rows = w.float(), rows.float()
    ref = rows @ w.T + (0 if b is None else b.float())
    wmax = w.abs().amax(0)
    best = None
    for alpha, beta in candidates(grid):
        factor = pre_quant_scale(xmax, wmax, alpha, beta)  # (0, 0): ones, the plain layer
        err = output_error(layer_output(w, b, rows, fmt, runtime, factor), ref)
        if best is None:
            plain = err
        if best is None or err < best[0]:
            best = (err, alpha, beta, factor)
    return Smoothing(best[3], best[1], best[2], best[0], plain)


class LayerSmoother:
    """``writer(layer, weight) -> pre_quant_scale``: each layer's search on its calibration rows, read from the
    calibration file one layer at a time (``formats.calibration.StatsFile``; every layer's records are checked
    when it opens, so a file of another model fails before anything is written).  ``chosen`` keeps what each
    layer found, for the report."""

    def __init__(self, calib, source, layers: list[str], *, runtime: str = "native", grid: int = DEFAULT_GRID,
                 device: str | torch.device = "cpu"):
        from qconvert.formats.calibration import StatsFile

        self.stats = StatsFile(calib, source, layers)
        self.source, self.layers, self.runtime, self.grid = source, layers, runtime, grid
        self.device = torch.device(device)
        self.chosen: dict[str, Smoothing] = {}

    def __call__(self, layer: str, w: torch.Tensor) -> torch.Tensor:
        found = self.chosen.get(layer)
        if found is None:
            stat = self.stats.read(layer)
            b = self.source.load(f"{layer}.bias") if f"{layer}.bias" in self.source.tensors else None
            found = search(w.to(self.device), None if b is None else b.to(self.device), stat.rows.to(self.device),
                           stat.absmax.to(self.device), runtime=self.runtime, grid=self.grid)
            found.pre_quant_scale = found.pre_quant_scale.cpu()
            self.chosen[layer] = found
        return found.pre_quant_scale

    def estimate_seconds(self) -> float:
        """The whole search's time, from the first layer's (searched now, and kept), scaled by weight size."""
        import time

        first = self.layers[0]
        start = time.perf_counter()
        self(first, self.source.load(f"{first}.weight"))
        took = time.perf_counter() - start
        sizes = {m: self.source.tensors[f"{m}.weight"].numel for m in self.layers}
        return took * sum(sizes.values()) / max(sizes[first], 1)

    def summary(self) -> dict:
        """How many layers smoothing changed, and the mean output error with and without it."""
        found = list(self.chosen.values())
        n = max(len(found), 1)
        return {"layers": len(found), "smoothed": sum(1 for c in found if c.alpha or c.beta),
                "mean_error": sum(c.error for c in found) / n,
                "mean_plain_error": sum(c.plain_error for c in found) / n, "runtime": self.runtime, "grid": self.grid}

    def close(self) -> None:
        self.stats.close()
