"""What the sampler is given: prompt embeddings, noise, reference latents; read as hostile files.

Files are safetensors, read with qconvert's validated header reader:

* embeddings: ``prompt_embeds`` [1, L, text_dim] and ``prompt_embeds_mask``
  [1, L], optionally ``negative_prompt_embeds`` / ``negative_prompt_embeds_mask``
  (what diffusers' ``pipe.encode_prompt`` returns, saved as they are; it
  returns no mask when every token counts, and a missing mask means that);
* noise: ``noise`` in the packed layout [1, (H/16)·(W/16), 64];
* reference latents (Edit): ``image_latents`` [1, 16, h, w] or [1, 16, 1, h, w],
  the VAE's normalised latents, packed here as the pipeline packs them.

Without files, everything is seeded: the same seed gives the same bytes on
every machine (a CPU generator, as diffusers uses by default).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from qconvert.core.checkpoint import TensorReader, read_safetensors_header
from qconvert.core.errors import QConvertError
from qconvert.core.models import qwen_image as qi
from qconvert.running.sampler import joint_text

LATENT_CHANNELS = 16  # the VAE's z_dim; packed tokens hold 2x2 patches of them
PACKED = 4 * LATENT_CHANNELS


@dataclass
class Prompt:
    embeds: torch.Tensor  # [1, L, text_dim]
    mask: torch.Tensor  # [1, L]
    neg_embeds: torch.Tensor | None = None
    neg_mask: torch.Tensor | None = None

    def to(self, device, dtype) -> "Prompt":
        """Embeddings in the compute dtype on ``device``; masks moved, their dtype kept."""
        def move(t, cast):
            return None if t is None else t.to(device=device, dtype=dtype) if cast else t.to(device)
        return Prompt(move(self.embeds, True), move(self.mask, False), move(self.neg_embeds, True),
                      move(self.neg_mask, False))


def check_size(height: int, width: int) -> None:
    if height <= 0 or width <= 0 or height % 16 or width % 16:
        raise QConvertError(f"--height {height} --width {width}: both must be positive multiples of 16 "
                            "(8 for the VAE, 2 for the 2x2 patches)")


def tokens(height: int, width: int) -> int:
    return (height // 16) * (width // 16)


def image_shapes(height: int, width: int, references: bool) -> list:
    """RoPE's image shapes: the target, then (an Edit model) its reference image, as large as the target."""
    target = (1, height // 16, width // 16)
    return [target, target] if references else [target]


def _read(path: Path, wanted: dict) -> dict:
    """The named tensors (name -> required rank) of a small safetensors file, as float32/int64."""
    header = read_safetensors_header(Path(path))
    missing = [n for n in wanted if wanted[n][1] and n not in header.tensors]
    if missing:
        raise QConvertError(f"{path}: no tensor {missing[0]} (it holds {', '.join(sorted(header.tensors)[:6])})")
    reader = TensorReader()
    out = {}
    try:
        for name, (rank, _) in wanted.items():
            meta = header.tensors.get(name)
            if meta is None:
                continue
            if len(meta.shape) not in rank:
                raise QConvertError(f"{path}: tensor {name} has shape {list(meta.shape)}; expected "
                                    f"{' or '.join(str(r) for r in rank)} dimensions")
            out[name] = reader.read(meta)
    finally:
        reader.close()
    return out


def read_prompt(path: Path, config: qi.QwenImageConfig) -> Prompt:
    found = _read(path, {"prompt_embeds": ((3,), True), "prompt_embeds_mask": ((2,), False),
                         "negative_prompt_embeds": ((3,), False), "negative_prompt_embeds_mask": ((2,), False)})
    pairs = [("prompt_embeds", "prompt_embeds_mask")]
    if "negative_prompt_embeds" in found:
        pairs.append(("negative_prompt_embeds", "negative_prompt_embeds_mask"))
    elif "negative_prompt_embeds_mask" in found:
        raise QConvertError(f"{path}: negative_prompt_embeds_mask without negative_prompt_embeds")
    for embeds, mask in pairs:
        e = found[embeds]
        # encode_prompt returns no mask when every token counts; that is an all-ones mask.
        m = found.setdefault(mask, torch.ones(e.shape[:2], dtype=torch.int64))
        if e.shape[0] != 1 or e.shape[2] != config.joint_attention_dim:
            raise QConvertError(f"{path}: {embeds} has shape {list(e.shape)}; this model takes [1, L, "
                                f"{config.joint_attention_dim}] (text_dim {config.joint_attention_dim})")
        if tuple(m.shape) != tuple(e.shape[:2]):
            raise QConvertError(f"{path}: {mask} has shape {list(m.shape)}, not {list(e.shape[:2])} like {embeds}")
        if not e.is_floating_point() or not bool(torch.isfinite(e.float()).all()):
            raise QConvertError(f"{path}: {embeds} must be finite floats")
    neg = len(pairs) == 2
    return Prompt(found["prompt_embeds"].float(), found["prompt_embeds_mask"].to(torch.int64),
                  found["negative_prompt_embeds"].float() if neg else None,
                  found["negative_prompt_embeds_mask"].to(torch.int64) if neg else None)


def synthetic_prompt(config: qi.QwenImageConfig, seed: int, length: int = 32, *, negative: bool = True) -> Prompt:
    """Seeded embeddings with the statistics of a text encoder's last layer (roughly unit RMS, a few large
    channels), for runs without the 7B text encoder."""
    g = torch.Generator().manual_seed(seed)
    dim = config.joint_attention_dim

    def one(n: int) -> tuple:
        e = torch.randn(1, n, dim, generator=g)
        e[..., torch.randperm(dim, generator=g)[: max(1, dim // 64)]] *= 8
        return e, torch.ones(1, n, dtype=torch.int64)

    pos = one(length)
    neg = one(max(4, length // 4)) if negative else (None, None)
    return Prompt(*pos, *neg)


# verify's synthetic prompts come from their own seeds, which calibration and the mix's measurement never use
# (they take seeds from 0): a choice judged on the prompts it was made on would flatter itself.
HELD_OUT_SEEDS = 1 << 30


def held_out_prompt(config: qi.QwenImageConfig, index: int) -> Prompt:
    """verify's synthetic prompt number ``index``."""
    return synthetic_prompt(config, HELD_OUT_SEEDS + index)


def batch_prompts(prompts: list[Prompt]) -> Prompt:
    """Prompts as one batch, each padded at the end to the longest and the padding masked out; negatives too
    (every prompt has one or none does)."""
    embeds, mask = joint_text([(p.embeds, p.mask) for p in prompts])
    if all(p.neg_embeds is None for p in prompts):
        return Prompt(embeds, mask)
    neg, neg_mask = joint_text([(p.neg_embeds, p.neg_mask) for p in prompts])
    return Prompt(embeds, mask, neg, neg_mask)


def read_noise(path: Path, height: int, width: int) -> torch.Tensor:
    noise = _read(path, {"noise": ((3,), True)})["noise"]
    want = (1, tokens(height, width), PACKED)
    if tuple(noise.shape) != want:
        raise QConvertError(f"{path}: noise has shape {list(noise.shape)}; {height}x{width} needs {list(want)} "
                            "(packed: (H/16)·(W/16) tokens of 64)")
    if not noise.is_floating_point() or not bool(torch.isfinite(noise.float()).all()):
        raise QConvertError(f"{path}: noise must be finite floats")
    return noise.float()


def seeded_noise(seed: int, height: int, width: int) -> torch.Tensor:
    """The pipeline's ``randn`` of [1, 16, 1, H/8, W/8] (CPU generator), packed."""
    g = torch.Generator().manual_seed(seed)
    return pack(torch.randn(1, 1, LATENT_CHANNELS, height // 8, width // 8, generator=g).transpose(1, 2))


# reference images draw from their own stream: a reference never equals the noise or a prompt of the same seed
REFERENCE_STREAM = 1 << 63


def synthetic_reference(seed: int, height: int, width: int) -> torch.Tensor:
    """A seeded stand-in for an Edit model's reference image, packed [1, tokens, 64]: VAE latents are roughly
    unit-variance and smooth in space (an image, not noise), so a coarse field upsampled 4x carries most of
    the variance and a little fine detail the rest."""
    g = torch.Generator().manual_seed(REFERENCE_STREAM + seed)
    h, w = height // 8, width // 8
    coarse = torch.randn(1, LATENT_CHANNELS, -(-h // 4), -(-w // 4), generator=g)
    field = torch.nn.functional.interpolate(coarse, scale_factor=4, mode="bilinear", align_corners=False)[..., :h, :w]
    field = field + 0.3 * torch.randn(1, LATENT_CHANNELS, h, w, generator=g)
    field = (field - field.mean(dim=(2, 3), keepdim=True)) / field.std(dim=(2, 3), keepdim=True)
    return pack(field)


def takes_references(source) -> bool:
    """Whether a source is an Edit model, which every measurement runs beside a reference image as its users do
    (a text-to-image run would measure a model nobody runs)."""
    return bool(getattr(source, "edits", False)) or bool(source.config.zero_cond_t)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[1, 16, (1,) h, w] VAE latents -> [1, (h/2)·(w/2), 64] tokens of 2x2 patches, channel-major."""
    if latents.dim() == 5:
        latents = latents[:, :, 0]
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def read_image_latents(path: Path) -> tuple[torch.Tensor, tuple]:
    """Packed reference latents and their (1, h/16, w/16) shape for RoPE."""
    lat = _read(path, {"image_latents": ((4, 5), True)})["image_latents"]
    h, w = lat.shape[-2:]
    if lat.shape[0] != 1 or lat.shape[1] != LATENT_CHANNELS or (lat.dim() == 5 and lat.shape[2] != 1) \
            or h % 2 or w % 2 or not lat.is_floating_point():
        raise QConvertError(f"{path}: image_latents has shape {list(lat.shape)} {lat.dtype}; expected VAE "
                            f"latents [1, {LATENT_CHANNELS}, h, w] (or [1, {LATENT_CHANNELS}, 1, h, w]) with even h, w")
    return pack(lat.float()), (1, h // 2, w // 2)
