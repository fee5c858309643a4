"""Test weights shared by the ComfyUI format tests."""

from __future__ import annotations

import torch


def outlier_weight(rows=384, cols=1024, seed=0) -> torch.Tensor:
    """BF16-valued random weights with what quantizers stumble on: an outlier row, zero blocks, a lone outlier."""
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05
    w[3 % rows] *= 40
    w[7 % rows, :64] = 0
    w[9 % rows, 100 % cols] = 3.0
    return w.to(torch.bfloat16).float()
