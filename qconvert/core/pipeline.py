"""Pieces every converter shares: the plan record, checks, provenance, progress.

A converter is ``source → (LoRA merge) → plan → encode → sink → manifest``:
``plan`` is a pure function of the source header and the options, returning
``TensorPlan`` rows whose byte counts are exact, so ``--dry-run`` and the
disk-space check know the output size before any tensor is read.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import torch

from qconvert import __version__
from qconvert.core.errors import QConvertError, QuantizationError


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: where it comes from, what it becomes, how many bytes."""

    name: str  # source tensor name
    out_name: str  # name in the output file
    shape: tuple  # logical (torch-order) shape
    out_type: str  # output type name: "BF16", "Q4_K", "F8_E4M3", ...
    out_bytes: int  # exact data bytes in the output (no padding)
    role: str = ""  # the model map's role, for reports

    def to_json(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def parse_device(device) -> torch.device:
    """``--device`` as a torch device, with a one-line error for one this machine lacks."""
    try:
        dev = torch.device(device or "cpu")
    except (RuntimeError, TypeError, ValueError):
        raise QConvertError(f"--device {device!r}: not a device (use cpu, cuda or cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise QConvertError(f"--device {device}: qconvert computes on cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QConvertError(f"--device {device}: no CUDA device is available here; use --device cpu")
    return dev


T = TypeVar("T")


def prefetched(load: Callable[[str], T], names: Sequence[str]) -> Iterator[tuple[str, T]]:
    """``(name, load(name))`` in order, the next one read by a background
    thread while the caller encodes this one: reading (disk, or the page
    cache's copy) overlaps the encoding instead of adding to it.  Memory: two
    tensors at a time, whatever the model's size."""
    if not names:
        return
    with ThreadPoolExecutor(1, thread_name_prefix="qconvert-read") as pool:
        ahead = pool.submit(load, names[0])
        for i, name in enumerate(names):
            tensor = ahead.result()
            if i + 1 < len(names):
                ahead = pool.submit(load, names[i + 1])
            yield name, tensor
            del tensor


class BufferRing:
    """``count`` byte buffers handed out in turn, each grown to the largest request it served.

    A fresh buffer per tensor costs a page fault per 4 KiB on first touch, 4x
    the time of reading a tensor from the page cache into a buffer already
    touched (measured on this project's CI machine).  The caller guarantees
    that a buffer is no longer used when it comes round again: with
    :func:`prefetched` and a write-behind thread, three (read ahead, encoding,
    being written)."""

    def __init__(self, count: int):
        self._buffers = [torch.empty(0, dtype=torch.uint8) for _ in range(count)]
        self._next = 0

    def take(self, nbytes: int) -> torch.Tensor:
        k, self._next = self._next, (self._next + 1) % len(self._buffers)
        if self._buffers[k].numel() < nbytes:
            self._buffers[k] = torch.empty(0, dtype=torch.uint8)   # free the old one first
            self._buffers[k] = torch.empty(nbytes, dtype=torch.uint8)
        return self._buffers[k][:nbytes]


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """NaN/Inf in a weight is always an error: quantizing it would hide the damage."""
    if tensor.is_floating_point() and tensor.numel() and not all_finite(tensor):
        raise nonfinite_error(name, tensor)


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a (non-empty, floating) tensor holds no NaN/Inf, in one
    ``aminmax`` pass: NaN propagates through the extremes and ±Inf is one, so
    finite extremes mean a finite tensor.  ``isfinite(...).all()`` is about
    30x slower on the CPU and would dominate a 20B-parameter conversion."""
    lo, hi = torch.aminmax(tensor)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def nonfinite_error(name: str, tensor: torch.Tensor) -> QuantizationError:
    """The error every converter gives for a tensor that holds NaN/Inf."""
    bad = int((~torch.isfinite(tensor)).sum())
    return QuantizationError(f"tensor {name}: {bad} NaN/Inf value(s) in the weights; the source is damaged "
                             "(re-download it, or check the merge/fine-tune that produced it)")


def provenance(source, *, fmt: str, options: dict, dry_run: bool = False) -> dict:
    """What produced an output: tool, source fingerprint, LoRAs, options.  Deterministic.

    ``dry_run`` lets a source skip whole-file hashes (a LoRA view writes
    equal-length placeholders), so plans stay exact without reading data.
    """
    info = {"tool": "qconvert", "tool_version": __version__, "format": fmt}
    info.update(source.provenance(dry_run=dry_run))
    info["options"] = options
    return info


def provenance_json(info: dict) -> str:
    return json.dumps(info, sort_keys=True, separators=(",", ":"))


def type_counts(plans: Iterable[TensorPlan]) -> dict:
    counts: dict = {}
    for p in plans:
        c = counts.setdefault(p.out_type, {"tensors": 0, "bytes": 0})
        c["tensors"] += 1
        c["bytes"] += p.out_bytes
    return dict(sorted(counts.items()))


def progress(total: int, desc: str, *, quiet: bool = False, unit: str = "B"):
    """A tqdm bar on a terminal; a silent stand-in otherwise (CI logs, pipes, --quiet)."""
    from tqdm import tqdm

    disable = quiet or not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1024 if unit == "B" else 1000,
                disable=disable, leave=False, dynamic_ncols=True)
