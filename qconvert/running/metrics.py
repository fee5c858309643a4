"""The figures a quality report gives: weight error per layer, and image-space agreement of latents.

Conventions (spec fp8-lora-sampler.md §10): errors are measured against the
reference (the BF16 source, through the same LoRAs), never the other way
round; PSNR uses the reference's value range; SSIM is the usual 11x11
Gaussian window (sigma 1.5) per latent channel, averaged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rel_rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    """‖x − ref‖ / ‖ref‖ (0 for identical; 1 for an all-zero x)."""
    x, ref = x.double(), ref.double()
    denom = float(ref.norm())
    return float((x - ref).norm()) / denom if denom else float((x - ref).norm() != 0)


def cosine(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double().flatten(), ref.double().flatten()
    denom = float(x.norm() * ref.norm())
    return float(x @ ref) / denom if denom else float(torch.equal(x, ref))


def psnr(x: torch.Tensor, ref: torch.Tensor, peak: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB; inf when identical.  ``peak``: the signal's full range
    (1 for pixels in [0, 1]); by default the reference's value range (latents have no fixed range)."""
    x, ref = x.double(), ref.double()
    mse = float(((x - ref) ** 2).mean())
    peak = float(ref.max() - ref.min()) if peak is None else peak
    if mse == 0:
        return math.inf
    return 10 * math.log10(peak * peak / mse) if peak else -math.inf


def _gaussian(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - size // 2) ** 2) / (2 * sigma * sigma))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float | None = None) -> float:
    """Mean SSIM of [C, H, W] images (per channel, 11x11 Gaussian window, reflect padding);
    ``data_range`` as ``psnr``'s peak."""
    x, ref = x.double().unsqueeze(1), ref.double().unsqueeze(1)  # channels as a batch
    data_range = (float(ref.max() - ref.min()) or 1.0) if data_range is None else data_range
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    size = min(11, x.shape[-1], x.shape[-2])
    size -= 1 - size % 2  # odd
    window = _gaussian(size).to(x)[None, None]

    def blur(t: torch.Tensor) -> torch.Tensor:
        pad = size // 2
        return F.conv2d(F.pad(t, (pad, pad, pad, pad), mode="reflect") if pad else t, window)

    mu_x, mu_r = blur(x), blur(ref)
    var_x = blur(x * x) - mu_x ** 2
    var_r = blur(ref * ref) - mu_r ** 2
    cov = blur(x * ref) - mu_x * mu_r
    s = ((2 * mu_x * mu_r + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_r ** 2 + c1) * (var_x + var_r + c2))
    return float(s.mean())


def unpack(latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Packed [1, (H/16)·(W/16), 64] tokens -> [16, H/8, W/8] latent channels (the pipeline's unpack)."""
    h, w = height // 16, width // 16
    x = latents.reshape(h, w, 16, 2, 2).permute(2, 0, 3, 1, 4)
    return x.reshape(16, 2 * h, 2 * w)
