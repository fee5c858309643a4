"""An SVDQuant file as verify sees it: read as hostile input, run as Nunchaku's kernels would.

``SVDQuantFile`` opens either layout (a Nunchaku ``.safetensors``, or a
diffusers ``nunchaku_lite`` transformer folder), checks every key, shape and
dtype against the exact plan for the config, rank and precision its metadata
declares (strict, as Nunchaku's loader is), and then serves

* ``load(name)``: a diffusers weight or bias as the file effectively holds it
  (``Q(R)/s + up·down``, the shift taken back out of the bias, the
  modulation de-interleaved and its ``+1`` removed), for per-layer errors;
* through ``running.providers.SVDQuantProvider``: a weight provider whose W4A4 linears quantize their inputs
  per token as the kernels do (``LogicalLayer``), whose modulation linears
  are W4A16, and whose other layers are plain BF16, so the reference model
  runs the file end to end without a GPU (and on Hopper, where Nunchaku's
  kernels do not run).
"""

from __future__ import annotations

from pathlib import Path

import torch

from qconvert.codecs.svdquant import algorithm
from qconvert.core import untrusted
from qconvert.core.checkpoint import TensorReader, read_json_file, read_safetensors_header
from qconvert.core.errors import CheckpointError
from qconvert.core.models import qwen_image as qi
from qconvert.formats.svdquant import layout
from qconvert.formats.svdquant.plan import (
    DIFFUSERS_WEIGHTS,
    NUNCHAKU_MODEL_CLASS,
    WEIGHT_CONFIG,
    SvdqOptions,
    plan_entries,
)

AWQ_GROUP_SIZE = 64  # the modulation layers' W4A16 groups (layout.awq_keys)

META_LIMITS = untrusted.Limits(objects=64, items=200_000)


def is_svdquant(path) -> bool:
    """Whether ``path`` looks like an SVDQuant output (then ``SVDQuantFile`` checks it for real)."""
    p = Path(path)
    if p.is_dir():
        config = p / "config.json"
        return config.is_file() and b"nunchaku_lite" in config.read_bytes()[:1_000_000]
    if p.is_file() and p.suffix.lower() == ".safetensors":
        try:
            meta = read_safetensors_header(p).metadata or {}
        except CheckpointError:
            return False
        return meta.get("model_class") == NUNCHAKU_MODEL_CLASS
    return False


class ConfigShapes:
    """The minimal source interface ``plan_entries`` needs, from a config alone."""

    def __init__(self, config: qi.QwenImageConfig):
        self.config = config
        self.tensors = qi.expected_shapes(config)

    def shapes(self) -> dict:
        return self.tensors


def _declared(path: Path) -> tuple:
    """(config, options, weights file, its header if already read) from the file's own metadata or
    config.json, all checked."""
    where = str(path)
    if path.is_dir():
        data = read_json_file(path / "config.json", META_LIMITS)
        if not isinstance(data, dict) or not isinstance(data.get("quantization_config"), dict):
            raise CheckpointError(f"{where}/config.json: no quantization_config object")
        q = data["quantization_config"]
        svdq = q.get("svdq_w4a4")
        if q.get("quant_method") != "nunchaku_lite" or not isinstance(svdq, dict):
            raise CheckpointError(f"{where}/config.json: not a nunchaku_lite quantization_config with svdq_w4a4")
        precision = untrusted.field_str(svdq, "precision", where)
        rank = untrusted.field_int(svdq, "rank", where, low=16, high=1024)
        _check_group_size(where, "svdq_w4a4", svdq, precision)
        awq = q.get("awq_w4a16")
        if isinstance(awq, dict) and "group_size" in awq and awq["group_size"] != AWQ_GROUP_SIZE:
            raise CheckpointError(f"{where}/config.json: awq_w4a16 group_size {untrusted.shown(awq['group_size'], 20)}"
                                  f" disagrees with the tensors (AWQ W4A16 groups are {AWQ_GROUP_SIZE} wide)")
        config = qi.QwenImageConfig.from_json(data, where)
        return qi.validated(config, where), SvdqOptions(precision, rank, "diffusers"), path / DIFFUSERS_WEIGHTS, None
    header = read_safetensors_header(path)
    meta = header.metadata or {}
    try:
        config = qi.QwenImageConfig.from_json(untrusted.load_json(meta["config"].encode(), where, META_LIMITS), where)
        q = untrusted.load_json(meta["quantization_config"].encode(), where, META_LIMITS)
    except KeyError as exc:
        raise CheckpointError(f"{where}: no {exc.args[0]} in the metadata; not a Nunchaku Qwen-Image file") from None
    if not isinstance(q, dict) or not isinstance(q.get("weight"), dict):
        raise CheckpointError(f"{where}: quantization_config has no weight object")
    dtype = q["weight"].get("dtype")
    precision = {"int4": "int4", "fp4_e2m1_all": "nvfp4"}.get(dtype) if isinstance(dtype, str) else None
    if precision is None:
        raise CheckpointError(f"{where}: weight dtype {untrusted.shown(dtype, 40)} is neither int4 nor fp4_e2m1_all")
    rank = untrusted.field_int(q, "rank", where, low=16, high=1024, default=32)
    for part in ("weight", "activation"):
        if isinstance(q.get(part), dict):
            _check_group_size(where, f"quantization_config.{part}", q[part], precision)
    return qi.validated(config, where), SvdqOptions(precision, rank, "nunchaku"), path, header


def _check_group_size(where: str, what: str, declared: dict, precision: str) -> None:
    """A declared group size must be the one the tensors are laid out in (64 for INT4, 16 for NVFP4): the
    kernels read the tensors by it, so metadata that disagrees describes another file."""
    want = WEIGHT_CONFIG.get(precision, {}).get("group_size")
    if "group_size" in declared and want is not None and declared["group_size"] != want:
        raise CheckpointError(f"{where}: {what} group_size {untrusted.shown(declared['group_size'], 20)} disagrees "
                              f"with the tensors ({precision} groups are {want} wide)")


class SVDQuantFile:
    runtime = "svdquant"  # how a native runtime computes it (running.providers); Nunchaku has no other
    runs_natively_only = True  # no dequantized runtime: verify always emulates the W4A4 kernels

    def __init__(self, path):
        self.path = Path(path)
        self.config, self.options, self.weights, header = _declared(self.path)
        if self.options.precision not in layout.PRECISIONS:
            raise CheckpointError(f"{self.path}: precision {untrusted.shown(self.options.precision, 20)} is not "
                                  "int4 or nvfp4")
        self.header = header = header or read_safetensors_header(self.weights)
        planned = plan_entries(ConfigShapes(self.config), self.options)
        want = {n: (d, tuple(s)) for n, d, s in planned}
        have = {n: (m.dtype, tuple(m.shape)) for n, m in header.tensors.items()}
        for name in sorted(set(want) | set(have)):
            if want.get(name) != have.get(name):
                what = ("is missing" if name not in have else "is not part of the format" if name not in want
                        else f"is {have[name][0]} {list(have[name][1])}, not {want[name][0]} {list(want[name][1])}")
                raise CheckpointError(f"{self.weights}: tensor {untrusted.shown(name, 120)} {what} (a "
                                      f"{self.options.layout} {self.options.precision} r{self.options.rank} file)")
        self._meta = header.tensors
        self._reader = TensorReader()
        self._cache: dict = {"block": None, "layers": {}}

    # --------------------------------------------------------- reading
    def _read(self, name: str) -> torch.Tensor:
        return self._reader.read(self._meta[name])

    def _module(self, prefix: str) -> dict:
        return {n[len(prefix):]: self._read(n) for n in self._meta if n.startswith(prefix)
                and "." not in n[len(prefix):]}

    def _layer(self, index: int, stored: str, group: layout.Group):
        """A block's stored module, unpacked (cached while the block is current)."""
        if self._cache["block"] != index:
            self._cache = {"block": index, "layers": {}}
        key = stored
        if key not in self._cache["layers"]:
            tensors = self._module(f"transformer_blocks.{index}.{stored}.")
            if group.kind == "awq":
                value = layout.awq_logical(tensors, self.options.layout)
            else:
                shift = (algorithm.GELU_SHIFT if group.mlp_down and self.options.layout == "nunchaku"
                         and self.options.precision == "int4" else 0.0)
                layer = layout.logical_layer(tensors, self.options.precision, shift)
                smooth = layer.smooth.float()
                if not bool(torch.isfinite(smooth).all()) or bool((smooth <= 0).any()):
                    # the kernels divide each input channel by it: a zero, negative or NaN factor is damage
                    raise CheckpointError(f"{self.path}: transformer_blocks.{index}.{stored}.smooth_factor holds "
                                          "zero, negative or non-finite values; the file is damaged")
                value = (layer, layer.residual())
            self._cache["layers"][key] = value
        return self._cache["layers"][key]

    def _where(self, module: str) -> tuple:
        """(block, stored name, group, rows of the stored module) for a diffusers module name."""
        info = qi.describe(module + ".weight")
        rel = module[len(f"transformer_blocks.{info.block}."):]
        group = layout.group_of(rel)
        if self.options.layout == "diffusers" or not group.fused:
            return info.block, rel if group.fused else group.name, group, slice(None)
        part = group.sources.index(rel)
        n = self.config.inner_dim
        return info.block, group.name, group, slice(part * n, (part + 1) * n)

    # ------------------------------------------------ verify's interface
    def names(self) -> list[str]:
        return list(qi.expected_shapes(self.config))

    def load(self, name: str) -> torch.Tensor:
        """A diffusers tensor as the file effectively holds it (float32)."""
        info = qi.describe(name)
        if info.block is None or not info.is_block_linear and not name.endswith(".bias"):
            return self._read(name).float()
        module = name.rsplit(".", 1)[0]
        block, stored, group, rows = self._where(module)
        value = self._layer(block, stored, group)
        if group.kind == "awq":
            w, b = value
            return (w if name.endswith(".weight") else b)[rows].float()
        layer, r = value
        s = layer.smooth.float()
        if name.endswith(".weight"):
            return (r / s + layer.up.float() @ layer.down.float())[rows]
        return (layer.bias.float() + layer.shift * (r / s).sum(1))[rows]


    def close(self) -> None:
        self._reader.close()
