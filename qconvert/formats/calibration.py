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


class StatsFile:
    """A calibration file opened for ``modules`` (``transformer_blocks.3.attn.to_q`` ...): every module's records
    are checked against ``source``'s layer widths on opening, so a missing module or a calibration of another
    model fails before any work; ``read(module)`` then reads one module's statistics (memory: one layer's)."""

    def __init__(self, path, source, modules: list[str]):
        self.path = Path(path)
        header = read_safetensors_header(self.path)
        shapes = source.shapes()
        self._metas = {}
        for module in modules:
            width = shapes[f"{module}.weight"][-1]
            metas = {s: header.tensors.get(f"{module}.{s}") for s in SUFFIXES}
            if any(m is None for m in metas.values()):
                raise QConvertError(f"{self.path}: no statistics for {module}; was it made from this model "
                                    "(qconvert calibrate on the same source)?")
            if tuple(metas["in_absmax"].shape) != (width,) or len(metas["in_rows"].shape) != 2 \
                    or metas["in_rows"].shape[1] != width or not 1 <= metas["in_rows"].shape[0] <= 4096:
                raise QConvertError(f"{self.path}: the statistics of {module} are for {metas['in_absmax'].shape} "
                                    f"inputs; this model's layer takes {width} (a calibration of another model?)")
            if tuple(metas["in_sq_mean"].shape) != (width,) or tuple(metas["in_count"].shape) != () \
                    or metas["in_count"].dtype != "I64":
                raise QConvertError(f"{self.path}: {module}.in_sq_mean / in_count have the wrong shape or type")
            self._metas[module] = metas
        self._reader = TensorReader()

    def read(self, module: str) -> Stat:
        metas = self._metas[module]
        absmax = self._reader.read(metas["in_absmax"]).float()
        rows = self._reader.read(metas["in_rows"]).float()
        sq_mean = self._reader.read(metas["in_sq_mean"]).double()
        count = int(self._reader.read(metas["in_count"]))
        finite = all(bool(torch.isfinite(t).all()) for t in (absmax, rows, sq_mean))
        if not finite or bool((absmax < 0).any()) or bool((sq_mean < 0).any()) or count < rows.shape[0]:
            raise QConvertError(f"{self.path}: the statistics of {module} hold negative, non-finite or "
                                "inconsistent values")
        return Stat(sq_mean * count, absmax, rows, count)

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> "StatsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_stats(path, source, modules: list[str]) -> dict[str, Stat]:
    """{module: Stat} for ``modules``, all read (``StatsFile`` reads them one at a time)."""
    with StatsFile(path, source, modules) as f:
        return {module: f.read(module) for module in modules}


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
