"""Writing outputs: atomically, after checking the disk, tensor by tensor.

Every converter writes through ``atomic_output``: the bytes go to a hidden
temporary file beside the target, which is fsync'ed and renamed over the
final name only when everything succeeded.  An exception, a failed check or
Ctrl-C leaves nothing under the final name (and removes the temporary).

``SafetensorsWriter`` streams a safetensors file whose header is planned from
names, dtypes and shapes alone, so no more than one tensor is ever in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from qconvert.core.checkpoint import DTYPES, TORCH_TO_DTYPE
from qconvert.core.errors import QConvertError

# Room left free beside a planned output, for metadata, filesystem overhead
# and whatever else is writing to the disk.
DISK_MARGIN = 64 * 1024 * 1024


def check_disk_space(target: Path, needed: int) -> None:
    folder = Path(target).resolve().parent
    free = shutil.disk_usage(folder).free
    if needed + DISK_MARGIN > free:
        raise QConvertError(
            f"{target}: needs {needed / 1e9:.2f} GB but only {free / 1e9:.2f} GB is free on {folder}; "
            "free some space or choose another output folder with -o")


WRITEBACK_BYTES = 64 * 1024 * 1024


class _EarlyWriteback(io.BufferedWriter):
    """A file that asks the kernel to start writing each 64 MiB to disk as soon as it is written.

    Otherwise Linux holds the dirty pages until the final fsync (up to its
    dirty limit, gigabytes), which then waits for the whole file: measured
    here, 2 s of a 5.5 s Q8_0 conversion.  ``POSIX_FADV_DONTNEED`` on a
    written range starts its writeback without waiting, and drops the pages
    once clean, so an output of many GB does not push the source being read
    out of the page cache.  Where the call does not exist, a plain file."""

    def __init__(self, fd: int):
        super().__init__(io.FileIO(fd, "wb"), buffer_size=1 << 20)
        self._written_back = 0

    def write(self, data) -> int:
        n = super().write(data)
        self._write_back()
        return n

    def flush(self) -> None:
        # numpy's ``tofile`` (gguf-py writes tensors with it) flushes, then writes to the descriptor itself.
        super().flush()
        self._write_back()

    def _write_back(self) -> None:
        end = self.tell()
        if end - self._written_back >= WRITEBACK_BYTES:
            super().flush()
            with contextlib.suppress(OSError):
                os.posix_fadvise(self.fileno(), self._written_back, end - self._written_back,
                                 os.POSIX_FADV_DONTNEED)
            self._written_back = end


@contextlib.contextmanager
def atomic_output(target: str | os.PathLike, *, expected_bytes: int | None = None) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``target``; rename it into place on success only."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_dir():
        raise QConvertError(f"{target}: is a folder; give a file name")
    if expected_bytes is not None:
        check_disk_space(target, expected_bytes)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    tmp_path = Path(tmp)
    try:
        with (_EarlyWriteback(fd) if hasattr(os, "posix_fadvise") else os.fdopen(fd, "wb")) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, target)
        fsync_dir(target.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, expected_bytes: int | None = None) -> Iterator[Path]:
    """A temporary folder beside ``target``, renamed into place on success only.

    An existing ``target`` is replaced only after the new one is complete.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise QConvertError(f"{target}: exists and is not a folder")
    if expected_bytes is not None:
        check_disk_space(target, expected_bytes)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        os.chmod(tmp, 0o755)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ------------------------------------------------------------- safetensors

def safetensors_header(entries: Sequence[tuple[str, str, tuple]],
                       metadata: Mapping[str, str] | None = None) -> tuple[bytes, list[int]]:
    """The exact header bytes (length prefix included) and each tensor's data size.

    Compact JSON padded with spaces to a multiple of 8, tensors in the given
    order: what the safetensors library writes for sorted keys.
    """
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset, sizes = 0, []
    for name, dtype, shape in entries:
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * DTYPES[dtype][0]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        sizes.append(nbytes)
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, sizes


def safetensors_size(entries: Sequence[tuple[str, str, tuple]], metadata: Mapping[str, str] | None = None) -> int:
    header, sizes = safetensors_header(entries, metadata)
    return len(header) + sum(sizes)


class SafetensorsWriter:
    """Writes tensors in exactly the planned order, checking each against the plan."""

    def __init__(self, f: BinaryIO, entries: Sequence[tuple[str, str, tuple]],
                 metadata: Mapping[str, str] | None = None):
        self._f = f
        self._entries = list(entries)
        header, self._sizes = safetensors_header(self._entries, metadata)
        f.write(header)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._entries):
            raise RuntimeError(f"tensor {name} was not planned")
        planned, dtype, shape = self._entries[self._next]
        if name != planned:
            raise RuntimeError(f"writing {name} but the plan expects {planned} next")
        if TORCH_TO_DTYPE.get(tensor.dtype) != dtype or tuple(tensor.shape) != tuple(shape):
            raise RuntimeError(f"tensor {name}: got {tensor.dtype} {list(tensor.shape)}, planned {dtype} {list(shape)}")
        data = tensor_bytes(tensor)
        if len(data) != self._sizes[self._next]:
            raise RuntimeError(f"tensor {name}: {len(data)} bytes, planned {self._sizes[self._next]}")
        self._f.write(data)
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._entries):
            missing = self._entries[self._next][0]
            raise RuntimeError(f"only {self._next} of {len(self._entries)} tensors written (next: {missing})")


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The little-endian bytes of a CPU tensor, without a copy when it is contiguous."""
    t = tensor.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    itemsize = t.element_size()
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[itemsize]
    arr = t.view(as_int).numpy() if t.dtype != torch.bool else t.numpy()
    return memoryview(np.ascontiguousarray(arr)).cast("B")


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Small helper for in-memory dicts (tests, tiny models): sorted, atomic."""
    names = sorted(tensors)
    entries = [(n, TORCH_TO_DTYPE[tensors[n].dtype], tuple(tensors[n].shape)) for n in names]
    with atomic_output(path, expected_bytes=safetensors_size(entries, metadata)) as f:
        w = SafetensorsWriter(f, entries, metadata)
        for n in names:
            w.write(n, tensors[n])
        w.close()


def file_sha256(path: str | os.PathLike, progress: Callable[[int], None] | None = None) -> str:
    """A file's sha256 in 16 MiB reads; ``progress(n)`` after each, for the bars of long checks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
            if progress:
                progress(len(chunk))
    return h.hexdigest()


def safetensors_target(output: str | os.PathLike | None, default_name: str, source_path=None) -> Path:
    """Where a single-file converter writes: ``-o`` as given, ``default_name`` inside ``-o`` when it is a folder,
    or in the current folder.  A file name must end in .safetensors (or .sft) and must not be the source."""
    if output is None:
        return Path(default_name)
    out = Path(output)
    if out.is_dir() or str(output).endswith(("/", os.sep)):
        return out / default_name
    if out.suffix.lower() not in (".safetensors", ".sft"):
        raise QConvertError(f"{out}: give the output a .safetensors name (ComfyUI loads .pt/.bin names with "
                            "torch.load, which cannot read safetensors)")
    if source_path is not None and out.resolve() == Path(source_path).resolve():
        raise QConvertError(f"{out}: this is the source file; choose another output name")
    return out
