"""Nunchaku's tensor layouts: how its W4A4 and AWQ kernels read each tensor, and the inverses.

Every packer maps a *logical* tensor (codes [out, in], scales [out, groups],
a per-channel vector, a low-rank factor) to the stored one; every unpacker
maps it back exactly, so round trips are tested without a GPU.  The layouts
follow the MMA fragments of Nunchaku's kernels for ``warp_n = 128`` (spec
svdquant.md §4): tiles of 128 output channels, 64-wide k-steps, 32 lanes.
Shapes stored in the file are nominal (``[N, K/2]``, ``[G, N]``): a packed
tensor must never be sliced by rows.
"""

from __future__ import annotations

import torch

TILE_N = 128  # warp_n: output channels per tile
TILE_K = 64  # insn_k: input channels per MMA k-step


def _inverse(perm: tuple) -> tuple:
    out = [0] * len(perm)
    for i, p in enumerate(perm):
        out[p] = i
    return tuple(out)


def _check(n: int, k: int, what: str) -> None:
    if n % TILE_N or k % TILE_N:
        raise ValueError(f"{what}: [{n}, {k}] must be multiples of 128 on both sides (Nunchaku's tiles)")


# ------------------------------------------------------------ 4-bit codes

# n = t·128 + P·16 + s·8 + l ; k = T·64 + s'·32 + L·8 + e  →  (t, T, 1, P, l, L, s, s', 1, e)
_W_SPLIT = (8, 2, 8, 1)  # P, s, l, 1 (after t)
_K_SPLIT = (1, 2, 4, 8)  # 1, s', L, e (after T)
_W_PERM = (0, 5, 6, 1, 3, 8, 2, 7, 4, 9)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] 4-bit codes (INT4 −8..7 or E2M1 indices 0..15) -> ``qweight`` int8 [N, K/2]."""
    n, k = codes.shape
    _check(n, k, "qweight")
    nib = (codes.to(torch.int16) & 0xF).to(torch.uint8)
    nib = nib.reshape(n // TILE_N, *_W_SPLIT, k // TILE_K, *_K_SPLIT).permute(_W_PERM).contiguous()
    # eight nibbles per 32-bit word, e = 0 in bits 0..3: byte b holds e = 2b (low) and 2b + 1 (high)
    nib = nib.reshape(-1, 8)
    packed = nib[:, 0::2] | (nib[:, 1::2] << 4)
    return packed.view(torch.int8).reshape(n, k // 2)


def unpack_codes(qweight: torch.Tensor, *, signed: bool) -> torch.Tensor:
    """``qweight`` int8 [N, K/2] -> [N, K] codes (−8..7 when ``signed``, else 0..15), int8."""
    n, half = qweight.shape
    k = half * 2
    _check(n, k, "qweight")
    b = qweight.contiguous().view(torch.uint8).reshape(-1, 4)
    nib = torch.stack([b & 0xF, b >> 4], dim=-1).reshape(-1, 8)
    shape = [n // TILE_N, k // TILE_K, 1, 8, 8, 4, 2, 2, 1, 8]  # (t, T, 1, P, l, L, s, s', 1, e)
    codes = nib.reshape(shape).permute(_inverse(_W_PERM)).reshape(n, k).to(torch.int8)
    if signed:
        codes = torch.where(codes >= 8, codes - 16, codes)
    return codes


# ------------------------------------------- INT4 group scales (and vectors)

# n = t·128 + a·16 + b·8 + c·2 + d  →  (t, g, 1, a, c, b, d)
_S_PERM = (0, 6, 1, 2, 4, 3, 5)


def pack_scales(scales: torch.Tensor) -> torch.Tensor:
    """[N, G] per-group scales (BF16) -> ``wscales`` [G, N] in the lanes' order."""
    n, g = scales.shape
    if n % TILE_N:
        raise ValueError(f"wscales: {n} output channels must be a multiple of 128")
    s = scales.reshape(n // TILE_N, 1, 8, 2, 4, 2, g).permute(_S_PERM).contiguous()
    return s.reshape(g, n)


def unpack_scales(wscales: torch.Tensor) -> torch.Tensor:
    g, n = wscales.shape
    s = wscales.contiguous().reshape(n // TILE_N, g, 1, 8, 4, 2, 2).permute(_inverse(_S_PERM))
    return s.reshape(n, g)


def pack_vector(v: torch.Tensor) -> torch.Tensor:
    """A per-channel vector (bias, smooth factor, wcscales): within every 16 channels the order
    0 1 8 9 2 3 10 11 4 5 12 13 6 7 14 15, as the kernels' ``load_wscale`` reads it."""
    return pack_scales(v.reshape(-1, 1)).reshape(-1)


def unpack_vector(v: torch.Tensor) -> torch.Tensor:
    return unpack_scales(v.reshape(1, -1)).reshape(-1)


# ------------------------------------------------- NVFP4 micro-scales (FP8)

# n = t·128 + p·32 + q·8 + r ; g = G4·4 + h  →  (t, G4, 1, r, q, p, h)
_M_PERM = (0, 5, 1, 4, 3, 2, 6)


def pack_micro_scales(scales: torch.Tensor) -> torch.Tensor:
    """[N, G] FP8 E4M3 scales of 16-element groups -> ``wscales`` [G, N] (four groups per lane word)."""
    n, g = scales.shape
    if n % TILE_N or g % 4:
        raise ValueError(f"wscales: [{n}, {g}] needs N a multiple of 128 and G of 4")
    s = scales.view(torch.uint8).reshape(n // TILE_N, 1, 4, 4, 8, g // 4, 4).permute(_M_PERM).contiguous()
    return s.reshape(g, n).view(torch.float8_e4m3fn)


def unpack_micro_scales(wscales: torch.Tensor) -> torch.Tensor:
    g, n = wscales.shape
    s = wscales.contiguous().view(torch.uint8).reshape(n // TILE_N, g // 4, 1, 8, 4, 4, 4)
    return s.permute(_inverse(_M_PERM)).reshape(n, g).view(torch.float8_e4m3fn)


# ----------------------------------------------- low-rank factors (16x16)

# inside a 16x16 fragment: n = np·8 + nl, k = kp·8 + kl·2 + e  →  (nl, kl, np, kp, e)
_L_PERM = (0, 1, 3, 6, 2, 5, 4, 7)


def _fragments(x: torch.Tensor, down: bool) -> tuple:
    if down:  # logical [rank, in]: fragments (in/16, rank/16), n = rank, k = in
        r, c = x.shape
        return x.reshape(r // 16, 16, c // 16, 16).permute(2, 0, 1, 3), (c, r)
    c, r = x.shape  # up: logical [out, rank]: fragments (out/16, rank/16), n = out, k = rank
    return x.reshape(c // 16, 16, r // 16, 16).permute(0, 2, 1, 3), (c, r)


def pack_lowrank(x: torch.Tensor, *, down: bool) -> torch.Tensor:
    """Low-rank factor -> stored [in, rank] (down: logical [rank, in]) or [out, rank] (up: [out, rank])."""
    if x.shape[0] % 16 or x.shape[1] % 16:
        raise ValueError(f"low-rank factor {list(x.shape)}: both sides must be multiples of 16")
    frags, (c, r) = _fragments(x, down)
    frags = frags.reshape(*frags.shape[:2], 2, 8, 1, 2, 4, 2).permute(_L_PERM).contiguous()
    return frags.reshape(c, r)


def unpack_lowrank(stored: torch.Tensor, *, down: bool) -> torch.Tensor:
    c, r = stored.shape
    frags = stored.contiguous().reshape(c // 16, r // 16, 8, 4, 2, 2, 1, 2).permute(_inverse(_L_PERM))
    frags = frags.reshape(c // 16, r // 16, 16, 16)
    if down:  # (in/16, rank/16, n=rank, k=in) -> [rank, in]
        return frags.permute(1, 2, 0, 3).reshape(r, c)
    return frags.permute(0, 2, 1, 3).reshape(c, r)


# -------------------------------------------------- AWQ W4A16 (tinychat)

def pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] unsigned codes 0..15 -> ``qweight`` int32 [N/4, K/2] (tinychat's pack_w4, group 64).

    Each 32-element k-chunk is viewed as [4, 8]: 16-bit word i holds elements
    i, i+8, i+16, i+24 in nibbles 0..3; then four output rows are interleaved
    per 64-wide k block.
    """
    n, k = codes.shape
    if n % 4 or k % TILE_K:
        raise ValueError(f"AWQ qweight: [{n}, {k}] needs N a multiple of 4 and K of 64")
    c = codes.to(torch.int32).reshape(n, k // 32, 4, 8)
    words = c[:, :, 0] | (c[:, :, 1] << 4) | (c[:, :, 2] << 8) | (c[:, :, 3] << 12)  # [n, k/32, 8]
    words = words.reshape(n // 4, 4, k // 64, 16).permute(0, 2, 1, 3).reshape(n // 4, k)
    words = torch.where(words >= 1 << 15, words - (1 << 16), words)  # two's complement 16-bit words
    return words.to(torch.int16).contiguous().view(torch.int32)


def unpack_awq(qweight: torch.Tensor) -> torch.Tensor:
    rows, half = qweight.shape
    n, k = rows * 4, half * 2
    words = qweight.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF  # [n/4, k]
    words = words.reshape(n // 4, k // 64, 4, 16).permute(0, 2, 1, 3).reshape(n, k // 32, 8)
    nibbles = torch.stack([(words >> (4 * j)) & 0xF for j in range(4)], dim=2)  # [n, k/32, 4, 8]
    return nibbles.reshape(n, k).to(torch.uint8)


def interleave_modulation(x: torch.Tensor, chunks: int = 6) -> torch.Tensor:
    """Rows (or vector entries) of a modulation layer from chunk-major (6, D) to channel-major (D, 6)."""
    rest = x.shape[1:]
    return x.reshape(chunks, -1, *rest).transpose(0, 1).reshape(x.shape)


def deinterleave_modulation(x: torch.Tensor, chunks: int = 6) -> torch.Tensor:
    """The inverse of ``interleave_modulation`` along the last axis (a layer's outputs)."""
    lead = x.shape[:-1]
    return x.reshape(*lead, -1, chunks).transpose(-1, -2).reshape(x.shape)
