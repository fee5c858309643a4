"""The Qwen-Image transformer in one readable module, running block by block.

Equal to diffusers' ``QwenImageTransformer2DModel`` (tested to 1e-5 in
float32), for Qwen-Image, -2512, -Edit, -Edit-2509 (reference latents
appended to the image sequence), Edit-2511 (``zero_cond_t``: reference
tokens modulated at t = 0) and Layered (``use_additional_t_cond``,
``use_layer3d_rope``).  It holds no weights: every layer comes from a
weight provider (``verify/providers.py``), one block at a time, and is
dropped once the block has run, so the 20B model runs in a few GB.

Shapes: ``latents`` [B, image tokens, in_channels] (packed 2x2 patches, the
target first, then any reference images), ``text`` [B, L, joint_attention_dim]
with ``text_mask`` [B, L], ``timestep`` [B] in [0, 1], ``img_shapes`` the
(frames, h/16, w/16) of each image in the sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from qconvert.core.errors import QConvertError
from qconvert.core.models import qwen_image as qi
from qconvert.running.providers import WeightProvider

EPS = 1e-6
ROPE_THETA = 10000
TIMESTEP_SCALE = 1000  # diffusers' Timesteps(scale=1000): t in [0, 1] becomes 0..1000


# ----------------------------------------------------------------- pieces

def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + EPS)
    if weight.dtype in (torch.float16, torch.bfloat16):
        x = x.to(weight.dtype)
    return x * weight


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=EPS)


def modulate(x: torch.Tensor, params: torch.Tensor, index: torch.Tensor | None = None):
    """``LayerNorm(x) * (1 + scale) + shift`` and the gate, from [B, 3·dim] parameters.

    With ``index`` (Edit-2511), ``params`` holds two batches: the first for
    tokens whose index is 0 (the target), the second for the rest (references at t = 0).
    """
    shift, scale, gate = (p.unsqueeze(1) for p in params.chunk(3, dim=-1))
    if index is not None:
        half = shift.shape[0] // 2
        pick = (index == 0).unsqueeze(-1)
        shift, scale, gate = (torch.where(pick, p[:half], p[half:]) for p in (shift, scale, gate))
    return layer_norm(x) * (1 + scale) + shift, gate


def timestep_embedding(t: torch.Tensor, channels: int = qi.TIMESTEP_CHANNELS) -> torch.Tensor:
    """Sinusoidal features, cosines first (diffusers' Timesteps(flip_sin_to_cos=True, shift 0, scale 1000))."""
    half = channels // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    angles = TIMESTEP_SCALE * (t[:, None].float() * torch.exp(exponent).to(t.dtype)[None, :])
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


# ------------------------------------------------------------------- RoPE

def _axis_frequencies(positions: torch.Tensor, dim: int) -> torch.Tensor:
    inv = 1.0 / torch.pow(ROPE_THETA, torch.arange(0, dim, 2).to(torch.float32).div(dim))
    angles = torch.outer(positions, inv)
    return torch.polar(torch.ones_like(angles), angles)


def _centred(n: int) -> torch.Tensor:
    """Positions -(n - n//2) .. n//2 - 1: the grid centred on zero, as scale_rope does."""
    return torch.arange(-(n - n // 2), n // 2)


def rope(config: qi.QwenImageConfig, img_shapes: Sequence[tuple], text_len: int, device) -> tuple:
    """Complex rotations [tokens, head_dim/2] for the image tokens and the text tokens.

    Image number ``i`` (frames f, grid h x w) sits at frame positions i..i+f-1
    (Layered: its last image, the condition, at -1), with height and width
    centred on zero.  Text starts after the largest half-grid on every axis.
    """
    a_frame, a_height, a_width = config.axes_dims_rope
    image_freqs = []
    text_start = 0
    last = len(img_shapes) - 1
    for i, (frames, h, w) in enumerate(img_shapes):
        condition = config.use_layer3d_rope and i == last
        frame_pos = torch.full((frames,), -1) if condition else torch.arange(i, i + frames)
        per_axis = (_axis_frequencies(frame_pos, a_frame).view(frames, 1, 1, -1).expand(frames, h, w, -1),
                    _axis_frequencies(_centred(h), a_height).view(1, h, 1, -1).expand(frames, h, w, -1),
                    _axis_frequencies(_centred(w), a_width).view(1, 1, w, -1).expand(frames, h, w, -1))
        image_freqs.append(torch.cat(per_axis, dim=-1).reshape(frames * h * w, -1))
        text_start = max(text_start, h // 2, w // 2)
    if config.use_layer3d_rope:
        text_start = max(text_start, last)
    text_pos = torch.arange(text_start, text_start + text_len)
    text_freqs = torch.cat([_axis_frequencies(text_pos, d) for d in config.axes_dims_rope], dim=-1)
    return torch.cat(image_freqs).to(device), text_freqs.to(device)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate [B, S, heads, head_dim] by [S, head_dim/2] complex frequencies (pairs of adjacent channels)."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs.unsqueeze(1)).flatten(3).type_as(x)


# ------------------------------------------------------------------ block

class Block:
    """One transformer block's layers, fetched from the provider when the block runs."""

    def __init__(self, provider: WeightProvider, index: int, config: qi.QwenImageConfig):
        p = f"transformer_blocks.{index}."
        self.linear = {m: provider.linear(p + m) for m in qi.block_linear_modules()}
        self.norm = {n: provider.tensor(f"{p}attn.{n}.weight")
                     for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")}
        self.head_dim = config.attention_head_dim
        self.zero_cond_t = config.zero_cond_t

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (-1, self.head_dim))

    def attention(self, img, txt, mask, freqs):
        L = self.linear
        q, k, v = (self._heads(L[f"attn.to_{n}"](img)) for n in "qkv")
        tq, tk, tv = (self._heads(L[f"attn.add_{n}_proj"](txt)) for n in "qkv")
        q, k = rms_norm(q, self.norm["norm_q"]), rms_norm(k, self.norm["norm_k"])
        tq, tk = rms_norm(tq, self.norm["norm_added_q"]), rms_norm(tk, self.norm["norm_added_k"])
        img_freqs, txt_freqs = freqs
        q, k = apply_rope(q, img_freqs), apply_rope(k, img_freqs)
        tq, tk = apply_rope(tq, txt_freqs), apply_rope(tk, txt_freqs)
        # Joint attention over [text, image], heads first for SDPA.
        joint = [torch.cat(pair, dim=1).transpose(1, 2) for pair in ((tq, q), (tk, k), (tv, v))]
        out = F.scaled_dot_product_attention(*joint, attn_mask=mask).transpose(1, 2).flatten(2, 3)
        n_txt = txt.shape[1]
        return L["attn.to_out.0"](out[:, n_txt:].contiguous()), L["attn.to_add_out"](out[:, :n_txt].contiguous())

    def __call__(self, img, txt, temb, mask, freqs, modulate_index=None):
        L = self.linear
        img_params = L["img_mod.1"](F.silu(temb))
        txt_temb = temb.chunk(2, dim=0)[0] if self.zero_cond_t else temb
        txt_params = L["txt_mod.1"](F.silu(txt_temb))
        img_mod1, img_mod2 = img_params.chunk(2, dim=-1)
        txt_mod1, txt_mod2 = txt_params.chunk(2, dim=-1)

        img_in, img_gate = modulate(img, img_mod1, modulate_index)
        txt_in, txt_gate = modulate(txt, txt_mod1)
        img_attn, txt_attn = self.attention(img_in, txt_in, mask, freqs)
        img = img + img_gate * img_attn
        txt = txt + txt_gate * txt_attn

        img_in, img_gate = modulate(img, img_mod2, modulate_index)
        img = img + img_gate * L["img_mlp.net.2"](F.gelu(L["img_mlp.net.0.proj"](img_in), approximate="tanh"))
        txt_in, txt_gate = modulate(txt, txt_mod2)
        txt = txt + txt_gate * L["txt_mlp.net.2"](F.gelu(L["txt_mlp.net.0.proj"](txt_in), approximate="tanh"))
        if img.dtype == torch.float16:  # as diffusers: keep float16 streams finite
            img, txt = img.clip(-65504, 65504), txt.clip(-65504, 65504)
        return img, txt


# ------------------------------------------------------------------ model

@dataclass
class State:
    """What flows between blocks: the two streams, and what every block reads."""

    img: torch.Tensor
    txt: torch.Tensor
    temb: torch.Tensor
    mask: torch.Tensor | None
    freqs: tuple
    modulate_index: torch.Tensor | None


class QwenImageTransformer:
    """The network over a weight provider.  ``model(...)`` returns the velocity for the image tokens."""

    def __init__(self, config: qi.QwenImageConfig, provider: WeightProvider):
        if any(a % 2 for a in config.axes_dims_rope):
            # RoPE rotates pairs of channels per axis (diffusers asserts the same)
            raise QConvertError(f"axes_dims_rope {list(config.axes_dims_rope)}: every axis must be even to run the "
                                "model (a tiny test model with head_dim 16 cannot run; use 32 or more)")
        self.config = config
        self.provider = provider

    def __call__(self, latents: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None,
                 timestep: torch.Tensor, img_shapes: Sequence[tuple], additional_t_cond: torch.Tensor | None = None,
                 *, on_block=None) -> torch.Tensor:
        state = self.embed(latents, text, text_mask, timestep, img_shapes, additional_t_cond)
        for i in range(self.config.num_layers):
            block = Block(self.provider, i, self.config)
            state.img, state.txt = block(state.img, state.txt, state.temb, state.mask, state.freqs,
                                         state.modulate_index)
            del block  # its weights go before the next block's arrive
            if on_block is not None:
                on_block(i, state.img, state.txt)
        return self.head(state)

    def embed(self, latents, text, text_mask, timestep, img_shapes, additional_t_cond=None) -> "State":
        """Everything before the first block: projected streams, time embedding, mask, RoPE."""
        cfg, P = self.config, self.provider
        img = P.linear("img_in")(latents)
        t = timestep.to(img.dtype)
        modulate_index = None
        if cfg.zero_cond_t:
            t = torch.cat([t, t * 0])
            target = math.prod(img_shapes[0])
            modulate_index = torch.tensor([[0] * target + [1] * (latents.shape[1] - target)] * latents.shape[0],
                                          device=latents.device)
        txt = P.linear("txt_in")(rms_norm(text, P.tensor("txt_norm.weight")))
        mask = None
        if text_mask is not None:
            keep = torch.cat([text_mask.to(torch.bool), torch.ones(img.shape[:2], dtype=torch.bool,
                                                                     device=img.device)], dim=1)
            mask = keep[:, None, None, :]
        temb = self._time_embedding(t, img.dtype, additional_t_cond)
        return State(img, txt, temb, mask, rope(cfg, img_shapes, text.shape[1], img.device), modulate_index)

    def head(self, state: "State") -> torch.Tensor:
        """After the last block: the output norm, modulated by the time embedding, and the projection."""
        temb = state.temb.chunk(2, dim=0)[0] if self.config.zero_cond_t else state.temb
        scale, shift = self.provider.linear("norm_out.linear")(F.silu(temb)).chunk(2, dim=1)
        img = layer_norm(state.img) * (1 + scale[:, None, :]) + shift[:, None, :]
        return self.provider.linear("proj_out")(img)

    def _time_embedding(self, t: torch.Tensor, dtype: torch.dtype, additional_t_cond) -> torch.Tensor:
        P = self.provider
        features = timestep_embedding(t).to(dtype)
        temb = P.linear("time_text_embed.timestep_embedder.linear_2")(
            F.silu(P.linear("time_text_embed.timestep_embedder.linear_1")(features)))
        if self.config.use_additional_t_cond:
            if additional_t_cond is None:
                raise ValueError("a Layered model needs additional_t_cond")
            temb = temb + F.embedding(additional_t_cond, P.tensor(qi.ADDITION_T_EMBEDDING)).to(dtype)
        return temb
