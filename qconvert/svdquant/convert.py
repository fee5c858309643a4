"""``qconvert to-svdquant``: Nunchaku INT4/NVFP4 files, one block in memory at a time.

Data flow: source (through ``--lora``: baked at full precision before any
smoothing) → activation statistics (a ``calibrate`` file, or a short run on
synthetic prompts, said so) → per block: fuse, search the smoothing, SVD,
quantize, pack (``algorithm``, ``layout``) → one safetensors file (Nunchaku
layout) or a diffusers transformer folder, written atomically against an
exact plan.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import QConvertError
from ..io import SafetensorsWriter, atomic_directory, atomic_output, safetensors_size
from ..models import qwen_image as qi
from ..pipeline import parse_device, progress, provenance, provenance_json
from . import algorithm, layout, quant

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


# ----------------------------------------------------------- calibration

def block_stat_modules(config) -> list[str]:
    """The modules whose input statistics SVDQuant needs (one per W4A4 group)."""
    return [f"transformer_blocks.{i}.{g.sources[0]}" for i in range(config.num_layers)
            for g in layout.GROUPS if g.kind == "svdq"]


def _synthetic_options(o: SvdqOptions, device: str):
    from ..verify.commands import SampleOptions

    return SampleOptions(height=o.calib_size, width=o.calib_size, steps=o.calib_steps, cfg=1.0,
                         schedule="lightning", seed=o.seed, device=device)


def calibration_info(o: SvdqOptions, device: str, *, dry_run: bool = False) -> dict:
    """What the statistics are, for the metadata: known before they are gathered, so plans are exact."""
    from ..io import file_sha256

    if o.calib:
        return {"file": Path(o.calib).name, "sha256": "0" * 64 if dry_run else file_sha256(o.calib)}
    return {"synthetic": {**_synthetic_options(o, device).to_json(), "prompts": o.calib_prompts,
                          "keep_rows": o.keep_rows}}


def calibration(source, o: SvdqOptions, device: str, echo) -> dict:
    """{module: Stat} from --calib, or from a short run on synthetic prompts (said so)."""
    from ..calibrate.stats import read_stats

    modules = block_stat_modules(source.config)
    if o.calib:
        return read_stats(o.calib, source, modules)
    from ..calibrate.run import collect

    echo(f"no --calib: calibrating on {o.calib_prompts} synthetic prompt(s) x {o.calib_steps} Lightning steps at "
         f"{o.calib_size}x{o.calib_size} first (for release files, run `qconvert calibrate` with real prompt "
         "embeddings and pass --calib)")
    stats, _ = collect(source, _synthetic_options(o, device), [], o.calib_prompts, keep_rows=o.keep_rows,
                       echo=echo)
    missing = next((m for m in modules if m not in stats), None)
    if missing:  # pragma: no cover - the recording provider sees every linear
        raise QConvertError(f"calibration recorded nothing for {missing}")
    return {m: stats[m] for m in modules}


# ------------------------------------------------------------ encode

def quantize_block(source, index: int, stats: dict, o: SvdqOptions, device: torch.device) -> tuple[dict, list]:
    """{stored name: tensor} of one block, and one line of findings per W4A4 group."""
    p = f"transformer_blocks.{index}."
    out, found = {}, []
    lowrank = o.lora_mode == "lowrank"
    for group in layout.GROUPS:
        # lowrank: the W4A4 layers are quantized from the base weights, their LoRAs appended below
        load = source.source.load if lowrank and group.kind == "svdq" else source.load
        weights = [load(f"{p}{s}.weight").to(device, torch.float32) for s in group.sources]
        biases = [source.load(f"{p}{s}.bias").to(device, torch.float32) for s in group.sources]
        w, b = torch.cat(weights), torch.cat(biases)
        del weights, biases
        if group.kind == "awq":
            codes, scales, zeros = quant.awq_weight(w)
            tensors = layout.awq_tensors(codes.cpu(), scales.cpu(), zeros.cpu(), b.cpu(), o.layout)
            out.update({f"{p}{group.name}.{k}": v for k, v in tensors.items()})
            continue
        stat = stats[p + group.sources[0]]
        shift = algorithm.GELU_SHIFT if group.mlp_down and o.precision == "int4" and o.layout == "nunchaku" else 0.0
        parts = tuple(int(source.shapes()[f"{p}{s}.weight"][0]) for s in group.sources)
        choice = algorithm.search(w, b, stat.rows.to(device), stat.absmax.to(device), precision=o.precision,
                                  rank=o.rank, shift=shift, parts=parts if group.fused else None, grid=o.grid,
                                  seed=o.seed + index)
        layer = _to_cpu(choice.layer)
        if lowrank:
            from .lora import append, lora_factors

            loras = [lora_factors(source, p + s, "cpu") for s in group.sources]
            down, up = append(layer.down, layer.up, loras, list(parts), o.file_rank)
            layer.down, layer.up = down.to(torch.bfloat16), up.to(torch.bfloat16)
        if o.layout == "diffusers" and group.fused:
            starts = [0]
            for n in parts:
                starts.append(starts[-1] + n)
            for src, a, z in zip(group.sources, starts, starts[1:]):
                tensors = layout.module_tensors(layer, o.layout, False, slice(a, z))
                out.update({f"{p}{src}.{k}": v for k, v in tensors.items()})
        else:
            tensors = layout.module_tensors(layer, o.layout, group.fused)
            out.update({f"{p}{group.name}.{k}": v for k, v in tensors.items()})
        found.append({"module": p + group.name, "alpha": choice.alpha, "beta": choice.beta,
                      "error": choice.error, "plain_error": choice.plain_error})
    for name in layout.KEPT_BLOCK_TENSORS:
        out[p + name] = source.load(p + name).to(torch.bfloat16)
    return out, found


def _to_cpu(layer: algorithm.LogicalLayer) -> algorithm.LogicalLayer:
    """The layer's stored fields on the CPU; the search's cached residual stays behind."""
    return layer.copy(**{k: v.cpu() for k, v in vars(layer).items() if isinstance(v, torch.Tensor)
                         and k != "dequantized"})


def write_svdquant(source, o: SvdqOptions, meta, stats, target: Path, *, device, quiet, echo) -> list:
    """Stream the blocks into ``target``; returns every W4A4 group's findings."""
    layers, shapes = source.config.num_layers, source.shapes()
    entries = plan_entries(source, o)
    size = safetensors_size(entries, meta)
    found: list = []

    def encode(f) -> None:
        writer = SafetensorsWriter(f, entries, meta)
        for name in top_level_names(source):
            writer.write(name, source.load(name).to(torch.bfloat16))
        start = time.monotonic()
        with progress(layers, f"to-svdquant {target.name}", quiet=quiet, unit="block") as bar:
            for i in range(layers):
                block, notes = quantize_block(source, i, stats, o, device)
                found.extend(notes)
                for name, _, _ in layout.block_entries(o.layout, o.precision, o.file_rank, shapes, i):
                    writer.write(name, block.pop(name))
                del block
                bar.update(1)
                if i == 0 and layers > 1 and not quiet:
                    took = time.monotonic() - start
                    echo(f"  block 1/{layers} took {took:.1f} s; about {took * layers / 60:.1f} min in all")
        writer.close()

    if o.layout == "nunchaku":
        with atomic_output(target, expected_bytes=size) as f:
            encode(f)
    else:
        with atomic_directory(target, expected_bytes=size + 65536) as tmp:
            config = {**source.config.to_json(), "quantization_config": quantization_config(o, source.config)}
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            with open(tmp / DIFFUSERS_WEIGHTS, "wb") as f:
                encode(f)
                f.flush()
                os.fsync(f.fileno())
    return found


def convert(source, output=None, options: SvdqOptions = SvdqOptions(), *, device: str = "cpu",
            dry_run: bool = False, quiet: bool = False, echo: Callable[[str], None] = print) -> dict:
    """Plan, then (unless ``dry_run``) calibrate if needed and write; returns the report."""
    check_options(source, options)
    dev = parse_device(device)
    if options.lora_mode == "lowrank":
        from dataclasses import replace

        from .lora import total_rank

        options = replace(options, stored_rank=total_rank(source, options.rank, source.config.num_layers))
    target = output_path(source, options, output)
    if options.calib:
        from ..calibrate.stats import read_stats

        read_stats(options.calib, source, block_stat_modules(source.config))  # a wrong file fails before any work
    meta = metadata(source, options, calibration_info(options, device, dry_run=dry_run), dry_run=dry_run)
    entries = plan_entries(source, options)
    result = {"command": "to-svdquant", "output": str(target), "format": f"svdquant-{options.layout}",
              **options.to_json(), "tensor_count": len(entries), "bytes": safetensors_size(entries, meta),
              "written": False, "variant": source.variant, "calibration": "file" if options.calib else "synthetic"}
    if dry_run:
        return result
    start = time.monotonic()
    say = echo if not quiet else (lambda m: None)
    say(f"to-svdquant: {source.config.num_layers} blocks x 8 W4A4 layers x "
        f"{len(algorithm.candidates(options.grid))} smoothing candidates each (an SVD and a 4-bit quantization "
        f"per candidate), on {dev}; the time per block follows the first")
    stats = calibration(source, options, device, say)
    found = write_svdquant(source, options, meta, stats, target, device=dev, quiet=quiet, echo=echo)
    written = target if options.layout == "nunchaku" else target / DIFFUSERS_WEIGHTS
    if written.stat().st_size != result["bytes"]:  # pragma: no cover - the writer checks every tensor
        raise RuntimeError(f"{written}: wrote {written.stat().st_size} bytes, planned {result['bytes']}")
    n = max(len(found), 1)
    result.update(written=True, seconds=round(time.monotonic() - start, 1), layers=found,
                  mean_layer_error=sum(r["error"] for r in found) / n,
                  mean_plain_error=sum(r["plain_error"] for r in found) / n)
    return result


# ---------------------------------------------------------------- report

def load_hints(r: dict) -> list[str]:
    """Where the output loads, and what it needs there."""
    out = r["output"]
    tag = "INT4 runs on RTX 20/30/40 (sm_75-89)" if r["precision"] == "int4" else "NVFP4 runs on RTX 50 (sm_120)"
    if r["layout"] == "nunchaku":
        lines = [f"ComfyUI-nunchaku: put it in ComfyUI/models/diffusion_models/ and use Nunchaku Qwen-Image DiT "
                 f"Loader; {tag}; not on Hopper (H100/H200)",
                 f"nunchaku: NunchakuQwenImageTransformer2DModel.from_pretrained('{out}'), then "
                 "QwenImagePipeline.from_pretrained('Qwen/Qwen-Image', transformer=transformer)"]
    else:
        lines = [f"diffusers: QwenImageTransformer2DModel.from_pretrained('{out}', torch_dtype=torch.bfloat16) "
                 "(quant_method nunchaku_lite: pip install kernels, DIFFUSERS_TRUST_REMOTE_KERNELS=true); "
                 f"{tag}; not on Hopper"]
    if r["variant"] == "qwen-image-edit-2511":
        lines.append("Edit-2511 (zero_cond_t): diffusers' QwenImageTransformer2DModel runs it; ComfyUI-nunchaku "
                     "does not handle the index_timestep_zero reference method (its PR #790 was not merged): "
                     "check your nunchaku version before relying on it")
    lines.append(f"check it without a GPU: qconvert verify {out} --reference SOURCE --report DIR")
    return lines


def format_report(r: dict) -> str:
    head = (f"{r['format']} {r['precision']} rank {r['rank']} ({r['variant']}), calibration: "
            f"{r['calibration']}, smoothing grid {r['grid']}")
    lines = [head, f"  {r['tensor_count']} tensors, {r['bytes']:,} bytes ({r['bytes'] / 1e9:.2f} GB)"]
    if not r["written"]:
        return "\n".join(lines + ["dry run: nothing written"])
    lines.append(f"  layer output error on the calibration rows: {r['mean_layer_error']:.3g} mean (plain 4-bit "
                 f"rounding: {r['mean_plain_error']:.3g}), in {r['seconds']} s")
    lines.append(f"wrote {r['output']}")
    return "\n".join(lines + ["  " + h for h in load_hints(r)])


# ------------------------------------------------------------------ demo

def demo_step(model: Path, out: Path, quiet: bool, echo: Callable[[str], None]) -> list[Path]:
    """``qconvert demo``: an INT4 rank-16 Nunchaku file of the tiny model (a quick search), and where it loads."""
    from ..checkpoint import open_checkpoint

    source = open_checkpoint(model)
    options = SvdqOptions("int4", 16, grid=4, calib_prompts=1, calib_steps=2, calib_size=128)
    r = convert(source, Path(out) / default_name(source, options), options, quiet=True)
    echo(f"svdquant        {r['output']}  (INT4 rank 16, {r['bytes']:,} bytes; layer error {r['mean_layer_error']:.2g} "
         f"vs plain 4-bit {r['mean_plain_error']:.2g})")
    echo(f"                {load_hints(r)[0]}")
    return [Path(r["output"])]
