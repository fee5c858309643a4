"""Recording linear inputs during sampling, and the calibration file that keeps them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import TensorReader, read_safetensors_header
from ..errors import QConvertError
from ..io import write_safetensors
from ..models import qwen_image as qi
from ..verify.providers import DenseProvider

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


class RecordingProvider(DenseProvider):
    """A dense provider whose linears also record their inputs (rows of the last dimension).

    Every statistic is allocated up front, at its final size, and updated in
    place: allocated as the layers are first seen, the long-lived blocks land
    above the large temporaries and keep the allocator from returning them,
    so peak memory grew with the number of layers (by 10x the statistics'
    own size at 512²).
    """

    def __init__(self, source, *, keep_rows: int = 64, seed: int = 0, **kwargs):
        super().__init__(source, **kwargs)
        self.keep_rows = keep_rows
        self.generator = torch.Generator().manual_seed(seed)
        self.stats: dict[str, Stat] = {}
        for name, shape in source.shapes().items():
            if qi.is_known(name) and name.endswith(".weight") and len(shape) == 2:
                width = shape[1]
                self.stats[name[:-len(".weight")]] = Stat(torch.zeros(width, dtype=torch.float64),
                                                          torch.zeros(width), torch.zeros(keep_rows, width))

    def recorded(self) -> dict[str, Stat]:
        """The statistics of every layer that saw input."""
        return {m: s for m, s in self.stats.items() if s.seen}

    def linear(self, module: str):
        inner = super().linear(module)

        def run(x: torch.Tensor) -> torch.Tensor:
            self._record(module, x.detach().reshape(-1, x.shape[-1]))
            return inner(x)
        return run

    def _record(self, module: str, x: torch.Tensor) -> None:
        stat = self.stats[module]
        n, k = x.shape[0], self.keep_rows
        xf = x.float()
        stat.sq_sum += torch.sum(xf * xf, dim=0, dtype=torch.float64).cpu()
        torch.maximum(stat.absmax, xf.abs().amax(0).cpu(), out=stat.absmax)
        # Reservoir sampling (Algorithm R): every row seen has the same chance to be kept; memory stays bounded.
        room = max(0, k - stat.seen)
        take = min(room, n)
        stat.buffer[stat.seen:stat.seen + take] = xf[:take].cpu()
        if n > room:
            index = torch.arange(stat.seen + room, stat.seen + n)
            slots = (torch.rand(n - room, generator=self.generator, dtype=torch.float64) * (index + 1)).long()
            hits = (slots < k).nonzero().flatten().tolist()
            for i in hits:  # in order: a later row replaces an earlier one in the same slot
                stat.buffer[int(slots[i])] = xf[room + i].cpu()
        stat.seen += n


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


def read_imatrix(path, source) -> dict[str, torch.Tensor]:
    """weight name -> importance vector, from a calibration file made for ``source``'s model.

    Reads qconvert's calibration files and llama.cpp's GGUF imatrix files
    (``<weight>.in_sum2`` / ``<weight>.counts``, as llama-imatrix and
    stable-diffusion.cpp write them; ComfyUI/sd.cpp's ``model.diffusion_model.``
    prefix is stripped).  Every quantizable block linear of the model must be
    present with a vector of its input width; anything else is an error naming
    the tensor.
    """
    path = Path(path)
    vectors = _gguf_imatrix(path) if path.suffix.lower() == ".gguf" else _calibration_means(path)
    out = {}
    for name, shape in source.shapes().items():
        if not qi.is_known(name) or not qi.describe(name).is_block_linear:
            continue
        module = qi.describe(name).module
        v = vectors.get(name)
        if v is None:
            raise QConvertError(f"{path}: no statistics for {module}; was it made from this model "
                                "(qconvert calibrate on the same source)?")
        if tuple(v.shape) != (shape[-1],):
            raise QConvertError(f"{path}: the importance of {module} has {v.numel()} values; this model's "
                                f"layer takes {shape[-1]} inputs (a calibration of another model?)")
        if not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
            raise QConvertError(f"{path}: the importance of {module} holds negative or non-finite values")
        out[name] = v
    return out


def _calibration_means(path: Path) -> dict[str, torch.Tensor]:
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


GGUF_IMATRIX_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def _gguf_imatrix(path: Path) -> dict[str, torch.Tensor]:
    """llama.cpp's rule: a weight's importance is in_sum2 / count (1 where the count is 0)."""
    import numpy as np

    from ..formats.gguf.reader import SD_CPP_MAX_NAME, open_gguf

    # stable-diffusion.cpp writes names up to 127 bytes ("model.diffusion_model.transformer_blocks.…in_sum2")
    tensors = {t.name: t for t in open_gguf(path, max_name=SD_CPP_MAX_NAME).tensors}
    out = {}
    for key, t in tensors.items():
        if not key.endswith(".in_sum2"):
            continue
        base = key[: -len(".in_sum2")]
        counts = tensors.get(base + ".counts")
        if counts is None or t.tensor_type.name != "F32" or counts.tensor_type.name != "F32":
            raise QConvertError(f"{path}: {key} needs an F32 {base}.counts beside it (llama.cpp's imatrix format)")
        sums = np.asarray(t.data, dtype=np.float32).reshape(-1)
        n = np.asarray(counts.data, dtype=np.float32).reshape(-1)
        if n.size != 1:
            raise QConvertError(f"{path}: {base} has {n.size} matrices (an MoE layer); Qwen-Image has one")
        values = sums / n[0] if n[0] > 0 else np.ones_like(sums)
        name = next((base[len(p):] for p in GGUF_IMATRIX_PREFIXES if base.startswith(p)), base)
        out[name] = torch.from_numpy(values.astype(np.float32))
    return out
