"""Streaming a source into a safetensors file whose tensors are derived from it (quantized weights and scales)."""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch

from qconvert.core.checkpoint import DTYPES
from qconvert.core.io import SafetensorsWriter, tensor_bytes
from qconvert.core.pipeline import check_finite, prefetched, progress


def write_derived_safetensors(f, entries: Sequence[tuple[str, str, tuple]], metadata: dict, source,
                              derived: dict[str, str], encode: Callable[[str, torch.Tensor], dict],
                              constant: Callable[[str, str, tuple], torch.Tensor], *, desc: str,
                              quiet: bool = False) -> None:
    """Writes the planned safetensors ``entries`` into ``f``, reading each source tensor among them once, in order.

    ``encode(name, tensor)`` gives ``{output name: tensor}``: what is stored under ``name`` and the tensors derived
    from it (``derived``: derived name -> its source tensor's name, e.g. a layer's scales).  Files are sorted by
    element size, so an F32 scale may come before its 1-byte weight: it is written as a placeholder and filled in
    once the weight is encoded.  Entries neither in the source nor derived come from ``constant(name, dtype,
    shape)`` (layer configs, markers).  NaN/Inf in a source tensor is an error."""
    loaded = [n for n, _, _ in entries if n in source.tensors]
    writer = SafetensorsWriter(f, entries, metadata)
    pending: dict[str, int] = {}  # derived tensors written before their source: file offsets
    done: dict[str, torch.Tensor] = {}  # derived tensors of encoded sources, not yet reached
    with progress(sum(source.tensors[n].nbytes for n in loaded), desc, quiet=quiet) as bar, \
            contextlib.closing(prefetched(source.load, loaded)) as reader:
        for name, dtype, shape in entries:
            if name in done:
                writer.write(name, done.pop(name))
            elif name in derived:
                pending[name] = f.tell()
                writer.write(name, torch.zeros(shape, dtype=DTYPES[dtype][1]))
            elif name in source.tensors:
                _, tensor = next(reader)
                check_finite(name, tensor)
                out = encode(name, tensor)
                writer.write(name, out.pop(name).cpu())
                for key, value in out.items():
                    if key in pending:
                        _fill(f, pending.pop(key), value.cpu())
                    else:
                        done[key] = value.cpu()
                bar.update(source.tensors[name].nbytes)
            else:
                writer.write(name, constant(name, dtype, shape))
        writer.close()
    if pending or done:  # pragma: no cover - a planning bug
        raise RuntimeError(f"unwritten derived tensors: {sorted(pending) + sorted(done)}")


def _fill(f, offset: int, value: torch.Tensor) -> None:
    here = f.tell()
    f.seek(offset)
    f.write(tensor_bytes(value))
    f.seek(here)
