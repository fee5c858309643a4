"""diffusers' natively quantized linears (``quantizers/bfl``, ``BFLQuantizationConfig``): ``fp8r`` and ``nvfp4``.

diffusers 0.42 loads them from a single file with ``from_single_file``; a linear is quantized when its weight
comes with scale tensors (spec comfy-quant.md §10):

* ``fp8r``: ``weight`` F8_E4M3 ``[N, K]``; ``weight_scale`` F32 ``[N]``, each row's amax / 448 (at least
  1e-12).  The weight is divided by its row's scale, clamped to ±448 and cast (round to nearest even).
* ``nvfp4`` (NVIDIA ModelOpt's layout): ``weight`` U8 ``[N, K/2]``, two E2M1 codes a byte, the **even**
  column in the **low** nibble (ComfyUI's nvfp4 puts it in the high one); ``weight_scale`` F8_E4M3
  ``[N, K/16]`` in row order (ComfyUI swizzles it); ``weight_scale_2`` the F32 scalar amax / (448 · 6);
  ``input_scale`` an F32 scalar, the activations' global scale (calibrated amax / (448 · 6)).

Both equal diffusers' reference quantizers (``quantize_fp8r``, ``quantize_nvfp4``) byte for byte (tested),
except where diffusers' would store NaN: an all-zero weight gets zero scales here.

What the runtime does to a layer's input, emulated in float32 for verify: on CUDA GPUs with FP8
(compute capability 8.9+, RTX 40 / Ada and later) an fp8r layer quantizes each input row to FP8 with its
own scale; on Blackwell with FlashInfer an nvfp4 layer quantizes its input to NVFP4 with the static
``input_scale`` (FP8 scales per 16 inputs, saturating where a block's amax exceeds 2688 · input_scale).
Everywhere else diffusers dequantizes the weight and the input is untouched.
"""

from __future__ import annotations

import torch

from qconvert.codecs.minifloat import E2M1_MAX, FP8_MAX, e2m1_rne, e2m1_value

FORMATS = ("fp8r", "nvfp4")
NVFP4_BLOCK = 16
NVFP4_RANGE = FP8_MAX * E2M1_MAX  # 2688: the largest magnitude an NVFP4 tensor with global scale 1 holds
_TINY = torch.finfo(torch.float32).tiny

# what each format stores per layer besides ``weight``, and what the runtime needs of the inputs
SCALES = {"fp8r": ("weight_scale",), "nvfp4": ("weight_scale", "weight_scale_2", "input_scale")}
NEEDS_MULTIPLE = {"fp8r": 1, "nvfp4": NVFP4_BLOCK}
NATIVE_ON = {"fp8r": "RTX 40 / Ada and later (torch._scaled_mm)", "nvfp4": "RTX 50 / Blackwell with FlashInfer"}


def stored(fmt: str, shape: tuple) -> list[tuple[str, str, tuple]]:
    """(suffix, safetensors dtype, shape) of each tensor a ``shape`` linear stores in ``fmt``."""
    n, k = (int(d) for d in shape)
    if fmt == "fp8r":
        return [("weight", "F8_E4M3", (n, k)), ("weight_scale", "F32", (n,))]
    return [("weight", "U8", (n, k // 2)), ("weight_scale", "F8_E4M3", (n, k // NVFP4_BLOCK)),
            ("weight_scale_2", "F32", ()), ("input_scale", "F32", ())]


# ------------------------------------------------------------------ fp8r

def encode_fp8r(w: torch.Tensor) -> dict:
    w = w.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
    q = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return {"weight": q, "weight_scale": scale}


def decode_fp8r(tensors: dict) -> torch.Tensor:
    return tensors["weight"].float() * tensors["weight_scale"].float()[:, None]


def fp8r_inputs(x: torch.Tensor) -> torch.Tensor:
    """An fp8r layer's input as its FP8 matmul sees it: each row on FP8 with its own scale (amax / 448)."""
    rows = x.float().reshape(-1, x.shape[-1])
    return decode_fp8r(encode_fp8r(rows)).reshape(x.shape)


# ------------------------------------------------------------------ nvfp4

def nvfp4_blocks(x: torch.Tensor, global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E2M1 codes ``[N, K]`` and FP8 scales ``[N, K/16]`` of ``x`` under ``global_scale``: each block of 16
    gets the FP8 scale ``amax / 6 / global_scale`` (at most 448), its values divided by ``scale · global_scale``
    and rounded to nearest even on the E2M1 grid (saturating at 6).  Blocks whose scale is 0 are zeros."""
    rows, cols = x.shape
    blocks = x.float().reshape(rows, cols // NVFP4_BLOCK, NVFP4_BLOCK)
    g = torch.clamp(global_scale.float(), min=_TINY)
    s = torch.clamp(blocks.abs().amax(-1) / E2M1_MAX / g, max=FP8_MAX).to(torch.float8_e4m3fn)
    t = (s.float() * g).unsqueeze(-1)
    scaled = torch.where(t > 0, blocks / torch.where(t > 0, t, torch.ones_like(t)), torch.zeros_like(blocks))
    codes = e2m1_rne(scaled)
    codes = torch.where(scaled == 0, codes & 0x7, codes)  # diffusers' sign is ``scaled < 0``: -0.0 stores +0
    return codes.reshape(rows, cols), s


def _nvfp4_values(codes: torch.Tensor, s: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    rows, cols = codes.shape
    values = e2m1_value(codes).reshape(rows, cols // NVFP4_BLOCK, NVFP4_BLOCK)
    return (values * (s.float() * global_scale.float()).unsqueeze(-1)).reshape(rows, cols)


def encode_nvfp4(w: torch.Tensor, input_scale: float) -> dict:
    w = w.float()
    g = w.abs().amax() / NVFP4_RANGE
    codes, s = nvfp4_blocks(w, g)
    return {"weight": codes[:, 0::2] | (codes[:, 1::2] << 4), "weight_scale": s, "weight_scale_2": g.reshape(()),
            "input_scale": torch.tensor(float(input_scale), dtype=torch.float32)}


def decode_nvfp4(tensors: dict) -> torch.Tensor:
    packed = tensors["weight"]
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
    return _nvfp4_values(codes, tensors["weight_scale"], tensors["weight_scale_2"])


def nvfp4_inputs(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """An nvfp4 layer's input as FlashInfer's NVFP4 matmul sees it: NVFP4 with the static ``input_scale``."""
    rows = x.float().reshape(-1, x.shape[-1])
    codes, s = nvfp4_blocks(rows, input_scale)
    return _nvfp4_values(codes, s, torch.clamp(input_scale.float(), min=_TINY)).reshape(x.shape)


def input_scale_from_amax(amax: float, margin: float) -> float:
    """An nvfp4 layer's static ``input_scale`` from its calibrated input amax (ModelOpt: amax / 2688),
    times ``margin`` so inputs somewhat beyond the calibration's do not saturate; 1.0 for a layer whose
    calibration saw only zeros (a scale fitted to nothing would saturate every real input)."""
    return margin * amax / NVFP4_RANGE if amax > 0 else 1.0


# ------------------------------------------------------------------ one entry per format

def encode(fmt: str, w: torch.Tensor, input_scale: float = 1.0) -> dict:
    return encode_fp8r(w) if fmt == "fp8r" else encode_nvfp4(w, input_scale)


def decode(fmt: str, tensors: dict) -> torch.Tensor:
    return decode_fp8r(tensors) if fmt == "fp8r" else decode_nvfp4(tensors)


def inputs(fmt: str, x: torch.Tensor, tensors: dict) -> torch.Tensor:
    """The input as the format's native matmul quantizes it (float32)."""
    return fp8r_inputs(x) if fmt == "fp8r" else nvfp4_inputs(x, tensors["input_scale"])
