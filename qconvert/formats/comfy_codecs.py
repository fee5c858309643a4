"""ComfyUI's per-layer formats beyond FP8, as comfy-kitchen's eager quantizers compute them.

Each ``encode_*`` returns the layer's stored tensors (bare suffixes: ``weight``,
``weight_scale``, ...) and its ``comfy_quant`` JSON object; each
``decode_*`` is ComfyUI's dequantization (spec comfy-quant.md §5) in float32.
Byte parity with comfy-kitchen 0.2.40 is tested (f32 math in its op order).

* ``nvfp4``: E2M1 codes two per byte, the even column in the high nibble;
  FP8 E4M3 scales per 16 inputs, swizzled (``to_blocked``); a per-tensor F32
  ``weight_scale_2 = amax / 2688``.
* ``mxfp8``: FP8 E4M3 values; E8M0 exponents per 32 inputs (stored U8),
  swizzled.
* ``int8``: ``int8_tensorwise`` with a per-tensor or per-row (``[out, 1]``)
  scale, optionally after ConvRot, a fixed block-Hadamard rotation of each
  256 inputs that spreads outliers (no seed; ComfyUI rebuilds it).

Guards (spec §7.5): an all-zero weight gives zeros, never NaN; MXFP8 blocks
too small for E8M0 (amax ≤ 448·2^-127) are written as zero blocks.  NVFP4 and
MXFP8 pad an unaligned weight with zeros in both dimensions (to 16 or 32), as
comfy-kitchen does; the stored weight is the padded one and ComfyUI crops to
its module's ``(out, in)``, so every ``decode_*`` takes that logical shape.
ConvRot needs its group to divide the inputs (every Qwen-Image linear does).
"""

from __future__ import annotations

import math

import torch

FP8_MAX = 448.0
E2M1_MAX = 6.0
NVFP4_BLOCK = 16
MXFP8_BLOCK = 32
CONVROT_GROUP = 256
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def _check(w: torch.Tensor, block: int, what: str) -> None:
    if w.dim() != 2 or w.shape[1] % block:
        raise ValueError(f"{what}: a [{', '.join(map(str, w.shape))}] weight; inputs must be a multiple of {block}")


def padded_shape(shape: tuple, block: int) -> tuple:
    """comfy-kitchen's ``pad_16x``/``pad_32x``: both dimensions up to multiples of ``block``."""
    return tuple(-(-int(n) // block) * block for n in shape)


def _padded(x: torch.Tensor, block: int) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"a {x.dim()}-D weight; ComfyUI's block formats are 2-D")
    shape = padded_shape(x.shape, block)
    if shape == tuple(x.shape):
        return x
    out = x.new_zeros(shape)
    out[: x.shape[0], : x.shape[1]] = x
    return out


# ----------------------------------------------------------- the swizzle

def to_blocked(s: torch.Tensor) -> torch.Tensor:
    """cuBLAS' block-scaling layout: scales [R, Cb] -> [128·⌈R/128⌉, 4·⌈Cb/4⌉], zero-padded, each
    128x4 tile stored as 32 rows of 16 (row r%32, then the four 32-row quarters, then 4 columns)."""
    r, cb = s.shape
    rp, cp = 128 * math.ceil(r / 128), 4 * math.ceil(cb / 4)
    padded = torch.zeros(rp, cp, dtype=s.dtype)
    padded[:r, :cb] = s
    tiles = padded.view(rp // 128, 4, 32, cp // 4, 4).permute(0, 3, 2, 1, 4)
    return tiles.reshape(rp, cp)


def from_blocked(b: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    rp, cp = b.shape
    tiles = b.reshape(rp // 128, cp // 4, 32, 4, 4).permute(0, 3, 2, 1, 4)
    return tiles.reshape(rp, cp)[:rows, :cols]


# ------------------------------------------------------------------ NVFP4

def e2m1_rne(x: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8, sign in bit 3) rounding to nearest, ties to the even code; saturating at 6."""
    mag = x.abs().clamp(max=E2M1_MAX)
    mids = torch.tensor(_E2M1_MIDPOINTS, dtype=mag.dtype)
    idx = torch.bucketize(mag, mids)  # ties go to the lower code here ...
    tie = (idx < len(_E2M1_MIDPOINTS)) & (mag == mids[idx.clamp(max=len(_E2M1_MIDPOINTS) - 1)])
    idx = torch.where(tie & (idx % 2 == 1), idx + 1, idx)  # ... and to the even one here
    return (idx | torch.signbit(x).to(idx.dtype) << 3).to(torch.uint8)


def e2m1_value(codes: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(_E2M1 + tuple(-v for v in _E2M1), dtype=torch.float32)
    return table[codes.long()]


def encode_nvfp4(w: torch.Tensor) -> tuple[dict, dict]:
    x = _padded(w.float(), NVFP4_BLOCK)
    g = x.abs().amax() / (FP8_MAX * E2M1_MAX)
    g_safe = torch.clamp(g, min=2.0 ** -126)  # an all-zero weight: zeros, not 0/0
    blocks = x.reshape(x.shape[0], -1, NVFP4_BLOCK)
    s = torch.clamp(blocks.abs().amax(-1) / E2M1_MAX / g_safe, max=FP8_MAX).to(torch.float8_e4m3fn)
    t = (g_safe * s.float()).unsqueeze(-1)
    scaled = torch.where(t == 0, torch.zeros_like(blocks), blocks / torch.where(t == 0, torch.ones_like(t), t))
    codes = e2m1_rne(scaled.clamp(-E2M1_MAX, E2M1_MAX)).reshape(x.shape)
    packed = (codes[:, 0::2] << 4) | codes[:, 1::2]
    tensors = {"weight": packed, "weight_scale": to_blocked(s.view(torch.uint8)).view(torch.float8_e4m3fn),
               "weight_scale_2": g.reshape(())}
    return tensors, {"format": "nvfp4"}


def decode_nvfp4(tensors: dict, shape: tuple) -> torch.Tensor:
    """The ``shape`` weight (the stored one cropped, when it was padded)."""
    packed = tensors["weight"]
    codes = torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(packed.shape[0], -1)
    rows, cols = codes.shape
    s = from_blocked(tensors["weight_scale"].view(torch.uint8), rows, cols // NVFP4_BLOCK)
    scale = s.view(torch.float8_e4m3fn).float() * tensors["weight_scale_2"].float()
    values = e2m1_value(codes).reshape(rows, -1, NVFP4_BLOCK)
    return (values * scale.unsqueeze(-1)).reshape(rows, cols)[: shape[0], : shape[1]]


# ------------------------------------------------------------------ MXFP8

def _ceil_log2(v: torch.Tensor) -> torch.Tensor:
    """ceil(log2 v) exactly, for v > 0 (frexp, not a rounded logarithm)."""
    m, e = torch.frexp(v)
    return torch.where(m == 0.5, e - 1, e)


def encode_mxfp8(w: torch.Tensor) -> tuple[dict, dict]:
    x = _padded(w.float(), MXFP8_BLOCK)
    blocks = x.reshape(x.shape[0], -1, MXFP8_BLOCK)
    amax = blocks.abs().amax(-1)
    exponent = (_ceil_log2(torch.clamp(amax / FP8_MAX, min=2.0 ** -127)) + 127).clamp(0, 254)
    scale = torch.exp2((exponent - 127).float()).unsqueeze(-1)
    data = (blocks / scale).clamp(-FP8_MAX, FP8_MAX)
    data = torch.where((exponent == 0).unsqueeze(-1), torch.zeros_like(data), data)  # E8M0 cannot hold the scale
    tensors = {"weight": data.reshape(x.shape).to(torch.float8_e4m3fn),
               "weight_scale": to_blocked(exponent.to(torch.uint8))}
    return tensors, {"format": "mxfp8"}


def decode_mxfp8(tensors: dict, shape: tuple) -> torch.Tensor:
    """The ``shape`` weight (the stored one cropped, when it was padded)."""
    rows, cols = tensors["weight"].shape
    e = from_blocked(tensors["weight_scale"].view(torch.uint8), rows, cols // MXFP8_BLOCK).float()
    scale = torch.where(e == 0, torch.zeros_like(e), torch.exp2(e - 127))
    q = tensors["weight"].float().reshape(rows, -1, MXFP8_BLOCK)
    return (q * scale.unsqueeze(-1)).reshape(rows, cols)[: shape[0], : shape[1]]


# ------------------------------------------------------------------- INT8

def hadamard(g: int) -> torch.Tensor:
    """ConvRot's rotation: H4^{⊗log4 g} / √g, symmetric and orthogonal (its own inverse)."""
    if g < 4 or 4 ** round(math.log(g, 4)) != g:
        raise ValueError(f"convrot group {g} is not a power of 4")
    h4 = torch.tensor([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=torch.float32)
    h = h4
    while h.shape[0] < g:
        h = torch.kron(h, h4)
    return h / math.sqrt(g)


def rotate(w: torch.Tensor, group: int) -> torch.Tensor:
    """Each ``group`` inputs of every row times Hᵀ (= H), in float32."""
    x = w.float().reshape(w.shape[0], -1, group)
    return (x @ hadamard(group).T).reshape(w.shape)


def encode_int8(w: torch.Tensor, *, per_row: bool = True, convrot: bool = True,
                group: int = CONVROT_GROUP) -> tuple[dict, dict]:
    x = w.float()
    conf = {"format": "int8_tensorwise"}
    if convrot:
        _check(w, group, "int8 convrot")
        x = rotate(x, group)
        conf.update(convrot=True, convrot_groupsize=group)
    amax = x.abs().amax(dim=1, keepdim=True) if per_row or convrot else x.abs().amax()
    scale = torch.clamp(amax / 127, min=1e-30)
    q = torch.clamp(torch.round(x / scale), -128, 127).to(torch.int8)
    return {"weight": q, "weight_scale": scale.float()}, conf


def decode_int8(tensors: dict, shape: tuple, conf: dict) -> torch.Tensor:
    w = tensors["weight"].float() * tensors["weight_scale"].float()
    if conf.get("convrot"):
        w = rotate(w, int(conf.get("convrot_groupsize", CONVROT_GROUP)))
    return w.reshape(shape)


def encode_fp8(w: torch.Tensor) -> tuple[dict, dict]:
    """FP8 e4m3fn as ``to-fp8`` writes it, matmul in full precision (spec comfy-quant.md §7.2)."""
    from .fp8 import FP8_TYPES, quantize_fp8

    q, scale = quantize_fp8(w, FP8_TYPES["e4m3fn"])
    return {"weight": q, "weight_scale": scale}, {"format": "float8_e4m3fn", "full_precision_matrix_mult": True}


def decode_fp8(tensors: dict, shape: tuple) -> torch.Tensor:
    return (tensors["weight"].float() * tensors["weight_scale"].float()).reshape(shape)


# ------------------------------------------------------------ ConvRot W4A4

def encode_convrot_w4a4(w: torch.Tensor, group: int = CONVROT_GROUP) -> tuple[dict, dict]:
    """``convrot_w4a4``: the rotated weight in signed INT4 (−7..7, two's complement, the even column in
    the low nibble), one F32 scale per row (spec comfy-quant.md §3.5).  Experimental in ComfyUI."""
    _check(w, group, "convrot_w4a4")
    x = rotate(w.float(), group)
    scale = torch.clamp(x.abs().amax(dim=1), min=1e-10) / 7
    q = torch.clamp(torch.round(x / scale[:, None]), -7, 7).to(torch.int8)
    nib = (q.to(torch.int16) & 0xF).to(torch.uint8)
    packed = (nib[:, 0::2] | (nib[:, 1::2] << 4)).view(torch.int8)
    return {"weight": packed, "weight_scale": scale.float()}, {"format": "convrot_w4a4", "convrot_groupsize": group}


def decode_convrot_w4a4(tensors: dict, shape: tuple, conf: dict) -> torch.Tensor:
    b = tensors["weight"].view(torch.uint8)
    nib = torch.stack([b & 0xF, b >> 4], dim=-1).reshape(b.shape[0], -1).to(torch.int16)
    q = torch.where(nib >= 8, nib - 16, nib).float()
    w = q * tensors["weight_scale"].float()[:, None]
    return rotate(w, int(conf.get("convrot_groupsize", CONVROT_GROUP))).reshape(shape)


# ------------------------------------------- activations (ComfyUI's native matmuls)

def activations(x: torch.Tensor, fmt: str, conf: dict, input_scale: torch.Tensor | None) -> torch.Tensor:
    """The input as a native ComfyUI matmul quantizes it (spec comfy-quant.md §2.2), fake-quantized in float32.

    FP8: a static scale, ``input_scale`` or 1.0 (so beyond ±448 saturates), unless the layer asks for full
    precision; NVFP4: a dynamic per-tensor scale ``amax/2688`` and FP8 scales per 16; MXFP8: E8M0 scales per
    32; INT8: per row, after the ConvRot rotation when the layer has one (which the weight carries too).
    """
    x = x.float()
    if conf.get("full_precision_matrix_mult"):
        return x
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    if fmt in ("float8_e4m3fn", "float8_e5m2"):
        dtype = torch.float8_e4m3fn if fmt == "float8_e4m3fn" else torch.float8_e5m2
        s = input_scale.float() if input_scale is not None else torch.tensor(1.0)
        top = float(torch.finfo(dtype).max)
        return ((rows / s).clamp(-top, top).to(dtype).float() * s).reshape(shape)
    if fmt == "nvfp4":
        t, _ = encode_nvfp4(rows)
        return decode_nvfp4(t, tuple(rows.shape)).reshape(shape)
    if fmt == "mxfp8":
        t, _ = encode_mxfp8(rows)
        return decode_mxfp8(t, tuple(rows.shape)).reshape(shape)
    if fmt == "convrot_w4a4":  # rotated, then INT4 per row (W4A4)
        group = int(conf.get("convrot_groupsize", CONVROT_GROUP))
        t, c = encode_convrot_w4a4(rows, group)
        return decode_convrot_w4a4(t, tuple(rows.shape), c).reshape(shape)
    if fmt == "int8_tensorwise":
        params = conf.get("params") if isinstance(conf.get("params"), dict) else conf
        group = int(params.get("convrot_groupsize", CONVROT_GROUP)) if params.get("convrot") else 0
        t, _ = encode_int8(rows, per_row=True, convrot=bool(group), group=group or CONVROT_GROUP)
        return decode_int8(t, tuple(rows.shape), {"convrot": bool(group), "convrot_groupsize": group}).reshape(shape)
    return x


FORMATS = {
    "fp8": lambda w: encode_fp8(w),
    "nvfp4": lambda w: encode_nvfp4(w),
    "mxfp8": lambda w: encode_mxfp8(w),
    "int8": lambda w: encode_int8(w, per_row=True, convrot=True),
    "int8-row": lambda w: encode_int8(w, per_row=True, convrot=False),
    "int8-tensor": lambda w: encode_int8(w, per_row=False, convrot=False),
    "convrot-w4a4": lambda w: encode_convrot_w4a4(w),
}
