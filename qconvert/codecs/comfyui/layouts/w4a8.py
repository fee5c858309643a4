"""``asym_w4a8_int8`` (stock ComfyUI since v0.31.0): ConvRot-rotated 4-bit weights with a 16-level
codebook (``w4a8``), or uniform 6-bit codes (``w6a8``), run on the INT8 units of every GPU since Turing
(spec comfy-quant.md §10; comfy-kitchen 0.2.40 ``tensor/w4a8_int8.py`` is the oracle, byte for byte).

What is stored for a weight ``W`` of ``N`` rows and ``K`` inputs (``K`` a multiple of 256):

* ``weight`` (I8 ``[N, K/2]`` at 4 bits, ``[N, 3K/4]`` at 6): the codes of ``W·H`` (``H`` ConvRot's
  block Hadamard, per 256 inputs).  Lane by lane, byte ``j`` of a row's first ``K/2`` holds column ``2j`` in
  its low nibble and ``2j+1`` in its high nibble; at 6 bits those nibbles are each code's low 4 bits and a
  further ``K/4`` bytes hold the top 2 bits, column ``c`` in byte ``c//4`` at bit ``2·(c%4)``.
* ``weight_s_rel`` (F8_E4M3 ``[N, K/16]``): each group of 16 columns' scale, relative to its row's.
* ``weight_s_channel`` (F32 ``[N]``): each row's scale, the step of the INT8 grid its groups decode to.
* ``weight_codebook`` (F32 ``[16]``, 4 bits only): the levels codes 0..15 stand for.

ComfyUI decodes a group to INT8 first, ``round(clamp(level(code)·s_rel))`` (level ``code − 32`` at
6 bits), then multiplies the INT8 matmul's output by ``s_channel``; the activations are rotated and
quantized to INT8 per row, as ``int8_tensorwise`` with ConvRot does.  So the codes are chosen against
that INT8 grid, not against the levels themselves.

How comfy-kitchen chooses them, which this module reproduces: one codebook per tensor (a fixed Lloyd-Max
table for a unit Gaussian unless a row sample's rotated groups are heavy-tailed, then a Lloyd-Max fit),
group scales refined by two alternating least-squares passes, and at 6 bits each group scale moved to
whichever neighbouring FP8 value reconstructs the group best.  Rows are processed in chunks of about
4M elements, as comfy-kitchen does, so every matmul and reduction has the same operands as its.
"""

from __future__ import annotations

import torch

from qconvert.codecs.comfyui.base import Decoder, LayerFormat, StoredLayer, nonnegative, rotation_group
from qconvert.codecs.comfyui.blocks import CONVROT_GROUP, check_width, int8_rows, rotate
from qconvert.core import untrusted
from qconvert.core.errors import CheckpointError

GROUP = 16                      # columns per s_rel
# The 16 Lloyd-Max levels of a unit-normalized Gaussian group (comfy-kitchen's built-in table).
GAUSSIAN_LEVELS = (-0.980602, -0.794529, -0.638165, -0.500986, -0.377321, -0.263187, -0.155210, -0.050720,
                   0.052541, 0.156985, 0.265284, 0.379533, 0.502636, 0.638953, 0.794876, 0.980671)
HEAVY_TAILED = -0.1             # excess kurtosis above which a tensor gets its own fitted codebook
KURTOSIS_SAMPLE = 1 << 19       # values drawn (seed 0) to estimate it
FIT_SAMPLE, FIT_PASSES = 300_000, 25
CHUNK_ELEMENTS = 1 << 22        # rows per chunk: this many elements (at least one row)
ALS_PASSES = 2
W6_STEPS = 31                   # 6-bit levels -31..31, stored as level + 32
E4M3_LARGEST = 0x7E             # bits of the largest finite e4m3fn value (0x7F is NaN)
TINY = 1e-8


# ------------------------------------------------------------------ the codebook

def _unit_groups(rotated: torch.Tensor) -> torch.Tensor:
    g = rotated.float().view(rotated.shape[0], -1, GROUP)
    return g / g.abs().amax(dim=-1, keepdim=True).clamp(min=TINY)


def _drawn(x: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` of ``x``'s values drawn with replacement (seed 0), or all of them when there are fewer."""
    if x.numel() <= count:
        return x
    picks = torch.randint(0, x.numel(), (count,), generator=torch.Generator(device=x.device).manual_seed(0),
                          device=x.device)
    return x[picks]


def _lloyd_max(unit: torch.Tensor) -> torch.Tensor:
    """16 levels fitted to a sample: quantiles, then 25 passes of each level = the mean of its values."""
    x = _drawn(unit.flatten(), FIT_SAMPLE).float()
    levels = torch.quantile(x, torch.linspace(0, 1, 16, device=x.device))
    for _ in range(FIT_PASSES):
        nearest = (x.unsqueeze(-1) - levels).abs().argmin(-1)
        moved = levels.clone()
        for i in range(16):
            mine = nearest == i
            if mine.any():
                moved[i] = x[mine].mean()
        levels = moved
    return levels.contiguous()


def choose_codebook(w: torch.Tensor, group: int = CONVROT_GROUP) -> torch.Tensor:
    """The tensor's 16 levels, from at most ~4M elements of evenly spaced rows (the same whatever the
    chunking): the Gaussian table unless the rotated groups are heavy-tailed."""
    n, k = w.shape
    most = max(1, CHUNK_ELEMENTS // k)
    sample = w.index_select(0, torch.linspace(0, n - 1, most, device=w.device).long()) if n > most else w
    unit = _unit_groups(rotate(sample.contiguous(), group))
    x = _drawn(unit.detach().flatten(), KURTOSIS_SAMPLE).float()
    excess_kurtosis = ((x - x.mean()) / (x.std() + 1e-9)).pow(4).mean() - 3.0
    if excess_kurtosis.item() <= HEAVY_TAILED:
        return torch.tensor(GAUSSIAN_LEVELS, dtype=torch.float32, device=w.device)
    return _lloyd_max(unit)


# ------------------------------------------------------------------ codes and scales

def _nearest(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of sorted ``levels`` (one row of levels per row of ``values``, or one shared
    vector); a tie goes to the lower index."""
    last = levels.shape[-1] - 1
    at = torch.searchsorted(levels, values.contiguous())
    lo, hi = (at - 1).clamp(0, last), at.clamp(0, last)
    if levels.dim() == 1:
        below, above = levels[lo], levels[hi]
    else:
        below, above = torch.gather(levels, 1, lo), torch.gather(levels, 1, hi)
    return torch.where((values - above).abs() < (values - below).abs(), hi, lo).to(torch.int32)


def _int8_levels(table: torch.Tensor, s_rel: torch.Tensor) -> torch.Tensor:
    """Per group, the INT8 values its codes decode to: ``round(clamp(level · s_rel))``, [rows, groups, L]."""
    return (table.view(1, 1, -1) * s_rel.float().unsqueeze(-1)).round_().clamp_(-127, 127)


def _on_grid(target: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Codes of ``target`` ([rows, groups, 16], in INT8 steps) on each group's sorted ``grid``."""
    rows, groups, size = target.shape
    flat = _nearest(target.reshape(rows * groups, size), grid.reshape(rows * groups, -1).contiguous())
    return flat.reshape(rows, groups, size)


def _best_neighbour_scales(grouped, s_rel, s_channel, table):
    """Per group, of the stored FP8 scale and its two FP8 neighbours, the one whose INT8 grid reconstructs
    the group with the least squared error (the first on a tie), and the codes on it."""
    target = grouped / s_channel.view(-1, 1, 1)
    bits = s_rel.view(torch.uint8)
    best, best_err, best_codes = None, None, None
    for cand in (s_rel.float(), (bits - 1).clamp_(min=1).view(torch.float8_e4m3fn).float(),
                 (bits + 1).clamp_(max=E4M3_LARGEST).view(torch.float8_e4m3fn).float()):
        grid = _int8_levels(table, cand)
        codes = _on_grid(target, grid)
        err = torch.gather(grid, 2, codes.long()).sub_(target).pow_(2).sum(-1)
        if best is None:
            best, best_err, best_codes = cand, err, codes
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, cand, best)
        best_codes = torch.where(better.unsqueeze(-1), codes, best_codes)
    return best.to(torch.float8_e4m3fn).contiguous(), best_codes


def _encode_rotated(rotated: torch.Tensor, bits: int, codebook: torch.Tensor | None):
    """(codes [N, K] in 0..15 or 1..63, s_rel e4m3fn [N, K/16], s_channel f32 [N]) of rotated rows."""
    n, k = rotated.shape
    grouped = rotated.float().view(n, k // GROUP, GROUP)
    amax = grouped.abs().amax(dim=-1, keepdim=True)
    if bits == 6:
        table = torch.arange(-W6_STEPS, W6_STEPS + 1, device=rotated.device, dtype=torch.float32)

        def assign(x):
            return (x.round_().clamp_(-W6_STEPS, W6_STEPS) + W6_STEPS).to(torch.int32)
        scale = (amax / W6_STEPS).clamp(min=TINY)
    else:
        table = codebook

        def assign(x):
            return _nearest(x, table)
        scale = amax.clamp(min=TINY)
    codes = assign(grouped / scale)
    for _ in range(ALS_PASSES):        # the least-squares scale for these codes, then the codes for it
        levels = table[codes]
        scale = ((grouped * levels).sum(-1, keepdim=True)
                 / (levels * levels).sum(-1, keepdim=True).clamp(min=TINY)).clamp(min=TINY)
        codes = assign(grouped / scale)
    s_channel = ((table[codes] * scale).abs().amax(dim=(1, 2)) / 127.0).clamp(min=TINY)
    s_rel = (scale.squeeze(-1) / s_channel.unsqueeze(1)).float().contiguous().to(torch.float8_e4m3fn).contiguous()
    if bits == 6:
        s_rel, codes = _best_neighbour_scales(grouped, s_rel, s_channel, table)
        codes = codes + 1
    else:
        codes = _on_grid(grouped / s_channel.view(-1, 1, 1), _int8_levels(table, s_rel))
    return codes.view(n, k), s_rel, s_channel.float().contiguous()


# ------------------------------------------------------------------ packing

def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[N, K] codes as the I8 weight (the module docstring has the layout)."""
    low = ((codes[:, 0::2] & 0xF) | ((codes[:, 1::2] & 0xF) << 4)).to(torch.int8)
    if bits == 4:
        return low.contiguous()
    high = torch.zeros_like(codes[:, 0::4])
    for j in range(4):
        high |= ((codes[:, j::4] >> 4) & 0x3) << (2 * j)
    return torch.cat([low, high.to(torch.int8)], dim=1).contiguous()


def unpack_codes(weight: torch.Tensor, k: int, bits: int) -> torch.Tensor:
    b = weight.view(torch.uint8).to(torch.int32)
    codes = torch.stack([b[:, :k // 2] & 0xF, b[:, :k // 2] >> 4], dim=-1).reshape(b.shape[0], k)
    if bits == 6:
        high = b[:, k // 2:]
        codes |= torch.stack([(high >> (2 * j)) & 0x3 for j in range(4)], dim=-1).reshape(b.shape[0], k) << 4
    return codes


# ------------------------------------------------------------------ encode / decode

def encode_w4a8(w: torch.Tensor, bits: int = 4, group: int = CONVROT_GROUP) -> tuple[dict, dict]:
    """comfy-kitchen's ``quantize_w4a8_int8_weight(w, bits=bits)`` with its defaults (group 16, ConvRot
    256, symmetric, codebook at 4 bits, FP8 group scales, scale search at 6 bits), as stored tensors."""
    check_width(w, group, f"w{bits}a8")
    w = w.float()                      # comfy-kitchen's figures are those of its float32 path (spec §8.3)
    n, k = w.shape
    codebook = choose_codebook(w, group) if bits == 4 else None
    rows = max(1, CHUNK_ELEMENTS // k)
    parts = [_encode_rotated(rotate(w[r:r + rows].contiguous(), group), bits, codebook)
             for r in range(0, n, rows)]
    codes, s_rel, s_channel = (torch.cat(p) for p in zip(*parts))
    tensors = {"weight": pack_codes(codes, bits), "weight_s_rel": s_rel, "weight_s_channel": s_channel}
    if codebook is not None:
        tensors["weight_codebook"] = codebook.float().contiguous()
    return tensors, {"format": "asym_w4a8_int8", "group_size": GROUP, "convrot": True, "convrot_groupsize": group}


def decode_w4a8(tensors: dict, shape: tuple, conf: dict) -> torch.Tensor:
    """ComfyUI's weight in float32: codes -> INT8 grid per group -> times s_channel -> rotated back."""
    rows, k = shape
    bits = tensors["weight"].shape[1] * 8 // k
    codes = unpack_codes(tensors["weight"], k, bits)
    codebook = tensors.get("weight_codebook")
    levels = codebook.float()[codes] if codebook is not None else codes.float() - float(1 << (bits - 1))
    size = int(conf.get("group_size", GROUP))
    grid = levels.view(rows, k // size, size) * tensors["weight_s_rel"].float().unsqueeze(-1)
    grid = grid.round().clamp_(-127, 127)
    w = grid.view(rows, k) * tensors["weight_s_channel"].float().view(rows, 1)
    return rotate(w, int(conf.get("convrot_groupsize", CONVROT_GROUP)))


class W4A8(LayerFormat):
    """``w4a8``: 4-bit codes on a 16-level codebook, about 0.56 bytes per weight."""

    name = "w4a8"
    comfy_format = "asym_w4a8_int8"
    family = "w4a8"
    loads_in = "ComfyUI v0.31.0 or newer (asym_w4a8_int8, #15308)"
    native_on = "INT8 matmuls from Turing (sm 7.5) on: RTX 20/30/40/50"
    weight_dtype = "I8"
    scale_suffixes = ("weight_s_rel", "weight_s_channel")   # and at 4 bits weight_codebook, checked with them
    needs_multiple = CONVROT_GROUP
    mix_candidate = True
    in_demo = True
    # where 256 does not divide the inputs (no Qwen-Image linear): row-wise INT8, the stock layout on the
    # same INT8 units, as ConvRot INT8 falls back
    fallback = "int8-row"
    bits = 4

    def config(self):
        return {"format": self.comfy_format, "group_size": GROUP, "convrot": True,
                "convrot_groupsize": CONVROT_GROUP}

    def stored(self, shape):
        rows, cols = shape
        out = [("weight", "I8", (rows, cols * self.bits // 8)), ("weight_s_rel", "F8_E4M3", (rows, cols // GROUP)),
               ("weight_s_channel", "F32", (rows,))]
        return out + ([("weight_codebook", "F32", (16,))] if self.bits == 4 else [])

    def stored_columns(self, meta):
        """From the group scales (16 inputs each): the weight's width alone cannot tell 4 bits from 6."""
        s_rel = meta.get("weight_s_rel")
        if s_rel is not None and len(s_rel.shape) == 2:
            return int(s_rel.shape[1]) * GROUP
        return int(meta["weight"].shape[1]) * 8 // self.bits

    def encode(self, w):
        return encode_w4a8(w, self.bits)

    def decode(self, tensors, shape, conf):
        return decode_w4a8(tensors, shape, conf)

    def activations(self, x, conf, input_scale):
        """Rotated, then INT8 per row: the INT8 ConvRot matmul ComfyUI runs these layers on."""
        return int8_rows(x, int(conf.get("convrot_groupsize", CONVROT_GROUP)))

    def _decoder(self, layer: StoredLayer, conf: dict, logical) -> Decoder:
        meta = layer.meta
        rows, packed = (int(d) for d in meta["weight"].shape)
        s_rel = meta["weight_s_rel"]
        if s_rel.dtype not in ("F8_E4M3", "U8") or len(s_rel.shape) != 2 or int(s_rel.shape[0]) != rows:
            raise CheckpointError(f"{layer.where}: weight_s_rel must be F8_E4M3 [{rows}, K/16], not {s_rel.dtype} "
                                  f"{list(s_rel.shape)}")
        size = conf.get("group_size", GROUP)
        if size != GROUP:
            raise CheckpointError(f"{layer.where}: group_size {untrusted.shown(size, 20)}: qconvert reads the stock "
                                  f"layout's {GROUP}")
        k = int(s_rel.shape[1]) * GROUP
        bits = packed * 8 // k if k else 0
        if bits not in (4, 6) or packed * 8 != k * bits:
            raise CheckpointError(f"{layer.where}: a weight of {packed} bytes a row fits neither 4 nor 6 bits for "
                                  f"{k} inputs")
        group = rotation_group(layer.where, conf.get("convrot_groupsize", CONVROT_GROUP), k)
        s_channel = meta["weight_s_channel"]
        if s_channel.dtype != "F32" or tuple(s_channel.shape) != (rows,):
            raise CheckpointError(f"{layer.where}: weight_s_channel must be F32 [{rows}], not {s_channel.dtype} "
                                  f"{list(s_channel.shape)}")
        tensors = {"weight_s_rel": layer.read("weight_s_rel").view(torch.float8_e4m3fn),
                   "weight_s_channel": nonnegative(layer.where, layer.read("weight_s_channel"))}
        if not bool(torch.isfinite(tensors["weight_s_rel"].float()).all()):
            raise CheckpointError(f"{layer.where}: weight_s_rel holds NaN")
        book = meta.get("weight_codebook")
        if bits == 4:
            if book is None or book.dtype != "F32" or tuple(book.shape) != (16,):
                raise CheckpointError(f"{layer.where}: a 4-bit {self.comfy_format} layer needs an F32 [16] "
                                      "weight_codebook")
            tensors["weight_codebook"] = layer.read("weight_codebook").float()
            if not bool(torch.isfinite(tensors["weight_codebook"]).all()):
                raise CheckpointError(f"{layer.where}: weight_codebook holds NaN or Inf")
        conf = {"group_size": GROUP, "convrot_groupsize": group}
        return lambda q: decode_w4a8({**tensors, "weight": q}, (rows, k), conf)


class W6A8(W4A8):
    """``w6a8``: uniform 6-bit codes in the same layout, about 0.81 bytes per weight."""

    name = "w6a8"
    mix_candidate = True
    in_demo = False
    bits = 6
