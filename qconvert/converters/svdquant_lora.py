"""LoRAs in the low-rank branch of SVDQuant layers, instead of merged before quantizing.

The W4A4 kernels run ``(x·proj_downᵀ)·proj_upᵀ`` on the raw input, so a
LoRA's ``B·A`` joins the branch exactly: ``down = [down; s·A]``, ``up = [up,
B]`` (spec svdquant.md §6.1), no smoothing or shift correction needed.  For a
fused q/k/v the A's are stacked and B is block-diagonal.  The rank is global
in a file, so every layer is padded with zero columns to the largest total,
rounded up to a multiple of 16.

Two uses:

* ``to-svdquant --lora-mode lowrank``: the base is quantized (smoothing and
  SVD see the base weights), each LoRA appended; LoRA parts on the
  modulation layers (no low-rank branch: AWQ W4A16) and biases are merged
  before those are quantized;
* ``bake-lora`` on an existing SVDQuant file: the LoRA appended, then the
  branch recompressed to the file's rank (or ``--rank``) by an exact SVD of
  its small core, the modulation layers dequantized, merged and
  requantized.  No BF16 original is needed; verify measures what the
  truncation costs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qconvert.codecs.svdquant import packing
from qconvert.codecs.svdquant.quant import awq_weight
from qconvert.core.errors import QConvertError
from qconvert.core.io import SafetensorsWriter, atomic_directory, atomic_output, safetensors_size
from qconvert.core.lora import with_loras
from qconvert.core.models import qwen_image as qi
from qconvert.core.pipeline import progress, provenance_json
from qconvert.core.untrusted import load_json
from qconvert.formats.svdquant import layout
from qconvert.formats.svdquant.file import META_LIMITS, ConfigShapes, SVDQuantFile
from qconvert.formats.svdquant.lora_branch import MAX_RANK, append, lora_factors, lora_rank, recompress, total_rank  # noqa: F401 - bake-lora's names
from qconvert.formats.svdquant.plan import (
    DIFFUSERS_WEIGHTS,
    SvdqOptions,
    plan_entries,
    quantization_config,
    top_level_names,
)

# ------------------------------------------------- into an existing file

class _ModelShapes:
    """What LoRA key resolution needs from a model: its tensor names and shapes (from a config)."""

    def __init__(self, config, path):
        self.config, self.path = config, path
        self._shapes = qi.expected_shapes(config)

    def shapes(self) -> dict:
        return dict(self._shapes)

    def names(self) -> list[str]:
        return list(self._shapes)

    def provenance(self, *, dry_run: bool = False) -> dict:
        return {"source": str(self.path)}

    def close(self) -> None:
        pass


def bake_into_file(path, specs, output, *, rank: int | None = None, ignore_unmatched: bool = False,
                   quiet: bool = False) -> dict:
    """Bake LoRAs into an SVDQuant file: appended to each low-rank branch, recompressed to ``rank``."""
    f = SVDQuantFile(path)
    o = f.options
    rank = rank or o.rank
    if rank % 16 or not 16 <= rank <= min(MAX_RANK, f.config.inner_dim):
        raise QConvertError(f"--rank {rank}: give a multiple of 16 from 16 to {min(MAX_RANK, f.config.inner_dim)}")
    out_options = SvdqOptions(o.precision, rank, o.layout)
    view = with_loras(_ModelShapes(f.config, path), specs, ignore_unmatched=ignore_unmatched)
    entries = plan_entries(ConfigShapes(f.config), out_options)
    meta = _baked_metadata(f, view, out_options)
    target = Path(output)

    def merged(name: str, tensor: torch.Tensor) -> torch.Tensor:
        patches = view.patches_for(name)
        if not patches:
            return tensor
        t = tensor.float()
        for lora, patch in patches:
            t = t + lora.delta(patch, torch.device("cpu")).reshape(t.shape)
        return t.to(tensor.dtype)

    def encode(fh) -> None:
        writer = SafetensorsWriter(fh, entries, meta)
        for name in top_level_names(ConfigShapes(f.config)):
            writer.write(name, merged(name, f._read(name)))
        with progress(f.config.num_layers, f"bake-lora {target.name}", quiet=quiet, unit="block") as bar:
            for i in range(f.config.num_layers):
                block = _bake_block(f, view, i, rank, merged)
                for name, _, _ in layout.block_entries(o.layout, o.precision, rank, ConfigShapes(f.config).shapes(), i):
                    writer.write(name, block.pop(name))
                bar.update(1)
        writer.close()

    size = safetensors_size(entries, meta)
    if o.layout == "nunchaku":
        with atomic_output(target, expected_bytes=size) as fh:
            encode(fh)
    else:
        config = json.loads((f.path / "config.json").read_text())
        config["quantization_config"]["svdq_w4a4"]["rank"] = rank
        with atomic_directory(target, expected_bytes=size + 65536) as tmp:
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            with open(tmp / DIFFUSERS_WEIGHTS, "wb") as fh:
                encode(fh)
    f.close()
    view.close()
    return {"command": "bake-lora", "input": str(path), "output": str(target), "format": f"svdquant-{o.layout}",
            "precision": o.precision, "rank": rank, "bytes": size,
            "provenance": json.loads(meta["qconvert"]) if "qconvert" in meta else None}


def _baked_metadata(f, view, options) -> dict:
    meta = dict(f.header.metadata or {})
    record = {"tool": "qconvert", "format": f"svdquant-{options.layout}", "baked_into": f.path.name,
              "loras": [lora.record() for lora in view.loras], "rank": options.rank}
    if "qconvert" in meta:
        try:
            record["input"] = load_json(meta["qconvert"].encode(), str(f.path), META_LIMITS)
        except QConvertError:  # a foreign provenance string is left out, not trusted
            record["input"] = None
    meta["qconvert"] = provenance_json(record)
    if options.layout == "nunchaku":
        meta["quantization_config"] = json.dumps(quantization_config(options, f.config))
    return meta


def _bake_block(f, view, index: int, rank: int, merged) -> dict:
    """One block of an SVDQuant file with the LoRAs baked in, as stored tensors."""
    p = f"transformer_blocks.{index}."
    shapes = qi.expected_shapes(f.config)
    out = {}
    for stored, group, part in layout.stored_modules(f.options.layout):
        prefix = f"{p}{stored}."
        tensors = f._module(prefix)
        sources = group.sources if part < 0 else (group.sources[part],)
        touched = any(view.patches_for(f"{p}{s}.{k}") for s in sources for k in ("weight", "bias"))
        if group.kind == "awq" and not touched:
            new = tensors  # no LoRA here: the stored bytes, not a second rounding
        elif group.kind == "awq":
            w, b = layout.awq_logical(tensors, f.options.layout)
            w, b = merged(p + sources[0] + ".weight", w), merged(p + sources[0] + ".bias", b)
            codes, scales, zeros = awq_weight(w)
            new = layout.awq_tensors(codes, scales, zeros, b, f.options.layout)
        else:
            new = dict(tensors)
            down = packing.unpack_lowrank(tensors["proj_down"], down=True)
            up = packing.unpack_lowrank(tensors["proj_up"], down=False)
            pairs = [lora_factors(view, p + s, "cpu") for s in sources]
            rows = [shapes[f"{p}{s}.weight"][0] for s in sources]
            if any(pairs) or rank != down.shape[0]:
                down, up = append(down, up, pairs, rows, down.shape[0] + sum(a.shape[0] for ps in pairs
                                                                               for a, _ in ps))
                down, up = recompress(down, up, rank)
                new["proj_down"] = packing.pack_lowrank(down.to(torch.bfloat16), down=True)
                new["proj_up"] = packing.pack_lowrank(up.to(torch.bfloat16), down=False)
            bias = packing.unpack_vector(tensors["bias"]).float()
            parts = torch.split(bias, rows)
            bias = torch.cat([merged(p + s + ".bias", b) for s, b in zip(sources, parts)])
            new["bias"] = packing.pack_vector(bias.to(torch.bfloat16))
        out.update({prefix + k: v for k, v in new.items()})
    for name in layout.KEPT_BLOCK_TENSORS:
        out[p + name] = merged(p + name, f._read(p + name))
    return out
