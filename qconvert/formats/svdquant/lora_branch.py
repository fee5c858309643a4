"""A LoRA joined to an SVDQuant layer's low-rank branch (spec svdquant.md §6.1): the factors, the file's
global rank, appending and exact recompression.  Pure tensor math over a LoRA view."""

from __future__ import annotations

import torch

from qconvert.core.errors import QConvertError
from qconvert.formats.svdquant import layout

MAX_RANK = 1024


def lora_factors(view, module: str, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(A scaled by strength·alpha/rank [r, in], B [out, r])] of every LoRA on ``module``'s weight."""
    out = []
    for lora, patch in view.patches_for(f"{module}.weight"):
        if not patch.is_low_rank:
            raise QConvertError(f"{lora.path}: a full-difference key for {module}; only low-rank LoRA pairs can "
                                "join the low-rank branch (use --lora-mode bake)")
        up, down = (lora.tensor(k).to(device, torch.float32) for k in patch.keys)
        out.append((down * (lora.strength * patch.scale), up))
    return out


def lora_rank(view, module: str) -> int:
    return sum(p.rank for _, p in view.patches_for(f"{module}.weight"))


def total_rank(view, base: int, layers: int) -> int:
    """The file's global rank: the base plus the largest LoRA rank any stored module takes, rounded to 16."""
    extra = 0
    for i in range(layers):
        for group in layout.GROUPS:
            if group.kind == "svdq":
                extra = max(extra, sum(lora_rank(view, f"transformer_blocks.{i}.{s}") for s in group.sources))
    rank = base + -(-extra // 16) * 16
    if rank > MAX_RANK:
        raise QConvertError(f"rank {base} + LoRA rank {extra} = {rank}: above Nunchaku's limit of {MAX_RANK}; "
                            "use --lora-mode bake")
    return rank


def append(down: torch.Tensor, up: torch.Tensor, parts: list[list[tuple]], row_sizes: list[int],
           rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[down; A's] and [up, block-diagonal B's], zero-padded to ``rank`` (float32).

    ``parts[i]`` holds the (A, B) pairs of the i-th part of the output rows.
    """
    downs, ups = [down.float()], [up.float()]
    start = 0
    for pairs, rows in zip(parts, row_sizes):
        for a, b in pairs:
            downs.append(a.to(down.device))
            column = torch.zeros(up.shape[0], b.shape[1], device=up.device)
            column[start:start + rows] = b.to(up.device)
            ups.append(column)
        start += rows
    d, u = torch.cat(downs), torch.cat(ups, dim=1)
    if d.shape[0] > rank:
        raise QConvertError(f"a low-rank branch of rank {d.shape[0]} does not fit rank {rank}")
    pad = rank - d.shape[0]
    return (torch.cat([d, d.new_zeros(pad, d.shape[1])]), torch.cat([u, u.new_zeros(u.shape[0], pad)], dim=1))


def recompress(down: torch.Tensor, up: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` approximation of ``up·down`` (exact: QR of each factor, SVD of the small core)."""
    qu, ru = torch.linalg.qr(up.double())
    qd, rd = torch.linalg.qr(down.double().T)
    u, sv, vh = torch.linalg.svd(ru @ rd.T)
    k = min(rank, sv.shape[0])
    new_up = (qu @ u[:, :k]) * sv[:k]
    new_down = vh[:k] @ qd.T
    if k < rank:
        new_up = torch.cat([new_up, new_up.new_zeros(new_up.shape[0], rank - k)], dim=1)
        new_down = torch.cat([new_down, new_down.new_zeros(rank - k, new_down.shape[1])])
    return new_down.float(), new_up.float()
