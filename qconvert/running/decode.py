"""Pixels for verify: the reference repo's own VAE decodes both runs' latents.

Latent figures say how close two runs are; people judge images.  When the
reference is a diffusers repo with a ``vae/`` folder (or ``--vae DIR`` names
one), verify decodes the reference's and the output's final latents with
diffusers' ``AutoencoderKLQwenImage`` exactly as ``QwenImagePipeline`` does
(de-normalise with the config's ``latents_mean``/``latents_std``, decode one
frame, map [-1, 1] to [0, 1]) and reports pixel PSNR and SSIM, and LPIPS when
the ``lpips`` package and its network weights are already on the machine.

diffusers supplies only the architecture.  The folder is read as hostile
input by qconvert's own readers: ``config.json`` through the bounded JSON
reader with every field checked and bounded, the weights only from a checked
``.safetensors`` file (never a pickle).  Whatever is missing is said in the
report, never silently skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from qconvert.core import untrusted
from qconvert.core.checkpoint import read_json_file, read_safetensors_header, refuse_pickle
from qconvert.core.errors import CheckpointError

VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"
CONFIG_LIMITS = untrusted.Limits(objects=64, items=4096)
LATENT_CHANNELS = 16
# torchvision's AlexNet weights, which lpips.LPIPS(net="alex") loads from torch's hub cache
ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"


@dataclass(frozen=True)
class VaePlan:
    folder: Path | None
    why_not: str | None  # set when pixels will not be decoded


def find_vae(reference_path, vae_option, enabled: bool = True) -> VaePlan:
    """Where the VAE is, or why there will be no pixel figures."""
    if not enabled:
        return VaePlan(None, "--no-decode given")
    if vae_option is not None:
        folder = Path(vae_option)
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"--vae {folder}: no config.json there; give a diffusers vae/ folder")
    else:
        root = Path(reference_path) if reference_path is not None else None
        folder = None
        # a diffusers repo, or its transformer/ folder; a single file has no VAE beside it by convention
        candidates = [] if root is None or not root.is_dir() else [root / "vae"]
        if root is not None and root.name == "transformer":
            candidates.append(root.parent / "vae")
        for candidate in candidates:
            if (candidate / "config.json").is_file():
                folder = candidate
                break
        if folder is None:
            return VaePlan(None, "the reference has no vae/ folder; pass --vae DIR (a diffusers vae/ folder, "
                                 "e.g. from `hf download Qwen/Qwen-Image --include 'vae/*'`)")
    try:
        import diffusers  # noqa: F401  (the VAE's architecture)
    except ImportError:
        return VaePlan(None, "diffusers is not installed (pip install diffusers) to build the VAE")
    check_folder(folder)  # a broken VAE fails before any measuring, not after
    return VaePlan(folder, None)


def check_folder(folder: Path) -> tuple[dict, Path]:
    """The checked config and the weights file of a diffusers vae/ folder (never a pickle)."""
    config = _config(folder)
    weights = folder / VAE_WEIGHTS
    if not weights.is_file():
        for other in sorted(folder.iterdir()):
            refuse_pickle(other)
        raise CheckpointError(f"{folder}: no {VAE_WEIGHTS}")
    read_safetensors_header(weights)  # the library's rules and qconvert's bounds, before loading
    return config, weights


def _config(folder: Path) -> dict:
    """config.json's fields that shape the network, each checked and bounded before anything is built."""
    path = folder / "config.json"
    data = read_json_file(path, CONFIG_LIMITS)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: must be a JSON object")
    name = data.get("_class_name", "AutoencoderKLQwenImage")
    if name != "AutoencoderKLQwenImage":
        raise CheckpointError(f"{path}: a {untrusted.shown(name, 60)}, not the Qwen-Image VAE (AutoencoderKLQwenImage)")
    where = str(path)
    config = {
        "base_dim": untrusted.field_int(data, "base_dim", where, default=96, low=1, high=1024),
        "z_dim": untrusted.field_int(data, "z_dim", where, default=LATENT_CHANNELS, low=LATENT_CHANNELS,
                                     high=LATENT_CHANNELS),
        "num_res_blocks": untrusted.field_int(data, "num_res_blocks", where, default=2, low=1, high=8),
        "dim_mult": _ints(data, "dim_mult", where, [1, 2, 4, 4], 1, 16),
        "temperal_downsample": _bools(data, "temperal_downsample", where, [False, True, True]),
        "attn_scales": _numbers(data, "attn_scales", where, [], 0, 8),
        "latents_mean": _numbers(data, "latents_mean", where, None, LATENT_CHANNELS, LATENT_CHANNELS),
        "latents_std": _numbers(data, "latents_std", where, None, LATENT_CHANNELS, LATENT_CHANNELS),
    }
    if len(config["temperal_downsample"]) != len(config["dim_mult"]) - 1:
        raise CheckpointError(f"{where}: temperal_downsample needs one entry fewer than dim_mult")
    if any(s <= 0 for s in config["latents_std"]):
        raise CheckpointError(f"{where}: latents_std must be positive")
    return config


def _list(data: dict, key: str, where: str, default, lo: int, hi: int) -> list:
    value = data.get(key, default)
    if value is None:
        raise CheckpointError(f"{where}: {key} is missing")
    if not isinstance(value, list) or not lo <= len(value) <= hi:
        raise CheckpointError(f"{where}: {key} must be a list of {lo} to {hi} items")
    return value


def _ints(data, key, where, default, lo, hi) -> list[int]:
    value = _list(data, key, where, default, 1, 8)
    if any(type(v) is not int or not lo <= v <= hi for v in value):
        raise CheckpointError(f"{where}: {key} must hold integers from {lo} to {hi}")
    return value


def _bools(data, key, where, default) -> list[bool]:
    value = _list(data, key, where, default, 0, 8)
    if any(type(v) is not bool for v in value):
        raise CheckpointError(f"{where}: {key} must hold true/false values")
    return value


def _numbers(data, key, where, default, lo, hi) -> list[float]:
    value = _list(data, key, where, default, lo, hi)
    if any(type(v) not in (int, float) for v in value):
        raise CheckpointError(f"{where}: {key} must hold numbers")
    return [float(v) for v in value]


class Decoder:
    """The reference's VAE, built once; ``pixels(latents)`` as QwenImagePipeline decodes them."""

    def __init__(self, folder: Path, *, device: str | torch.device = "cpu"):
        from diffusers import AutoencoderKLQwenImage
        from safetensors.torch import load_file

        config, weights = check_folder(folder)
        self.vae = AutoencoderKLQwenImage(**config).eval().to(device)
        state = load_file(weights, device=str(device))
        try:
            self.vae.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(f"{weights}: does not fit its config.json ({untrusted.shown(first, 200)})") from None
        self.mean = torch.tensor(config["latents_mean"]).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(config["latents_std"]).view(1, -1, 1, 1, 1)

    @torch.no_grad()
    def pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """[16, H/8, W/8] normalised latent channels -> [3, H, W] pixels in [0, 1]."""
        param = next(self.vae.parameters())
        z = latents[None, :, None].to(param)
        z = z * self.std.to(param) + self.mean.to(param)
        image = self.vae.decode(z, return_dict=False)[0][:, :, 0]
        return (image[0].float().cpu() / 2 + 0.5).clamp(0, 1)


def lpips_model():
    """(an LPIPS network, None), or (None, why not): only when lpips and its weights are already here."""
    try:
        import lpips
    except ImportError:
        return None, "the lpips package is not installed"
    weights = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_WEIGHTS
    if not weights.is_file():
        return None, f"LPIPS's AlexNet weights are not in torch's hub cache ({weights}); verify downloads nothing"
    return lpips.LPIPS(net="alex", verbose=False).eval(), None


def lpips_distance(model, x: torch.Tensor, ref: torch.Tensor) -> float:
    """LPIPS between [3, H, W] images in [0, 1] (the network takes [-1, 1])."""
    with torch.no_grad():
        return float(model(x[None] * 2 - 1, ref[None] * 2 - 1).flatten()[0])
