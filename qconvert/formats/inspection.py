"""``qconvert inspect``: what a checkpoint or an output file contains."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from qconvert.codecs.comfyui import registry
from qconvert.core.checkpoint import COMFY_PREFIXES, open_checkpoint, read_safetensors_header, refuse_pickle
from qconvert.core.errors import CheckpointError
from qconvert.core.models import qwen_image as qi
from qconvert.core.untrusted import shown
from qconvert.formats import bfl
from qconvert.formats.comfyui.fp8 import is_aux_name
from qconvert.formats.comfyui.loader import FP8File
from qconvert.formats.opener import detect


def inspect_path(path: str | Path) -> dict:
    """A JSON-able summary of any input or output qconvert knows."""
    p = Path(path)
    kind = detect(p)
    if kind == "svdquant":
        return _inspect_svdquant(p)
    if kind == "gguf":
        return _inspect_gguf(p)
    if kind == "safetensors":
        return _inspect_safetensors(p)
    refuse_pickle(p)
    ckpt = open_checkpoint(path, allow_extra=True)
    summary = _summary(str(ckpt.path), ckpt.layout, "safetensors",
                       {n: (t.dtype, t.shape, t.nbytes) for n, t in ckpt.tensors.items()},
                       ckpt.metadata, sum(f.stat().st_size for f in ckpt.files()), config=ckpt.config.to_json(),
                       extra=ckpt.extra)
    # Edit and Edit-2509 read as Qwen-Image by their weights; their pipeline says otherwise, and it decides
    # how qconvert measures them (beside a reference image)
    return {**summary, "pipeline": ckpt.pipeline, "edit": ckpt.edits}


def _inspect_safetensors(path: Path) -> dict:
    header = read_safetensors_header(path)
    prefix = next((p for p in COMFY_PREFIXES if any(k.startswith(p) for k in header.tensors)), "")
    tensors = {k[len(prefix):]: (m.dtype, m.shape, m.nbytes)
               for k, m in header.tensors.items() if k.startswith(prefix)}
    fmt = "safetensors"
    if not prefix and bfl.is_bfl(header.tensors) and not any(n.endswith(".comfy_quant") for n in tensors):
        return _inspect_bfl(path, header)
    if any(n.endswith(".comfy_quant") for n in tensors):
        fmt = "safetensors, ComfyUI per-layer quantized (comfy_quant)"
    elif "scaled_fp8" in tensors:
        fmt = "safetensors, legacy scaled fp8"
    elif tensors and all(d.startswith("F8_") for n, (d, _, _) in tensors.items() if n != qi.MARKER_EDIT_2511):
        fmt = "safetensors, plain fp8 cast"
    counts = None
    if fmt != "safetensors":
        suffixes = ("weight", *registry.stored_suffixes())
        with FP8File(path) as f:  # every layer config and scale read and checked
            counts = f.format_counts()
            for name, (dtype, shape, nbytes) in list(tensors.items()):
                config = f.layer_config(name[: -len(".weight")]) if name.endswith(".weight") else None
                layout = registry.BY_COMFY_FORMAT.get(config[0]) if config else None
                if layout is not None and len(shape) == 2:  # the weight's inputs, not its packed bytes
                    layer = f"{prefix}{name[: -len('weight')]}"
                    meta = {s: header.tensors.get(layer + s) for s in suffixes}
                    tensors[name] = (dtype, (shape[0], layout.stored_columns(meta)), nbytes)
    summary = _summary(str(path), "single-file", fmt, tensors, header.metadata, path.stat().st_size,
                       prefix=prefix)
    if counts is not None:
        summary["layer_formats"] = counts
    return summary


def _inspect_bfl(path: Path, header) -> dict:
    f = bfl.BFLFile(path)  # every layer's tensors checked against each other
    try:
        tensors = {k: (m.dtype, m.shape, m.nbytes) for k, m in header.tensors.items()}
        for layer, info in f.layers.items():
            w = header.tensors[f"{layer}.weight"]
            tensors[f"{layer}.weight"] = (w.dtype, info.shape, w.nbytes)
        summary = _summary(str(path), "single-file", "safetensors, diffusers natively quantized "
                           f"({'+'.join(f.formats())}, BFLQuantizationConfig)", tensors, header.metadata,
                           path.stat().st_size)
        summary["layer_formats"] = dict(sorted(Counter(i.fmt for i in f.layers.values()).items()))
        return summary
    finally:
        f.close()


def _inspect_gguf(path: Path) -> dict:
    from qconvert.formats.gguf.reader import open_gguf

    reader = open_gguf(path)  # header checked first: every field below is readable
    metadata = {key: fld.contents() for key, fld in reader.fields.items() if not key.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type.name, tuple(reversed([int(x) for x in t.shape])), int(t.n_bytes))
               for t in reader.tensors}
    return _summary(str(path), "gguf", f"GGUF v{_gguf_version(reader)}", tensors, metadata,
                    path.stat().st_size, arch_field=metadata.get("general.architecture"))


def _inspect_svdquant(path: Path) -> dict:
    """An SVDQuant file: every key, shape and dtype checked against its declared format first."""
    from qconvert.formats.svdquant.file import SVDQuantFile

    f = SVDQuantFile(path)
    header = f.header
    o = f.options
    hist: Counter = Counter()
    hist_bytes: Counter = Counter()
    for m in header.tensors.values():
        hist[m.dtype] += 1
        hist_bytes[m.dtype] += m.nbytes
    f.close()
    size = sum(q.stat().st_size for q in ([path] if path.is_file() else path.iterdir()))
    names = list(qi.expected_shapes(f.config))
    return {"path": str(path), "format": f"SVDQuant {o.precision} rank {o.rank}", "layout": o.layout,
            "architecture": qi.ARCHITECTURE, "variant": qi.variant(f.config, names), "config": f.config.to_json(),
            "prefix": "", "tensors": len(header.tensors), "model_tensors": len(header.tensors), "aux_tensors": 0,
            "extra_tensors": [], "parameters": qi.parameter_count(qi.expected_shapes(f.config).values()),
            "types": {k: {"tensors": hist[k], "bytes": hist_bytes[k]} for k in sorted(hist)},
            "file_bytes": size, "metadata": header.metadata or {}}


def _gguf_version(reader) -> int:
    return int(reader.fields["GGUF.version"].contents())


def _summary(path, layout, fmt, tensors: dict, metadata: dict, file_bytes: int, *, config=None,
             extra=(), prefix="", arch_field=None) -> dict:
    model_names = [n for n in tensors if not is_aux_name(n)]
    if not qi.detect(model_names):
        raise CheckpointError(f"{path}: {qi.explain_not_qwen(model_names)}")
    shapes = {n: tensors[n][1] for n in model_names}
    cfg = qi.config_from_shapes(shapes, path) if config is None else qi.QwenImageConfig.from_json(config, path)
    extra = list(extra) or qi.check_keys(cfg, shapes, allow_extra=True, where=path)
    hist: Counter = Counter()
    hist_bytes: Counter = Counter()
    params = 0
    for n in model_names:
        dtype, shape, nbytes = tensors[n]
        hist[dtype] += 1
        hist_bytes[dtype] += nbytes
        params += qi.parameter_count([shape])
    return {
        "path": path,
        "format": fmt,
        "layout": layout,
        "architecture": qi.ARCHITECTURE if arch_field is None else arch_field,
        "variant": qi.variant(cfg, model_names),
        "config": cfg.to_json(),
        "prefix": prefix,
        "tensors": len(tensors),
        "model_tensors": len(model_names),
        "aux_tensors": len(tensors) - len(model_names),
        "extra_tensors": extra,
        "parameters": params,
        "types": {k: {"tensors": hist[k], "bytes": hist_bytes[k]} for k in sorted(hist)},
        "file_bytes": file_bytes,
        "metadata": metadata,
    }


def format_summary(s: dict) -> str:
    c = s["config"]
    lines = [
        shown(s["path"], 1000),
        f"  format        {s['format']} ({s['layout']})",
        f"  architecture  {s['architecture']}, variant {s['variant']}"
        + (f" ({shown(s['pipeline'] or 'zero_cond_t', 80)}: an Edit model, measured beside a reference image)"
           if s.get("edit") else ""),
        f"  config        {c['num_layers']} layers, {c['num_attention_heads']}x{c['attention_head_dim']} heads, "
        f"text dim {c['joint_attention_dim']}",
        f"  tensors       {s['tensors']} ({s['model_tensors']} model"
        + (f", {s['aux_tensors']} scale/marker" if s["aux_tensors"] else "") + ")",
        f"  parameters    {s['parameters']:,}",
        f"  size          {s['file_bytes']:,} bytes ({s['file_bytes'] / 1e9:.2f} GB)",
        "  types",
    ]
    for name, v in s["types"].items():
        lines.append(f"    {name:<10}{v['tensors']:>6} tensors {v['bytes']:>18,} bytes")
    if s.get("layer_formats"):
        lines.append("  layers        " + ", ".join(f"{n} {shown(f, 40)}" for f, n in s["layer_formats"].items()))
    if s["extra_tensors"]:
        lines.append(f"  extra         {len(s['extra_tensors'])} tensors outside the model: "
                     + ", ".join(shown(n) for n in s["extra_tensors"][:5]))
    if s["metadata"]:
        lines.append("  metadata")
        for k, v in s["metadata"].items():
            # Names and values come from the file: escaped and cut, so they cannot restyle the terminal.
            text = v if isinstance(v, str) else json.dumps(v[:64] if isinstance(v, list) else v, default=str)
            lines.append(f"    {shown(k, 80)} = {shown(text, 100)}")
    return "\n".join(lines)

