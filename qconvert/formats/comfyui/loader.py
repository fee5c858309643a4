"""Reading FP8 files back: every layout ``to-fp8`` writes, and ComfyUI's others, dequantized.

``load_dequantized(path)`` gives a diffusers-ready state dict (what
``from_single_file`` needs, since diffusers would drop the scales and
upcast raw FP8 values); ``iter_dequantized`` streams it one tensor at a time.
Both are importable from ``qconvert.formats.comfyui.fp8`` too.

The file is hostile until proven otherwise: layer configs must be small U8
JSON objects with a string ``format``, scales one finite non-negative float,
and every failure is a ``CheckpointError`` naming the tensor.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch

from qconvert.codecs.comfyui import registry
from qconvert.codecs.comfyui.base import PRE_QUANT_SCALE, StoredLayer, unsmoothed
from qconvert.codecs.comfyui.layouts.fp8 import BY_COMFY_FORMAT, BY_ST_TYPE, FP8_TYPES
from qconvert.core import untrusted
from qconvert.core.checkpoint import COMFY_PREFIXES, Checkpoint, read_safetensors_header
from qconvert.core.errors import CheckpointError
from qconvert.core.models import qwen_image as qi
from qconvert.formats.comfyui.fp8 import (
    COMFY_QUANT,
    FLOAT_SCALE_TYPES,
    QUANT_METADATA,
    SCALE_WEIGHT,
    SCALED_FP8_MARKER,
    WEIGHT_SCALE,
    is_aux_name,
)

_E4M3 = FP8_TYPES["e4m3fn"]  # what ComfyUI assumes for a legacy scaled file
_FLOAT_WEIGHTS = (*BY_ST_TYPE, *FLOAT_SCALE_TYPES)


def fp8_layout(path: str | os.PathLike) -> str:
    """``comfy``, ``scaled``, ``plain`` (FP8 tensors without scales) or ``none`` (no FP8 at all)."""
    header = read_safetensors_header(Path(path))
    return _layout(header.tensors, header.metadata)


def _layout(tensors: Mapping, metadata: Mapping) -> str:
    keys = list(tensors)
    if QUANT_METADATA in metadata or any(k.endswith("." + COMFY_QUANT) for k in keys):
        return "comfy"
    if any(k == SCALED_FP8_MARKER or k.endswith("." + SCALED_FP8_MARKER) for k in keys):
        return "scaled"
    if any(m.dtype in BY_ST_TYPE for m in tensors.values()):
        return "plain"
    return "none"


# Layer configs are a few dozen bytes of JSON; the whole metadata a few hundred KB.
LAYER_CONFIG_LIMITS = untrusted.Limits(objects=64, items=256)
LAYER_CONFIG_MAX_BYTES = 64 * 1024
QUANT_METADATA_LIMITS = untrusted.Limits(objects=4 * 100_000, items=16 * 100_000)


def _comfy_layers(path: Path, metadata: Mapping, read: Callable[[str], torch.Tensor], header: Mapping,
                  keys, prefix: str) -> dict:
    """Bare layer name → comfy_quant config, from per-layer tensors and/or ``_quantization_metadata``."""
    layers: dict = {}
    if QUANT_METADATA in metadata:
        where = f"{path}: __metadata__.{QUANT_METADATA}"
        value = untrusted.load_json(metadata[QUANT_METADATA], where, QUANT_METADATA_LIMITS)
        found = value.get("layers") if isinstance(value, dict) else None
        if not isinstance(found, dict):
            raise CheckpointError(f"{where}: must be an object with a \"layers\" object")
        for layer, conf in found.items():
            layers[layer] = _layer_format(f"{where}: layer {untrusted.shown(layer)}", conf), conf
    for key in keys:
        if key.endswith("." + COMFY_QUANT):
            meta = header[key]
            where = f"{path}: tensor {untrusted.shown(key)}"
            if meta.dtype != "U8" or len(meta.shape) != 1 or meta.nbytes > LAYER_CONFIG_MAX_BYTES:
                raise CheckpointError(f"{where}: a layer config must be U8 bytes of JSON (at most "
                                      f"{LAYER_CONFIG_MAX_BYTES:,}), not {meta.dtype} {list(meta.shape)}")
            conf = untrusted.load_json(read(key).numpy().tobytes(), where, LAYER_CONFIG_LIMITS)
            layers[key[len(prefix): -len(COMFY_QUANT) - 1]] = _layer_format(where, conf), conf
    return layers


def _layer_format(where: str, conf) -> str:
    """A layer config's ``format`` string (the only field this loader needs)."""
    if not isinstance(conf, dict):
        raise CheckpointError(f"{where}: a layer config must be a JSON object, not {untrusted.type_name(conf)}")
    return untrusted.field_str(conf, "format", where)


class FP8File:
    """An FP8 file opened once: every layer config and scale checked, then tensors by bare name.

    ``load`` gives a scaled weight dequantized to float32 and any other tensor
    as stored.  ``iter_dequantized`` and the reference model's weight source
    (``formats.opener.FP8Weights``) both read through it.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        header = read_safetensors_header(self.path)
        self.prefix = _prefix(header.tensors)
        # Checkpoint's positioned reads, not a memory map: resident memory stays at
        # one tensor however large the file.  An FP8 file is no conversion source,
        # so it is not validated as one (no config needed).
        self._reader = Checkpoint(self.path, "single-file", None, header.tensors, header.metadata)
        # weight key -> its dequantization: a per-tensor FP8 scale, or a decoder of a block format
        found = _scaled_weights(self.path, header, self._reader, self.prefix)
        smoothing = _smoothing(self.path, header, self._reader, found, self.prefix)
        for layer, pre_quant_scale in smoothing.items():  # the dense weight the smoothed layer computes with
            fmt, decode = found[f"{layer}.weight"]
            found[f"{layer}.weight"] = (fmt, lambda q, d=decode, s=pre_quant_scale: unsmoothed(d(q), s))
        self._scales = {key: scale for key, (_, scale) in found.items()}
        self._weight_formats = {key: fmt for key, (fmt, _) in found.items()}
        self._formats = sorted(set(self._weight_formats.values()))
        self._configs = {}
        if _layout(header.tensors, header.metadata) == "comfy":
            for layer, (fmt, conf) in _comfy_layers(self.path, header.metadata, self._reader.load, header.tensors,
                                                    list(header.tensors), self.prefix).items():
                key = f"{self.prefix}{layer}.input_scale"
                scale = _scalar(self.path, key, self._reader, header.tensors) if key in header.tensors else None
                self._configs[layer] = (fmt, conf, scale, smoothing.get(f"{self.prefix}{layer}"))

    def layer_config(self, layer: str) -> tuple | None:
        """(format, comfy_quant object, input_scale or None, pre_quant_scale or None) of a ComfyUI-layout layer;
        None otherwise."""
        return self._configs.get(layer)

    def format_counts(self) -> dict[str, int]:
        """How many layers each scaled format holds (``{"float8_e4m3fn": 840}``)."""
        return dict(sorted(Counter(self._weight_formats.values()).items()))

    def formats(self) -> list[str]:
        """The scaled layers' formats, sorted (``scaled float8_e4m3fn`` for the legacy layout)."""
        return self._formats

    def names(self) -> list[str]:
        """Every tensor's bare name (a ``model.diffusion_model.`` prefix stripped), scales and configs included."""
        return [k[len(self.prefix):] for k in self._reader.tensors if k.startswith(self.prefix)]

    def weight_names(self) -> list[str]:
        """The model's tensors, sorted: no scales, layer configs, activation scales or markers."""
        return sorted(n for n in self.names()
                      if not is_aux_name(n) and not (qi.is_known(n) and qi.describe(n).role is qi.Role.MARKER))

    def load(self, name: str) -> torch.Tensor:
        key = self.prefix + name
        if key not in self._reader.tensors:
            raise CheckpointError(f"{self.path}: no tensor {untrusted.shown(name)}")
        tensor = self._reader.load(key)
        scale = self._scales.get(key)
        if scale is None:
            return tensor
        if callable(scale):
            return scale(tensor)
        return tensor.to(torch.float32) * scale

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> "FP8File":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_dequantized(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, allow_extra: bool = False
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, weight)`` for every model weight of an FP8 file, dequantized to ``dtype``.

    Reads any of the three layouts (and ComfyUI's ``_quantization_metadata``
    variant of the comfy one), one tensor at a time.  Names are bare diffusers
    names (a ``model.diffusion_model.`` prefix is stripped).  Scales, layer
    configs, activation scales and marker tensors are not weights and are not
    yielded.  Non-FP8 tensors are converted to ``dtype``.  Every layer config
    and scale is checked before the first weight is yielded, and so is every
    name: one that is not a Qwen-Image tensor (say ``transformer_blocks.999999``)
    is an error, as it is for the command line, unless ``allow_extra``.
    """
    with FP8File(path) as f:
        names = f.weight_names()
        outside = next((n for n in names if not qi.is_known(n)), None)
        if outside is not None and not allow_extra:
            raise CheckpointError(f"{f.path}: tensor {untrusted.shown(outside)} is not part of Qwen-Image (pass "
                                  "allow_extra=True to carry such tensors through)")
        for name in names:
            tensor = f.load(name)
            # Plain FP8 and legacy layers without scale_weight: scale 1, as ComfyUI does.
            yield name, tensor.to(dtype) if tensor.is_floating_point() else tensor


def layer_formats(path: str | os.PathLike) -> dict[str, int]:
    """How many layers each scaled format holds (``{"float8_e4m3fn": 840}``), every config and scale checked."""
    with FP8File(path) as f:
        return f.format_counts()


def _prefix(tensors: Mapping) -> str:
    return next((p for p in COMFY_PREFIXES if any(k.startswith(p) for k in tensors)), "")


def _scaled_weights(path: Path, header, reader, prefix: str) -> dict[str, tuple[str, torch.Tensor]]:
    """Weight key → (format, its checked scale) for every scaled layer, from the header and the scales alone."""
    keys = [k for k in header.tensors if k.startswith(prefix)]
    layout = _layout({k: header.tensors[k] for k in keys}, header.metadata)
    found = {}
    if layout == "comfy":
        logical = _logical_shapes(header.tensors, prefix)
        for layer, (fmt, conf) in _comfy_layers(path, header.metadata, reader.load, header.tensors, keys,
                                                prefix).items():
            if _block_format(fmt) is not None:
                decode = block_decoder(path, prefix + layer, fmt, conf, reader, header.tensors,
                                       logical.get(f"{layer}.weight"))
                found[f"{prefix}{layer}.weight"] = (fmt, decode)
            else:
                found[f"{prefix}{layer}.weight"] = (fmt, _comfy_scale(path, prefix + layer, fmt, reader,
                                                                      header.tensors))
    elif layout == "scaled":
        for key in keys:
            if key.endswith("." + SCALE_WEIGHT):
                weight = key[: -len(SCALE_WEIGHT)] + "weight"
                scale = _read_scale(path, key, weight, reader, header.tensors)
                fp8 = BY_ST_TYPE.get(header.tensors[weight].dtype, _E4M3)
                found[weight] = ("scaled " + fp8.comfy_format, scale)
    return found


def _smoothing(path: Path, header, reader, found: dict, prefix: str) -> dict[str, torch.Tensor]:
    """Layer key -> its checked ``pre_quant_scale`` (float32 [in]).  ComfyUI loads one only for a layer whose
    format takes it (nvfp4); anywhere else it would be an unexpected key, so it is an error here."""
    keys = [k for k in header.tensors if k.endswith("." + PRE_QUANT_SCALE)]
    logical_shapes = _logical_shapes(header.tensors, prefix) if keys else {}
    out = {}
    for key in keys:
        meta = header.tensors[key]
        layer = key[: -len(PRE_QUANT_SCALE) - 1]
        where = f"{path}: tensor {untrusted.shown(key)}"
        fmt = found.get(f"{layer}.weight", (None,))[0]
        layout = _block_format(fmt) if fmt is not None else None
        if layout is None or not layout.smoothable:
            raise CheckpointError(f"{where}: ComfyUI applies a pre_quant_scale only to an nvfp4 layer, and "
                                  f"{untrusted.shown(layer)} is {fmt or 'not a quantized layer'}")
        logical = logical_shapes.get(f"{layer[len(prefix):]}.weight")
        cols = logical[1] if logical else layout.stored_columns(_LayerHeader(header.tensors, layer))
        if meta.dtype not in FLOAT_SCALE_TYPES or tuple(meta.shape) != (cols,):
            raise CheckpointError(f"{where}: must be a float vector of the layer's {cols} inputs, not "
                                  f"{meta.dtype} {list(meta.shape)}")
        scale = reader.load(key).float()
        if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
            raise CheckpointError(f"{where}: holds zero, negative or non-finite values; a smoothing factor is "
                                  "a positive number per input")
        out[layer] = scale
    return out


def _block_format(fmt: str):
    """The registry's format for a ComfyUI block format (NVFP4, MXFP8, INT8, W4A4 ...); None for FP8 (per-tensor
    scales, read here) and for formats qconvert does not know."""
    found = registry.BY_COMFY_FORMAT.get(fmt)
    return None if found is None or fmt in BY_COMFY_FORMAT else found


def _logical_shapes(tensors: Mapping, prefix: str) -> dict[str, tuple]:
    """Each Qwen-Image weight's ``(out, in)``, as ComfyUI's modules declare them, from the config the never
    quantized tensors imply; {} when they imply none (then a stored weight is taken as unpadded)."""
    shapes = {k[len(prefix):]: tuple(m.shape) for k, m in tensors.items() if k.startswith(prefix)}
    try:
        return qi.expected_shapes(qi.config_from_shapes(shapes))
    except CheckpointError:
        return {}


class _LayerHeader(dict):
    """A layer's header records by suffix (``weight``, ``weight_scale`` ...), None where absent."""

    def __init__(self, header, layer: str):
        super().__init__()
        self.header, self.layer = header, layer

    def __missing__(self, suffix: str):
        return self.header.get(f"{self.layer}.{suffix}")

    def get(self, suffix, default=None):
        return self[suffix]


def block_decoder(path: Path, layer: str, fmt: str, conf: dict, reader, header,
                  logical: tuple | None = None) -> Callable:
    """A checked layer of one of ComfyUI's block formats: a function of its stored weight giving the float32
    weight ComfyUI dequantizes (spec comfy-quant.md §5).  The format (``codecs.comfyui.registry``) checks its
    shapes, dtypes and scales.  ``logical`` is the module's ``(out, in)``: NVFP4 and MXFP8 store an unaligned
    weight zero-padded to their block in both dimensions, and ComfyUI crops it to the module's shape."""
    stored = StoredLayer(where=f"{path}: layer {untrusted.shown(layer)}", meta=_LayerHeader(header, layer),
                         read=lambda suffix: reader.load(f"{layer}.{suffix}"),
                         scalar=lambda suffix: _scalar(path, f"{layer}.{suffix}", reader, header))
    return _block_format(fmt).decoder(stored, conf, logical)


def _scalar(path: Path, key: str, reader, header) -> torch.Tensor:
    meta = header.get(key)
    if meta is None or meta.dtype not in FLOAT_SCALE_TYPES or meta.numel != 1:
        raise CheckpointError(f"{path}: {untrusted.shown(key)} must be one float")
    value = reader.load(key).float().reshape(())
    if not bool(torch.isfinite(value)) or float(value) < 0:
        raise CheckpointError(f"{path}: {untrusted.shown(key)} is {float(value)}; it must be finite and >= 0")
    return value


def _comfy_scale(path: Path, layer: str, fmt: str, reader, header) -> torch.Tensor:
    fp8 = BY_COMFY_FORMAT.get(fmt)
    where = f"{path}: layer {untrusted.shown(layer)}"
    if fp8 is None:
        raise CheckpointError(f"{where} uses comfy_quant format '{untrusted.shown(fmt, 40)}'; this loader "
                              f"dequantizes only {', '.join(BY_COMFY_FORMAT)}")
    weight = header.get(f"{layer}.weight")
    if weight is None:
        raise CheckpointError(f"{where} has a comfy_quant config but no weight tensor")
    if weight.dtype != fp8.st_type:
        raise CheckpointError(f"{where} says {fmt} but its weight is {weight.dtype}")
    scale_key = f"{layer}.{WEIGHT_SCALE}"
    if scale_key not in header:
        raise CheckpointError(f"{where} is {fmt} but has no {WEIGHT_SCALE} tensor")
    return _read_scale(path, scale_key, f"{layer}.weight", reader, header)


def _read_scale(path: Path, key: str, weight: str, reader, header) -> torch.Tensor:
    """A per-tensor dequantization multiplier: one finite, non-negative float for a floating weight."""
    meta = header[key]
    where = f"{path}: tensor {untrusted.shown(key)}"
    if meta.dtype not in FLOAT_SCALE_TYPES or meta.numel != 1:
        raise CheckpointError(f"{where}: a per-tensor scale must be one float, not {meta.dtype} {list(meta.shape)}")
    if weight not in header:
        raise CheckpointError(f"{where}: scales {untrusted.shown(weight)}, which the file does not have")
    if header[weight].dtype not in _FLOAT_WEIGHTS:
        raise CheckpointError(f"{where}: scales a {header[weight].dtype} weight; scaled weights are FP8")
    scale = reader.load(key).to(torch.float32).reshape(())
    if not bool(torch.isfinite(scale)) or float(scale) < 0:
        raise CheckpointError(f"{where}: scale is {float(scale)}; it must be a finite, non-negative number")
    return scale


def load_dequantized(path: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16,
                     allow_extra: bool = False) -> dict[str, torch.Tensor]:
    """A diffusers-ready state dict (BF16 by default) from any FP8 layout; see ``iter_dequantized``."""
    return dict(iter_dequantized(path, dtype=dtype, allow_extra=allow_extra))
