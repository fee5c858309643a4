"""The SVDQuant search, block by block: the statistics it needs (a calibration file, or a short run on
synthetic prompts) and, per W4A4 group, the smoothing search, SVD and 4-bit quantization (``algorithm``)."""

from __future__ import annotations

from pathlib import Path

import torch

from qconvert.codecs.svdquant import algorithm, quant
from qconvert.core.errors import QConvertError
from qconvert.formats.svdquant import layout
from qconvert.formats.svdquant.plan import SvdqOptions


def block_stat_modules(config) -> list[str]:
    """The modules whose input statistics SVDQuant needs (one per W4A4 group)."""
    return [f"transformer_blocks.{i}.{g.sources[0]}" for i in range(config.num_layers)
            for g in layout.GROUPS if g.kind == "svdq"]


def _synthetic_options(o: SvdqOptions, device: str):
    from qconvert.running.sample import SampleOptions

    return SampleOptions(height=o.calib_size, width=o.calib_size, steps=o.calib_steps, cfg=1.0,
                         schedule="lightning", seed=o.seed, device=device)


def calibration_info(o: SvdqOptions, device: str, *, dry_run: bool = False) -> dict:
    """What the statistics are, for the metadata: known before they are gathered, so plans are exact."""
    from qconvert.core.io import file_sha256

    if o.calib:
        return {"file": Path(o.calib).name, "sha256": "0" * 64 if dry_run else file_sha256(o.calib)}
    return {"synthetic": {**_synthetic_options(o, device).to_json(), "prompts": o.calib_prompts,
                          "keep_rows": o.keep_rows}}


def calibration(source, o: SvdqOptions, device: str, echo) -> dict:
    """{module: Stat} from --calib, or from a short run on synthetic prompts (said so)."""
    from qconvert.formats.calibration import read_stats

    modules = block_stat_modules(source.config)
    if o.calib:
        return read_stats(o.calib, source, modules)
    from qconvert.running.calibrate import collect

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
            from qconvert.formats.svdquant.lora_branch import append, lora_factors

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
