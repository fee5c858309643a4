"""Flow-matching Euler sampling, as diffusers' QwenImagePipeline runs it (spec fp8-lora-sampler.md §6).

Given prompt embeddings and noise in the packed latent layout
[B, (H/16)·(W/16), 64], ``sample`` returns the denoised packed latents.  The
schedules are the two that matter:

* ``qwen``: Qwen/Qwen-Image's scheduler config: sigmas ``linspace(1, 1/N, N)``
  shifted exponentially by mu, which grows linearly with the image token
  count (0.5 at 256 tokens, 0.9 at 8192), then stretched so the last is 0.02;
* ``lightning``: ModelTC's distillation config: the same with mu = ln 3 for
  every size (a static shift of 3) and no stretch.

The arithmetic follows diffusers' FlowMatchEulerDiscreteScheduler in its own
dtypes (float32 numpy, then torch), so the schedules are bit-identical.
True CFG combines the two predictions and rescales each token back to the
conditional prediction's norm.  Edit models append reference latents after
the noise; only the noise tokens are denoised, and mu counts them alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class Schedule:
    name: str
    base_shift: float
    max_shift: float
    shift_terminal: float | None
    base_seq_len: int = 256
    max_seq_len: int = 8192

    def mu(self, image_seq_len: int) -> float:
        m = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
        return image_seq_len * m + (self.base_shift - m * self.base_seq_len)


SCHEDULES = {
    "qwen": Schedule("qwen", base_shift=0.5, max_shift=0.9, shift_terminal=0.02),
    "lightning": Schedule("lightning", base_shift=math.log(3), max_shift=math.log(3), shift_terminal=None),
}


def sigmas(schedule: Schedule, steps: int, image_seq_len: int) -> torch.Tensor:
    """The ``steps + 1`` noise levels, from 1 down to 0 (float32)."""
    s = np.linspace(1.0, 1 / steps, steps).astype(np.float32)
    e = math.exp(schedule.mu(image_seq_len))
    s = e / (e + (1 / s - 1) ** 1.0)  # exponential time shift
    if schedule.shift_terminal:
        one_minus = 1 - s
        s = 1 - one_minus / (one_minus[-1] / (1 - schedule.shift_terminal))
    return torch.cat([torch.from_numpy(s).to(torch.float32), torch.zeros(1)])


def joint_text(parts: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(text [b, L, D], mask [b, L] or None), ...] as one batch: each padded at the end to the longest L, the
    padding masked out.  A masked key takes no part in attention, and every other layer acts per token, so
    each sample's image tokens come out as they would alone."""
    length = max(t.shape[1] for t, _ in parts)
    texts, masks = [], []
    for t, m in parts:
        m = torch.ones(t.shape[:2], dtype=torch.int64, device=t.device) if m is None else m
        pad = length - t.shape[1]
        texts.append(torch.nn.functional.pad(t, (0, 0, 0, pad)))
        masks.append(torch.nn.functional.pad(m, (0, pad)))
    return torch.cat(texts), torch.cat(masks)


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """True CFG with the per-token norm rescale of QwenImagePipeline (no clamp)."""
    comb = uncond + scale * (cond - uncond)
    return comb * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))


def sample(model, noise: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None, *, steps: int,
           schedule: str | Schedule = "qwen", cfg: float = 1.0, neg_text: torch.Tensor | None = None,
           neg_mask: torch.Tensor | None = None, img_shapes: list | None = None,
           image_latents: torch.Tensor | None = None,
           on_step: Callable[[int, int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Denoise ``noise`` with ``model`` (a ``QwenImageTransformer`` or anything called like it).

    ``img_shapes`` lists (1, h/16, w/16) for the target and each reference
    image; ``image_latents`` holds the references' packed latents (Edit).
    CFG runs when ``cfg > 1`` and negative embeddings are given.
    """
    sched = SCHEDULES[schedule] if isinstance(schedule, str) else schedule
    if img_shapes is None:
        raise ValueError("img_shapes is required: [(1, h/16, w/16), ...] for the target and any references")
    levels = sigmas(sched, steps, noise.shape[1])
    true_cfg = cfg > 1 and neg_text is not None
    if true_cfg:  # the conditional and unconditional runs as one batch: each block's weights read once a step
        text, text_mask = joint_text([(text, text_mask), (neg_text, neg_mask)])
    latents = noise
    for i in range(steps):
        x = latents if image_latents is None else torch.cat(
            [latents, image_latents.to(latents.dtype).expand(latents.shape[0], -1, -1)], dim=1)
        if true_cfg:
            x = torch.cat([x, x])
        t = (levels[i] * NUM_TRAIN_TIMESTEPS).expand(x.shape[0]).to(latents.dtype) / NUM_TRAIN_TIMESTEPS
        v = model(x, text, text_mask, t, img_shapes)[:, :latents.shape[1]]
        if true_cfg:
            v, v_neg = v.chunk(2)
            v = cfg_combine(v, v_neg, cfg)
        latents = (latents.to(torch.float32) + (levels[i + 1] - levels[i]) * v).to(v.dtype)
        if on_step is not None:
            on_step(i, steps, latents)
    return latents
