"""The SVDQuant file's plan: its options, names, exact tensor list and metadata (spec svdquant.md §3-§5).

``plan_entries`` is what both the writer (``converters.svdquant``) and the strict reader (``file``) hold a
file to, so a file qconvert writes is by construction one it reads back.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from qconvert.core.errors import QConvertError
from qconvert.core.models import qwen_image as qi
from qconvert.core.pipeline import provenance, provenance_json
from qconvert.formats.svdquant import layout

RANKS_LIMIT = 1024  # Nunchaku's MAX_RANK
PRECISION_TAGS = {"int4": "int4", "nvfp4": "fp4"}
WEIGHT_CONFIG = {"int4": {"dtype": "int4", "scale_dtype": None, "group_size": 64},
                 "nvfp4": {"dtype": "fp4_e2m1_all", "scale_dtype": [None, "fp8_e4m3_nan"], "group_size": 16}}
ACTIVATION_CONFIG = {"int4": {"dtype": "int4", "scale_dtype": None, "group_size": 64},
                     "nvfp4": {"dtype": "fp4_e2m1_all", "scale_dtype": "fp8_e4m3_nan", "group_size": 16}}
NUNCHAKU_MODEL_CLASS = "NunchakuQwenImageTransformer2DModel"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


@dataclass
class SvdqOptions:
    precision: str = "int4"
    rank: int = 32
    layout: str = "nunchaku"
    grid: int = 20  # DeepCompressor's num_grids: 2·(grid − 1) + 1 smoothing candidates per layer
    calib: Path | None = None
    calib_prompts: int = 2  # without --calib: synthetic prompts, steps and size of the short calibration
    calib_steps: int = 4
    calib_size: int = 512
    keep_rows: int = 64
    seed: int = 0
    lora_mode: str = "bake"  # "lowrank": LoRAs appended to the low-rank branch
    stored_rank: int | None = None  # the file's rank: the base plus LoRA ranks in lowrank mode

    @property
    def file_rank(self) -> int:
        return self.stored_rank or self.rank

    def to_json(self) -> dict:
        return {"precision": self.precision, "rank": self.file_rank, "base_rank": self.rank, "layout": self.layout,
                "grid": self.grid, "calib": str(self.calib) if self.calib else None, "seed": self.seed,
                "lora_mode": self.lora_mode}


def check_options(source, o: SvdqOptions) -> None:
    if o.precision not in layout.PRECISIONS:
        raise QConvertError(f"--precision {o.precision}: choose int4 or nvfp4")
    if o.layout not in layout.LAYOUTS:
        raise QConvertError(f"--layout {o.layout}: choose nunchaku or diffusers")
    config = source.config
    if config.use_layer3d_rope or config.use_additional_t_cond:
        raise QConvertError(f"{source.path}: a Qwen-Image-Layered model; Nunchaku has no Layered model class")
    if source.extra:
        raise QConvertError(f"{source.path}: tensor {sorted(source.extra)[0]} is not part of Qwen-Image; "
                            "Nunchaku's loaders are strict, so an SVDQuant file cannot carry it")
    if o.rank % 16 or not 16 <= o.rank <= min(RANKS_LIMIT, config.inner_dim):
        raise QConvertError(f"--rank {o.rank}: give a multiple of 16 from 16 to {min(RANKS_LIMIT, config.inner_dim)} "
                            "(Nunchaku's low-rank tiles are 16 wide; the rank cannot exceed the layer's width)")
    if config.inner_dim % 128:
        raise QConvertError(f"{source.path}: inner dim {config.inner_dim} is not a multiple of 128 (Nunchaku's tiles)")
    if not 2 <= o.grid <= 100:
        raise QConvertError(f"--grid {o.grid}: give 2 to 100 (DeepCompressor uses 20)")
    if o.lora_mode not in ("bake", "lowrank"):
        raise QConvertError(f"--lora-mode {o.lora_mode}: choose bake or lowrank")
    if o.lora_mode == "lowrank" and not hasattr(source, "patches_for"):
        raise QConvertError("--lora-mode lowrank: give the LoRAs to append with --lora")


def default_name(source, o: SvdqOptions) -> str:
    """Nunchaku's naming: ``svdq-{int4|fp4}_r{rank}-<model>`` (the loader checks the precision in it)."""
    stem = f"svdq-{PRECISION_TAGS[o.precision]}_r{o.file_rank}-{source.name}"
    return stem + (".safetensors" if o.layout == "nunchaku" else "")


def output_path(source, o: SvdqOptions, output) -> Path:
    if output is None:
        return Path(default_name(source, o))
    out = Path(output)
    if out.is_dir() and o.layout == "nunchaku" or str(output).endswith(("/", os.sep)):
        return out / default_name(source, o)
    if o.layout == "nunchaku" and out.suffix.lower() != ".safetensors":
        raise QConvertError(f"{out}: give the output a .safetensors name (Nunchaku loads safetensors only)")
    return out


# ------------------------------------------------------------------ plan

def top_level_names(source) -> list[str]:
    """The BF16 tensors outside the blocks (markers are not model weights; Nunchaku's loader is strict)."""
    return sorted(n for n in source.tensors if qi.is_known(n) and qi.describe(n).block is None
                  and qi.describe(n).role is not qi.Role.MARKER)


def plan_entries(source, o: SvdqOptions) -> list[tuple[str, str, tuple]]:
    shapes = source.shapes()
    entries = [(n, "BF16", tuple(shapes[n])) for n in top_level_names(source)]
    for i in range(source.config.num_layers):
        entries += layout.block_entries(o.layout, o.precision, o.file_rank, shapes, i)
    return entries


def quantization_config(o: SvdqOptions, config) -> dict:
    if o.layout == "nunchaku":
        return {"method": "svdquant", "weight": WEIGHT_CONFIG[o.precision],
                "activation": ACTIVATION_CONFIG[o.precision], "rank": o.file_rank}
    targets = {"svdq": [], "awq": []}
    for i in range(config.num_layers):
        for stored, group, _ in layout.stored_modules("diffusers"):
            targets[group.kind].append(f"transformer_blocks.{i}.{stored}")
    return {"quant_method": "nunchaku_lite", "compute_dtype": "bfloat16",
            "svdq_w4a4": {"precision": o.precision, "group_size": WEIGHT_CONFIG[o.precision]["group_size"],
                          "rank": o.file_rank, "targets": targets["svdq"]},
            "awq_w4a16": {"precision": "int4", "group_size": 64, "targets": targets["awq"]}}


def metadata(source, o: SvdqOptions, calib_info: dict, *, dry_run: bool = False) -> dict:
    info = provenance(source, fmt=f"svdquant-{o.layout}", options={**o.to_json(), "calibration": calib_info},
                      dry_run=dry_run)
    meta = {"qconvert": provenance_json(info)}
    if o.layout == "nunchaku":
        meta.update({"config": json.dumps(source.config.to_json()), "comfy_config": "{}",
                     "model_class": NUNCHAKU_MODEL_CLASS,
                     "quantization_config": json.dumps(quantization_config(o, source.config))})
    return meta
