"""Reading FP8 files back: every layout ``to-fp8`` writes, and ComfyUI's others, dequantized.

``load_dequantized(path)`` gives a diffusers-ready state dict (what
``from_single_file`` needs, since diffusers would drop the scales and
upcast raw FP8 values); ``iter_dequantized`` streams it one tensor at a time.
Both are importable from ``qconvert.formats.fp8`` too.

The file is hostile until proven otherwise: layer configs must be small U8
JSON objects with a string ``format``, scales one finite non-negative float,
and every failure is a ``CheckpointError`` naming the tensor.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch

from .. import untrusted
from ..checkpoint import COMFY_PREFIXES, Checkpoint, read_safetensors_header
from ..errors import CheckpointError
from ..models import qwen_image as qi
from .fp8 import (_BY_COMFY_FORMAT, _BY_ST_TYPE, COMFY_QUANT, FLOAT_SCALE_TYPES, FP8_TYPES, QUANT_METADATA,
                  SCALE_WEIGHT, SCALED_FP8_MARKER, WEIGHT_SCALE, is_aux_name)

_E4M3 = FP8_TYPES["e4m3fn"]  # what ComfyUI assumes for a legacy scaled file
_FLOAT_WEIGHTS = (*_BY_ST_TYPE, *FLOAT_SCALE_TYPES)


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
    if any(m.dtype in _BY_ST_TYPE for m in tensors.values()):
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
    (``verify.providers.FP8Weights``) both read through it.
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
        self._scales = {key: scale for key, (_, scale) in found.items()}
        self._formats = sorted({fmt for fmt, _ in found.values()})
        self._configs = {}
        if _layout(header.tensors, header.metadata) == "comfy":
            for layer, (fmt, conf) in _comfy_layers(self.path, header.metadata, self._reader.load, header.tensors,
                                                    list(header.tensors), self.prefix).items():
                key = f"{self.prefix}{layer}.input_scale"
                scale = _scalar(self.path, key, self._reader, header.tensors) if key in header.tensors else None
                self._configs[layer] = (fmt, conf, scale)

    def layer_config(self, layer: str) -> tuple | None:
        """(format, comfy_quant object, input_scale or None) of a ComfyUI-layout layer; None otherwise."""
        return self._configs.get(layer)

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


def iter_dequantized(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, weight)`` for every model weight of an FP8 file, dequantized to ``dtype``.

    Reads any of the three layouts (and ComfyUI's ``_quantization_metadata``
    variant of the comfy one), one tensor at a time.  Names are bare diffusers
    names (a ``model.diffusion_model.`` prefix is stripped).  Scales, layer
    configs, activation scales and marker tensors are not weights and are not
    yielded.  Non-FP8 tensors are converted to ``dtype``.  Every layer config
    and scale is checked before the first weight is yielded.
    """
    with FP8File(path) as f:
        for name in f.weight_names():
            tensor = f.load(name)
            # Plain FP8 and legacy layers without scale_weight: scale 1, as ComfyUI does.
            yield name, tensor.to(dtype) if tensor.is_floating_point() else tensor


def layer_formats(path: str | os.PathLike) -> dict[str, int]:
    """How many layers each scaled format holds (``{"float8_e4m3fn": 840}``), every config and scale checked."""
    path = Path(path)
    header = read_safetensors_header(path)
    with Checkpoint(path, "single-file", None, header.tensors, header.metadata) as reader:
        found = _scaled_weights(path, header, reader, _prefix(header.tensors))
    counts: dict[str, int] = {}
    for fmt, _ in found.values():
        counts[fmt] = counts.get(fmt, 0) + 1
    return dict(sorted(counts.items()))


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
            if fmt in BLOCK_FORMATS:
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
                fp8 = _BY_ST_TYPE.get(header.tensors[weight].dtype, _E4M3)
                found[weight] = ("scaled " + fp8.comfy_format, scale)
    return found


BLOCK_FORMATS = ("nvfp4", "mxfp8", "int8_tensorwise", "convrot_w4a4")


def _logical_shapes(tensors: Mapping, prefix: str) -> dict[str, tuple]:
    """Each Qwen-Image weight's ``(out, in)``, as ComfyUI's modules declare them, from the config the never
    quantized tensors imply; {} when they imply none (then a stored weight is taken as unpadded)."""
    shapes = {k[len(prefix):]: tuple(m.shape) for k, m in tensors.items() if k.startswith(prefix)}
    try:
        return qi.expected_shapes(qi.config_from_shapes(shapes))
    except CheckpointError:
        return {}


def block_decoder(path: Path, layer: str, fmt: str, conf: dict, reader, header,
                  logical: tuple | None = None) -> Callable:
    """A checked layer of ComfyUI's NVFP4, MXFP8 or INT8 format: a function of its stored weight giving the
    float32 weight ComfyUI dequantizes (spec comfy-quant.md §5).  Shapes, dtypes and scales are checked here.

    ``logical`` is the module's ``(out, in)``: NVFP4 and MXFP8 store an unaligned weight zero-padded to
    their block in both dimensions, and ComfyUI crops it to the module's shape."""
    from . import comfy_codecs as codecs

    where = f"{path}: layer {untrusted.shown(layer)}"
    meta = {s: header.get(f"{layer}.{s}") for s in ("weight", "weight_scale", "weight_scale_2")}
    w = meta["weight"]
    if w is None or meta["weight_scale"] is None:
        raise CheckpointError(f"{where} is {fmt} but lacks its weight or weight_scale tensor")
    if len(w.shape) != 2:
        raise CheckpointError(f"{where}: the weight must be 2-D, not {list(w.shape)}")
    rows = w.shape[0]
    block = {"nvfp4": codecs.NVFP4_BLOCK, "mxfp8": codecs.MXFP8_BLOCK}.get(fmt)
    cols = w.shape[1] * (2 if fmt in ("nvfp4", "convrot_w4a4") else 1)
    want = {"nvfp4": ("U8",), "mxfp8": ("F8_E4M3",), "int8_tensorwise": ("I8",), "convrot_w4a4": ("I8",)}[fmt]
    if w.dtype not in want:
        raise CheckpointError(f"{where} says {fmt} but its weight is {w.dtype}, not {want[0]}")
    scale = meta["weight_scale"]
    if block is not None:
        grid = (128 * -(-rows // 128), 4 * -(-(cols // block) // 4))
        if cols % block or tuple(scale.shape) != grid or scale.dtype not in ("U8", "F8_E4M3"):
            raise CheckpointError(f"{where}: weight_scale is {scale.dtype} {list(scale.shape)}; a {fmt} weight of "
                                  f"{rows}x{cols} needs an 8-bit {list(grid)} block grid")
    shape = (rows, cols)
    if block is not None and logical is not None:
        if codecs.padded_shape(logical, block) != shape:
            raise CheckpointError(f"{where}: a {fmt} weight of {rows}x{cols} does not hold the module's "
                                  f"{logical[0]}x{logical[1]} (padded to {block}, it would be "
                                  f"{'x'.join(map(str, codecs.padded_shape(logical, block)))})")
        shape = tuple(logical)
    if fmt == "nvfp4":
        g = _scalar(path, f"{layer}.weight_scale_2", reader, header)
        return lambda q: codecs.decode_nvfp4({"weight": q, "weight_scale": reader.load(f"{layer}.weight_scale"),
                                              "weight_scale_2": g}, shape)
    if fmt == "mxfp8":
        return lambda q: codecs.decode_mxfp8({"weight": q, "weight_scale": reader.load(f"{layer}.weight_scale")},
                                             shape)
    if fmt == "convrot_w4a4":
        group = _rotation_group(where, conf.get("convrot_groupsize", codecs.CONVROT_GROUP), cols)
        if scale.dtype != "F32" or tuple(scale.shape) != (rows,):
            raise CheckpointError(f"{where}: a convrot_w4a4 weight_scale must be F32 [{rows}], not {scale.dtype} "
                                  f"{list(scale.shape)}")
        s4 = _nonnegative(where, reader.load(f"{layer}.weight_scale"))
        return lambda q: codecs.decode_convrot_w4a4({"weight": q, "weight_scale": s4}, shape,
                                                    {"convrot_groupsize": group})
    if scale.dtype != "F32" or tuple(scale.shape) not in ((), (rows, 1)):
        raise CheckpointError(f"{where}: an int8 weight_scale must be F32 [] or [{rows}, 1], not {scale.dtype} "
                              f"{list(scale.shape)} (a 1-D per-row scale would scale columns)")
    params = conf.get("params") if isinstance(conf.get("params"), dict) else conf
    convrot = params.get("convrot", False)
    if not isinstance(convrot, bool):
        raise CheckpointError(f"{where}: convrot must be true or false, not {untrusted.shown(convrot, 20)}")
    # the group matters (and must fit) only when the weight was rotated
    group = _rotation_group(where, params.get("convrot_groupsize", codecs.CONVROT_GROUP), cols) if convrot else 0
    s = _nonnegative(where, reader.load(f"{layer}.weight_scale"))
    return lambda q: codecs.decode_int8({"weight": q, "weight_scale": s}, shape, {"convrot": convrot,
                                                                                  "convrot_groupsize": group})


def _rotation_group(where: str, group, cols: int) -> int:
    """A ConvRot group from a layer config: a power of 4 from 4 to 4096 dividing the inputs."""
    if type(group) is not int or not 4 <= group <= 4096 or not _power_of_4(group) or cols % group:
        raise CheckpointError(f"{where}: convrot group {untrusted.shown(group, 20)} must be a power of 4 "
                              f"dividing {cols}")
    return group


def _nonnegative(where: str, scale: torch.Tensor) -> torch.Tensor:
    scale = scale.float()
    if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
        raise CheckpointError(f"{where}: weight_scale holds negative or non-finite values")
    return scale


def _power_of_4(n: int) -> bool:
    while n % 4 == 0 and n > 1:
        n //= 4
    return n == 1


def _scalar(path: Path, key: str, reader, header) -> torch.Tensor:
    meta = header.get(key)
    if meta is None or meta.dtype not in FLOAT_SCALE_TYPES or meta.numel != 1:
        raise CheckpointError(f"{path}: {untrusted.shown(key)} must be one float")
    value = reader.load(key).float().reshape(())
    if not bool(torch.isfinite(value)) or float(value) < 0:
        raise CheckpointError(f"{path}: {untrusted.shown(key)} is {float(value)}; it must be finite and >= 0")
    return value


def _comfy_scale(path: Path, layer: str, fmt: str, reader, header) -> torch.Tensor:
    fp8 = _BY_COMFY_FORMAT.get(fmt)
    where = f"{path}: layer {untrusted.shown(layer)}"
    if fp8 is None:
        raise CheckpointError(f"{where} uses comfy_quant format '{untrusted.shown(fmt, 40)}'; this loader "
                              f"dequantizes only {', '.join(_BY_COMFY_FORMAT)}")
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


def load_dequantized(path: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """A diffusers-ready state dict (BF16 by default) from any FP8 layout; see ``iter_dequantized``."""
    return dict(iter_dequantized(path, dtype=dtype))
