"""The calibration file: per-layer input statistics (``qconvert calibrate`` records them, ``running.calibrate``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from qconvert.core.checkpoint import TensorReader, read_safetensors_header
from qconvert.core.errors import QConvertError
from qconvert.core.io import write_safetensors

SUFFIXES = ("in_sq_mean", "in_absmax", "in_rows", "in_count")


@dataclass
class Stat:
    sq_sum: torch.Tensor  # float64 [in]
    absmax: torch.Tensor  # float32 [in]
    buffer: torch.Tensor  # float32 [keep, in]: the reservoir, its first min(seen, keep) rows filled
    seen: int = 0

    @property
    def rows(self) -> torch.Tensor:
        return self.buffer[:min(self.seen, self.buffer.shape[0])]


def write_calibration(path, stats: dict[str, Stat], metadata: dict) -> None:
    tensors = {}
    for module, s in sorted(stats.items()):
        tensors[f"{module}.in_sq_mean"] = (s.sq_sum / max(s.seen, 1)).float()
        tensors[f"{module}.in_absmax"] = s.absmax
        tensors[f"{module}.in_rows"] = s.rows.to(torch.bfloat16)
        tensors[f"{module}.in_count"] = torch.tensor(s.seen, dtype=torch.int64)
    write_safetensors(path, tensors, metadata)


def read_stats(path, source, modules: list[str]) -> dict[str, Stat]:
    """{module: Stat} for ``modules`` (``transformer_blocks.3.attn.to_q`` ...) from a calibration file,
    each checked against ``source``'s layer width; a missing or mismatched module is an error naming it."""
    path = Path(path)
    header = read_safetensors_header(path)
    shapes = source.shapes()
    reader = TensorReader()
    out = {}
    try:
        for module in modules:
            width = shapes[f"{module}.weight"][-1]
            metas = {s: header.tensors.get(f"{module}.{s}") for s in SUFFIXES}
            if any(m is None for m in metas.values()):
                raise QConvertError(f"{path}: no statistics for {module}; was it made from this model "
                                    "(qconvert calibrate on the same source)?")
            if tuple(metas["in_absmax"].shape) != (width,) or len(metas["in_rows"].shape) != 2 \
                    or metas["in_rows"].shape[1] != width or not 1 <= metas["in_rows"].shape[0] <= 4096:
                raise QConvertError(f"{path}: the statistics of {module} are for {metas['in_absmax'].shape} inputs; "
                                    f"this model's layer takes {width} (a calibration of another model?)")
            if tuple(metas["in_sq_mean"].shape) != (width,) or tuple(metas["in_count"].shape) != () \
                    or metas["in_count"].dtype != "I64":
                raise QConvertError(f"{path}: {module}.in_sq_mean / in_count have the wrong shape or type")
            absmax = reader.read(metas["in_absmax"]).float()
            rows = reader.read(metas["in_rows"]).float()
            sq_mean = reader.read(metas["in_sq_mean"]).double()
            count = int(reader.read(metas["in_count"]))
            finite = all(bool(torch.isfinite(t).all()) for t in (absmax, rows, sq_mean))
            if not finite or bool((absmax < 0).any()) or bool((sq_mean < 0).any()) or count < rows.shape[0]:
                raise QConvertError(f"{path}: the statistics of {module} hold negative, non-finite or "
                                    "inconsistent values")
            out[module] = Stat(sq_mean * count, absmax, rows, count)
    finally:
        reader.close()
    return out


def calibration_means(path: Path) -> dict[str, torch.Tensor]:
    header = read_safetensors_header(path)
    reader = TensorReader()
    out = {}
    try:
        for key, meta in header.tensors.items():
            if not key.endswith(".in_sq_mean"):
                continue
            if meta.dtype != "F32" or len(meta.shape) != 1:
                raise QConvertError(f"{path}: {key} is {meta.dtype} {list(meta.shape)}, not an F32 vector")
            out[key[: -len(".in_sq_mean")] + ".weight"] = reader.read(meta)
    finally:
        reader.close()
    return out
