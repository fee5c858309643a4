"""Test models: tiny trained-looking Qwen-Images and full-size sparse ones.

No weights can be downloaded in tests or CI, so qconvert makes its own:

* ``make_tiny`` writes a complete diffusers-layout model (model_index.json,
  transformer/config.json, two or more BF16 shards and their index) whose
  weights look trained: heavy-tailed, with hot input channels, row-scale
  spread, exact-zero and tiny-valued blocks and a rare huge outlier — the
  edge cases quantizers get wrong.
* ``make_full_size_sparse`` writes the real 60-layer layout with true headers
  and the data left as file holes, so plans and sizes can be checked for the
  41 GB model on a few kilobytes of disk.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import replace
from pathlib import Path

import torch

from qconvert.core.checkpoint import INDEX_NAME, TORCH_TO_DTYPE
from qconvert.core.errors import QConvertError
from qconvert.core.io import SafetensorsWriter, atomic_directory, atomic_output, safetensors_header, safetensors_size
from qconvert.core.models import qwen_image as qi

VARIANTS = ("qwen-image", "edit", "edit-2511", "layered")
# model_index.json's pipeline per variant: "edit" (Edit, Edit-2509) has Qwen-Image's config and differs only here
PIPELINES = {"qwen-image": "QwenImagePipeline", "edit": "QwenImageEditPlusPipeline",
             "edit-2511": "QwenImageEditPlusPipeline", "layered": "QwenImageLayeredPipeline"}

MODEL_INDEX = {
    "_class_name": "QwenImagePipeline",
    "_diffusers_version": "0.35.0",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "transformer": ["diffusers", "QwenImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLQwenImage"],
}


def tiny_config(layers: int = 3, heads: int = 2, head_dim: int = 128, text_dim: int = 256,
                variant: str = "qwen-image") -> qi.QwenImageConfig:
    """Defaults keep every row a multiple of 256 (K-quants) and every dim a multiple of 128 (Nunchaku)."""
    if layers < 1 or heads < 1:
        raise QConvertError("make-tiny: --layers and --heads must be at least 1")
    if head_dim < 16 or head_dim % 16:
        raise QConvertError(f"make-tiny: --head-dim {head_dim} must be a multiple of 16 (RoPE axes need it)")
    if text_dim < 1:
        raise QConvertError("make-tiny: --text-dim must be positive")
    if variant not in VARIANTS:
        raise QConvertError(f"make-tiny: unknown variant {variant!r} (choose from {', '.join(VARIANTS)})")
    config = qi.QwenImageConfig(num_layers=layers, num_attention_heads=heads, attention_head_dim=head_dim,
                                joint_attention_dim=text_dim, axes_dims_rope=qi.default_axes_dims(head_dim))
    if variant == "edit-2511":
        config = replace(config, zero_cond_t=True)
    elif variant == "layered":
        config = replace(config, use_additional_t_cond=True, use_layer3d_rope=True)
    return config


def trained_like(name: str, shape: tuple, seed: int) -> torch.Tensor:
    """Deterministic weights with the statistics of a trained transformer (float32)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    info = qi.describe(name)
    if info.role is qi.Role.MARKER:
        return torch.zeros(shape)
    if info.role is qi.Role.BIAS:
        return torch.randn(shape, generator=g) * 0.02
    if info.role in (qi.Role.QK_NORM, qi.Role.NORM):
        # Learned RMSNorm gains: positive, spread around 1, a few large ones.
        return torch.exp(torch.randn(shape, generator=g) * 0.35) * (1 + 4 * (torch.rand(shape, generator=g) > 0.97))
    rows, cols = shape
    # Student-t (3 dof): the heavy tails of trained weights.
    normal = torch.randn(shape, generator=g)
    denom = torch.sqrt(sum(torch.randn(shape, generator=g) ** 2 for _ in range(3)) / 3)
    w = normal / denom.clamp_min(0.05) * (0.6 / cols ** 0.5)
    w *= torch.exp(torch.randn(rows, 1, generator=g) * 0.3)  # per-output-row spread
    hot = torch.randperm(cols, generator=g)[: max(1, cols // 100)]
    w[:, hot] *= 6.0  # a few hot input channels, as activation outliers leave in weights
    if info.is_block_linear and rows >= 4 and cols >= 256:
        # Edge cases for block quantizers, at 256-aligned positions.
        r = int(torch.randint(0, rows, (1,), generator=g))
        w[r, :256] = 0.0  # an exact-zero super-block
        w[(r + 1) % rows, -256:] *= 1e-6  # a tiny-valued super-block
        w[(r + 2) % rows, 0:32] = -w[(r + 2) % rows, 0:32].abs()  # an all-negative block
        w[(r + 3) % rows, 7] = w.abs().max() * 20  # one huge outlier
    return w


def make_tiny(out: str | Path, *, layers: int = 3, heads: int = 2, head_dim: int = 128, text_dim: int = 256,
              seed: int = 0, variant: str = "qwen-image", shards: int = 2) -> Path:
    """Write a tiny trained-looking Qwen-Image in the official diffusers layout."""
    config = tiny_config(layers, heads, head_dim, text_dim, variant)
    shapes = qi.expected_shapes(config)
    tensors = {n: trained_like(n, s, seed).to(torch.bfloat16) for n, s in shapes.items()}
    return _write_diffusers(Path(out), config, tensors, shards, variant)


def make_tiny_single_file(out: str | Path, *, layers: int = 3, heads: int = 2, head_dim: int = 128,
                          text_dim: int = 256, seed: int = 0, variant: str = "qwen-image",
                          prefix: str = "") -> Path:
    """The same model as one ComfyUI-style .safetensors (Edit-2511 gets its marker tensor)."""
    config = tiny_config(layers, heads, head_dim, text_dim, variant)
    shapes = qi.expected_shapes(config, marker=variant == "edit-2511")
    tensors = {prefix + n: trained_like(n, s, seed).to(torch.bfloat16) for n, s in shapes.items()}
    from qconvert.core.io import write_safetensors

    out = Path(out)
    write_safetensors(out, tensors)
    return out


TINY_VAE = {"_class_name": "AutoencoderKLQwenImage", "base_dim": 16, "z_dim": 16, "dim_mult": [1, 1, 1, 1],
            "num_res_blocks": 1, "attn_scales": [], "temperal_downsample": [False, True, True],
            # Qwen/Qwen-Image vae/config.json's latent statistics
            "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715,
                             0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
            "latents_std": [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652,
                            1.5579, 1.6382, 1.1253, 2.8251, 1.916]}


def add_tiny_vae(repo: str | Path, *, seed: int = 0) -> Path:
    """Give a tiny diffusers repo a ``vae/``: diffusers' AutoencoderKLQwenImage at a tiny width, seeded
    random weights (its pictures are noise, but verify decodes them exactly as the real one).  Needs diffusers."""
    try:
        from diffusers import AutoencoderKLQwenImage
    except ImportError:
        raise QConvertError("make-tiny --vae: needs diffusers (pip install diffusers)") from None
    from qconvert.core.io import write_safetensors

    repo = Path(repo)
    if not (repo / "model_index.json").is_file():
        raise QConvertError(f"{repo}: not a diffusers repo (no model_index.json) to add a vae/ to")
    torch.manual_seed(seed)
    fields = {k: v for k, v in TINY_VAE.items() if not k.startswith("_")}
    state = AutoencoderKLQwenImage(**fields).state_dict()
    with atomic_directory(repo / "vae") as tmp:
        (tmp / "config.json").write_text(json.dumps(TINY_VAE, indent=2) + "\n")
        write_safetensors(tmp / "diffusion_pytorch_model.safetensors",
                          {k: v.contiguous() for k, v in sorted(state.items())})
    return repo / "vae"


def _shard_names(n: int) -> list[str]:
    return [f"diffusion_pytorch_model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _split(entries: list[tuple[str, str, tuple]], sizes: list[int], n: int) -> list[list[int]]:
    """Split in order into n shards of roughly equal bytes (at least one tensor each)."""
    total = sum(sizes)
    groups: list[list[int]] = [[] for _ in range(n)]
    acc = 0
    for i, size in enumerate(sizes):
        k = min(n - 1, acc * n // max(total, 1))
        k = max(k, min(n - 1, i - (len(sizes) - n)))  # leave enough tensors for the remaining shards
        groups[k].append(i)
        acc += size
    if any(not g for g in groups):
        raise QConvertError(f"cannot split {len(entries)} tensors into {n} shards")
    return groups


def _write_diffusers(out: Path, config: qi.QwenImageConfig, tensors: dict, shards: int,
                     variant: str = "qwen-image") -> Path:
    names = sorted(tensors)
    entries = [(n, TORCH_TO_DTYPE[tensors[n].dtype], tuple(tensors[n].shape)) for n in names]
    _, sizes = safetensors_header(entries)
    groups = _split(entries, sizes, shards)
    with atomic_directory(out, expected_bytes=sum(sizes) + 1024 * len(names)) as tmp:
        _write_folder_meta(tmp, config, names, groups, sum(sizes), variant)
        for shard, group in zip(_shard_names(shards), groups):
            sub = [entries[i] for i in group]
            with atomic_output(tmp / "transformer" / shard) as f:
                w = SafetensorsWriter(f, sub)
                for name, _, _ in sub:
                    w.write(name, tensors[name])
                w.close()
    return out


def _write_folder_meta(tmp: Path, config, names, groups, total, variant: str) -> None:
    (tmp / "transformer").mkdir(parents=True)
    index = {**MODEL_INDEX, "_class_name": PIPELINES[variant]}
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "transformer" / "config.json").write_text(json.dumps(config.to_json(), indent=2) + "\n")
    weight_map = {names[i]: shard for shard, group in zip(_shard_names(len(groups)), groups) for i in group}
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "transformer" / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def make_full_size_sparse(out: str | Path, *, variant: str = "qwen-image", shards: int = 9) -> Path:
    """The real 60-layer Qwen-Image layout, BF16 headers, data as file holes (reads as zeros)."""
    config = tiny_config(60, 24, 128, 3584, variant)
    shapes = qi.expected_shapes(config)
    names = list(shapes)
    entries = [(n, "BF16", shapes[n]) for n in names]
    _, sizes = safetensors_header(entries)
    groups = _split(entries, sizes, shards)
    out = Path(out)
    with atomic_directory(out, expected_bytes=16 * 1024 * 1024) as tmp:
        _write_folder_meta(tmp, config, names, groups, sum(sizes), variant)
        for shard, group in zip(_shard_names(shards), groups):
            sub = [entries[i] for i in group]
            header, _ = safetensors_header(sub)
            with open(tmp / "transformer" / shard, "wb") as f:
                f.write(header)
                f.truncate(safetensors_size(sub))  # the data: one hole, no disk blocks
    return out


# ------------------------------------------------------------------ LoRAs

# How each trainer/runtime names a module's LoRA tensors (fp8-lora-sampler.md §7.2):
# (up key, down key, alpha key) for a diffusers module name ``m`` and its flattened ``f``.
LORA_STYLES = {
    "lightx2v": lambda m, f: (f"{m}.lora_up.weight", f"{m}.lora_down.weight", f"{m}.alpha"),
    "peft": lambda m, f: (f"transformer.{m}.lora_B.weight", f"transformer.{m}.lora_A.weight",
                          f"transformer.{m}.alpha"),
    "peft-default": lambda m, f: (f"{m}.lora_B.default.weight", f"{m}.lora_A.default.weight", f"{m}.alpha"),
    "kohya": lambda m, f: (f"lora_unet_{f}.lora_up.weight", f"lora_unet_{f}.lora_down.weight",
                           f"lora_unet_{f}.alpha"),
    "comfy": lambda m, f: (f"diffusion_model.{m}.lora_up.weight", f"diffusion_model.{m}.lora_down.weight",
                           f"diffusion_model.{m}.alpha"),
    "ai-toolkit": lambda m, f: (f"diffusion_model.{m}.lora_B.weight", f"diffusion_model.{m}.lora_A.weight",
                                f"diffusion_model.{m}.alpha"),
}
# Lightning's targets: the 12 attention and MLP linears of every block (§7.1).
LIGHTNING_GROUPS = ("attn", "mlp")


def lora_targets(config: qi.QwenImageConfig, targets=None) -> list[str]:
    """Module names for ``targets``: module names as they are, role groups ("mod", "attn", ...) per block."""
    weights = [n for n in qi.expected_shapes(config) if n.endswith(".weight") and qi.is_known(n)]
    modules = []
    for target in targets or LIGHTNING_GROUPS:
        if target in qi.ROLE_GROUPS:
            roles = qi.ROLE_GROUPS[target]
            modules += [qi.describe(n).module for n in weights if qi.describe(n).role in roles]
        elif f"{target}.weight" in weights:
            modules.append(target)
        else:
            raise QConvertError(f"LoRA target {target!r} is neither a module of this model nor a role group "
                                f"({', '.join(sorted(qi.ROLE_GROUPS))})")
    return sorted(set(modules))


def make_tiny_lora(out: str | Path, model_dir_or_config, *, style: str = "lightx2v", rank: int = 4,
                   alpha: float | None = None, targets=None, seed: int = 0,
                   dtype: torch.dtype = torch.float32) -> Path:
    """A LoRA for a tiny (or any) Qwen-Image in one trainer's key style, with deterministic factors.

    ``alpha=None`` writes no ``.alpha`` keys (scale 1).  The factors are sized so
    that ``up @ down`` is a visible change of a trained-looking weight.
    """
    if style not in LORA_STYLES:
        raise QConvertError(f"unknown LoRA style {style!r} (choose from {', '.join(LORA_STYLES)})")
    config = model_dir_or_config
    if not isinstance(config, qi.QwenImageConfig):
        from qconvert.core.checkpoint import open_checkpoint

        config = open_checkpoint(config).config
    shapes = qi.expected_shapes(config)
    tensors = {}
    for module in lora_targets(config, targets):
        rows, cols = shapes[f"{module}.weight"]
        g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(module.encode())) % 2**63)
        up_key, down_key, alpha_key = LORA_STYLES[style](module, module.replace(".", "_"))
        tensors[down_key] = (torch.randn(rank, cols, generator=g) / cols ** 0.5).to(dtype)
        tensors[up_key] = (torch.randn(rows, rank, generator=g) * 0.1 / rank ** 0.5).to(dtype)
        if alpha is not None:
            tensors[alpha_key] = torch.tensor(float(alpha), dtype=dtype)
    from qconvert.core.io import write_safetensors

    out = Path(out)
    write_safetensors(out, tensors)
    return out
