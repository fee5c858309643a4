"""``qconvert to-diffusers``: single files that diffusers loads natively quantized (``BFLQuantizationConfig``).

    QwenImageTransformer2DModel.from_single_file(FILE, config="Qwen/Qwen-Image", subfolder="transformer",
        quantization_config=BFLQuantizationConfig(compute_dtype=torch.bfloat16))

The file holds diffusers' own tensor names (``from_single_file`` maps Qwen-Image's keys one to one) with no
prefix.  Every block linear but ``transformer_blocks.0.img_mod.1`` (as the ComfyUI formats keep it) is stored in
the chosen format (``codecs.bfl``); everything else is BF16.  diffusers keeps the stored tensors as they are, so
the memory a loaded model holds is the file's tensor bytes.  The Edit-2511 marker of ComfyUI files is not
written: diffusers takes ``zero_cond_t`` from the model's config.

The reader (``BFLFile``) checks every layer's tensors against each other before any is read: it is the
weight source verify and inspect use for these files, a layer's input quantized as its native matmul does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from qconvert.codecs import bfl
from qconvert.core.checkpoint import DTYPES, TensorReader, read_safetensors_header
from qconvert.core.derived import write_derived_safetensors
from qconvert.core.errors import CheckpointError, QConvertError
from qconvert.core.io import atomic_output, safetensors_header, safetensors_size, safetensors_target
from qconvert.core.models import qwen_image as qi
from qconvert.core.pipeline import parse_device, provenance, provenance_json
from qconvert.core.untrusted import shown

FORMATS = bfl.FORMATS
NATIVE_ON = bfl.NATIVE_ON
FIRST_MODULATION = "transformer_blocks.0.img_mod.1"
HIGH = "BF16"
MIN_DIFFUSERS = "diffusers 0.42 (BFLQuantizationConfig, from_single_file; needs accelerate)"


@dataclass(frozen=True)
class BflOptions:
    fmt: str = "fp8r"
    keep: tuple = ()
    input_scales: tuple = ()  # nvfp4: ((layer, input_scale), ...) from a calibration; empty: 1.0 each
    margin: float = 4.0  # the calibrated amax is multiplied by it

    def to_json(self) -> dict:
        out = {"format": self.fmt, "keep": list(self.keep)}
        if self.fmt == "nvfp4":
            out["input_scale"] = "calibrated" if self.input_scales else "unit (uncalibrated)"
            if self.input_scales:
                out["margin"] = self.margin
        return out

    def input_scale(self, layer: str) -> float:
        return dict(self.input_scales).get(layer, 1.0)


def make_options(fmt: str, keep=(), margin: float = 4.0) -> BflOptions:
    if fmt not in bfl.FORMATS:
        raise QConvertError(f"--format {fmt}: diffusers loads fp8r and nvfp4 files natively "
                            "(BFLQuantizationConfig); for other formats use to-comfy, to-gguf or to-svdquant")
    if not 1.0 <= margin <= 16:
        raise QConvertError(f"--margin {margin}: give 1 to 16 (the calibrated maximum is multiplied by it)")
    return BflOptions(fmt, qi.parse_role_groups(keep), margin=margin)


def quantized_layers(source, options: BflOptions) -> list[str]:
    """The layers stored quantized, sorted."""
    kept = frozenset().union(*(qi.ROLE_GROUPS[g] for g in options.keep))
    layers = []
    for name, meta in source.tensors.items():
        if not qi.is_known(name) or not name.endswith(".weight"):
            continue
        info = qi.describe(name)
        if not info.is_block_linear or info.role in kept or info.module == FIRST_MODULATION:
            continue
        if meta.shape[1] % bfl.NEEDS_MULTIPLE[options.fmt]:  # pragma: no cover - head_dim is a multiple of 16
            raise QConvertError(f"{info.module}: {meta.shape[1]} inputs are not a multiple of 16, which "
                                f"{options.fmt} needs")
        layers.append(info.module)
    return sorted(layers)


def calibrated_scales(stats: dict, margin: float) -> tuple:
    """((layer, input_scale), ...) from ``{layer: Stat}`` (``formats.calibration.read_stats``)."""
    return tuple((layer, bfl.input_scale_from_amax(float(s.absmax.max()), margin))
                 for layer, s in sorted(stats.items()))


def plan(source, options: BflOptions, *, dry_run: bool = False) -> tuple[list, dict, dict]:
    weights = {f"{layer}.weight": layer for layer in quantized_layers(source, options)}
    entries = []
    for name, meta in source.tensors.items():
        if name in weights:
            entries += [(f"{weights[name]}.{suffix}", dtype, shape)
                        for suffix, dtype, shape in bfl.stored(options.fmt, tuple(meta.shape))]
        elif qi.is_known(name) and qi.describe(name).role is qi.Role.MARKER:
            continue  # ComfyUI's Edit-2511 marker: diffusers reads zero_cond_t from the config
        else:
            entries.append((name, HIGH, tuple(meta.shape)))
    entries.sort(key=lambda e: (-DTYPES[e[1]][0], e[0]))
    info = provenance(source, fmt=f"safetensors-diffusers-{options.fmt}", options=options.to_json(), dry_run=dry_run)
    return entries, {"qconvert": provenance_json(info)}, weights


def write(source, options: BflOptions, target: Path, *, device="cpu", quiet: bool = False) -> None:
    entries, meta, weights = plan(source, options)
    dev = parse_device(device)
    derived = {name: f"{name.rpartition('.')[0]}.weight" for name, _, _ in entries
               if name not in source.tensors and f"{name.rpartition('.')[0]}.weight" in weights}

    def encode(name: str, tensor: torch.Tensor) -> dict:
        layer = weights.get(name)
        if layer is None:
            return {name: tensor.to(torch.bfloat16)}
        encoded = bfl.encode(options.fmt, tensor.to(dev), options.input_scale(layer))
        return {f"{layer}.{suffix}": value for suffix, value in encoded.items()}

    def constant(name: str, dtype: str, shape: tuple) -> torch.Tensor:  # pragma: no cover - a planning bug
        raise RuntimeError(f"{name}: planned but neither in the source nor derived")

    with atomic_output(target, expected_bytes=safetensors_size(entries, meta)) as f:
        write_derived_safetensors(f, entries, meta, source, derived, encode, constant,
                                  desc=f"to-diffusers {target.name}", quiet=quiet)


def default_name(source, options: BflOptions) -> str:
    return f"{source.name}-diffusers-{options.fmt}.safetensors"


def output_path(source, options: BflOptions, output) -> Path:
    return safetensors_target(output, default_name(source, options), getattr(source, "path", None))


def convert(source, output=None, options: BflOptions = BflOptions(), *, device: str = "cpu",
            dry_run: bool = False, quiet: bool = False) -> dict:
    target = output_path(source, options, output)
    entries, meta, weights = plan(source, options, dry_run=dry_run)
    size = safetensors_size(entries, meta)
    bf16 = sum(source.tensors[n].numel * 2 for n in source.tensors
               if not (qi.is_known(n) and qi.describe(n).role is qi.Role.MARKER))
    result = {"command": "to-diffusers", "output": str(target), "format": options.fmt, "keep": list(options.keep),
              "layers": len(weights), "tensor_count": len(entries), "bytes": size,
              "loaded_bytes": sum(safetensors_header(entries, meta)[1]), "bf16_bytes": bf16,
              "input_scale": options.to_json().get("input_scale"), "written": False, "needs": MIN_DIFFUSERS,
              "native_on": NATIVE_ON[options.fmt],
              "diffusers_config": qi.diffusers_config(source)}
    if dry_run:
        return result
    write(source, options, target, device=device, quiet=quiet)
    if target.stat().st_size != size:  # pragma: no cover - the writer checks every tensor against the plan
        raise RuntimeError(f"{target}: wrote {target.stat().st_size} bytes, planned {size}")
    return {**result, "written": True}


def format_report(r: dict) -> str:
    lines = [f"{r['format']}: {r['layers']} linears quantized, {r['tensor_count']} tensors, {r['bytes']:,} bytes "
             f"({_size(r['bytes'])})" + (f"; kept in BF16: {', '.join(r['keep'])}" if r["keep"] else ""),
             f"  diffusers holds {_size(r['loaded_bytes'])} of weights after loading it, against "
             f"{_size(r['bf16_bytes'])} in BF16 ({r['loaded_bytes'] / r['bf16_bytes']:.0%})"]
    if r["input_scale"] == "unit (uncalibrated)":
        lines.append("  input_scale 1.0 in every layer (no --calib): on Blackwell with FlashInfer, inputs beyond "
                     "+-2688 saturate; give --calib STATS from qconvert calibrate for calibrated scales")
    if not r["written"]:
        return "\n".join(lines + ["dry run: nothing written"])
    return "\n".join(lines + [
        f"wrote {r['output']}",
        f"  diffusers: QwenImageTransformer2DModel.from_single_file({r['output']!r}, config={r['diffusers_config']!r}, "
        "subfolder='transformer', quantization_config=BFLQuantizationConfig()); needs "
        f"{r['needs']}; native matmuls on {r['native_on']}, dequantized to BF16 in every forward elsewhere",
        f"  check it: qconvert verify {r['output']} --reference SOURCE --report DIR"])


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


# ------------------------------------------------------------------ reading

def is_bfl(tensors: dict) -> bool:
    """Whether a safetensors header (key -> meta, no ComfyUI layer configs) is a diffusers fp8r/nvfp4 file: a
    weight with a ``weight_scale`` beside it and no prefix."""
    return any(k.endswith(".weight_scale") and k[: -len("_scale")] in tensors for k in tensors)


@dataclass(frozen=True)
class Layer:
    fmt: str
    shape: tuple  # the logical (out, in)
    metas: dict  # suffix -> TensorMeta


class BFLFile:
    """A diffusers fp8r/nvfp4 single file as a weight source: names as diffusers has them, each quantized weight
    dequantized when asked for, every layer checked against its scales when the file is opened."""

    runtime = "bfl"

    def __init__(self, path):
        self.path = Path(path)
        header = read_safetensors_header(self.path)
        self._tensors = header.tensors
        self.metadata = header.metadata
        self._reader = TensorReader()
        self.layers = {k[: -len(".weight_scale")]: self._check(k[: -len(".weight_scale")])
                       for k in self._tensors if k.endswith(".weight_scale")}
        aux = {f"{layer}.{s}" for layer, info in self.layers.items() for s in info.metas if s != "weight"}
        self._names = [k for k in self._tensors if k not in aux]

    def _check(self, layer: str) -> Layer:
        where = f"{self.path}: layer {shown(layer)}"
        metas = {s: self._tensors.get(f"{layer}.{s}") for s in ("weight", *bfl.SCALES["nvfp4"])}
        w = metas["weight"]
        if w is None or len(w.shape) != 2:
            raise CheckpointError(f"{where} has a weight_scale but no 2-D weight")
        fmt = "nvfp4" if metas["weight_scale_2"] is not None else "fp8r"
        rows, cols = int(w.shape[0]), int(w.shape[1]) * (2 if fmt == "nvfp4" else 1)
        planned = {s: (d, tuple(shape)) for s, d, shape in bfl.stored(fmt, (rows, cols))}
        for suffix, (dtype, shape) in planned.items():
            m = metas[suffix]
            if m is None or m.dtype != dtype or tuple(m.shape) != shape:
                got = "nothing" if m is None else f"{m.dtype} {list(m.shape)}"
                raise CheckpointError(f"{where}: {suffix} is {got}; a {fmt} layer of {rows}x{cols} needs {dtype} "
                                      f"{list(shape)}")
        extra = [s for s in metas if metas[s] is not None and s not in planned]
        if extra or (fmt == "nvfp4" and cols % bfl.NVFP4_BLOCK):
            raise CheckpointError(f"{where}: {', '.join(extra) or 'the weight'} does not fit a {fmt} layer")
        return Layer(fmt, (rows, cols), {s: m for s, m in metas.items() if s in planned})

    def formats(self) -> list[str]:
        return sorted({info.fmt for info in self.layers.values()})

    def names(self) -> list[str]:
        return list(self._names)

    def layer_tensors(self, layer: str, scales_only: bool = False) -> tuple[str, dict] | None:
        """(format, its stored tensors, the scales checked finite and non-negative) of a quantized layer, else
        None; ``scales_only``: without the weight (what the runtime needs to quantize the layer's input)."""
        info = self.layers.get(layer)
        if info is None:
            return None
        tensors = {s: self._reader.read(m).view(DTYPES[m.dtype][1]).reshape(m.shape) for s, m in info.metas.items()
                   if not (scales_only and s == "weight")}
        for suffix, t in tensors.items():
            if suffix != "weight" and (not bool(torch.isfinite(t.float()).all()) or bool((t.float() < 0).any())):
                raise CheckpointError(f"{self.path}: layer {shown(layer)}: {suffix} holds negative or non-finite "
                                      "values")
        return info.fmt, tensors

    def load(self, name: str) -> torch.Tensor:
        layer = name[: -len(".weight")] if name.endswith(".weight") else None
        found = self.layer_tensors(layer) if layer in self.layers else None
        if found is not None:
            return bfl.decode(*found)
        meta = self._tensors.get(name)
        if meta is None or name not in self._names:
            raise QConvertError(f"{self.path}: no tensor {name}; not a whole Qwen-Image file")
        return self._reader.read(meta).view(DTYPES[meta.dtype][1]).reshape(meta.shape).float()

    def close(self) -> None:
        self._reader.close()
