"""Opening GGUF files safely: check the header ourselves, then let gguf-py read it.

gguf-py's ``GGUFReader`` follows every count and length in a file as it
finds it: an array length of 2^60, a string longer than the file or an
unknown type code becomes a numpy error, an endless loop or a huge
allocation.  ``check_header`` walks the same structure first, with plain
``struct`` reads of a bounded prefix of the file, and refuses anything that
ggml's own loader (``gguf_init_from_file``) would refuse or that asks for
more work than a diffusion model's GGUF needs:

* magic, version 2 or 3, little-endian (ggml reads the machine's byte order);
* counts, string lengths and array lengths that fit in what is left of the
  header, which is bounded (``MAX_HEADER_BYTES``);
* UTF-8 keys, names and strings, no empty or duplicate keys, no duplicate
  tensor names, no arrays of arrays, ``general.alignment`` a UINT32 power of
  two;
* per tensor: a name shorter than 64 bytes, at most 4 dimensions, a type
  gguf-py knows, rows a whole number of blocks, data where ggml expects it
  (offsets in order, each padded to the alignment, the padded data section
  inside the file).

Only then does ``open_gguf`` hand the path to gguf-py.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from qconvert.core.errors import CheckpointError
from qconvert.core.untrusted import check_text, shown

MAGIC = b"GGUF"
VERSIONS = (2, 3)
# A Qwen-Image GGUF's header is about 200 KB; an LLM's, with its vocabulary, a few MB.
MAX_HEADER_BYTES = 64 * 1024 * 1024
MAX_TENSORS = 16_384  # Qwen-Image has 1,933; gguf-py takes ~120 us a tensor
MAX_KV = 4096  # a diffusion GGUF has about 20 keys, an LLM's about 50; gguf-py takes ~75 us a key
# gguf-py builds a Python object per array element; diffusion GGUFs have none.
MAX_ARRAY_ITEMS = 1 << 18
GGML_MAX_DIMS = 4  # ggml.h
GGML_MAX_NAME = 64  # ggml.h: names are stored in char[64], NUL included
SD_CPP_MAX_NAME = 128  # stable-diffusion.cpp builds ggml with GGML_MAX_NAME=128 (its imatrix files use it)
MAX_ELEMENTS = 2 ** 48
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"

# Types gguf-py reads element by element; it reshapes every other type as blocks of bytes.
_ELEMENT_TYPES = frozenset({GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.F64,
                            GGMLQuantizationType.I8, GGMLQuantizationType.I16, GGMLQuantizationType.I32,
                            GGMLQuantizationType.I64})
# GGUF value types: code → (name, struct format or None for string/array).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY, _UINT32 = 8, 9, 4


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple  # ggml order (ne0 first)
    type_code: int
    offset: int  # relative to the data section
    nbytes: int


@dataclass(frozen=True)
class Header:
    version: int
    metadata_keys: tuple
    tensors: tuple  # TensorInfo
    data_start: int
    alignment: int


class _Cursor:
    """Bounded reads from the header prefix; running past it is the file's fault."""

    def __init__(self, path: Path, buf: bytes, max_name: int):
        self.path, self.buf, self.pos, self.max_name = path, buf, 0, max_name

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {what} (at byte {self.pos:,}); the GGUF file is corrupt or hostile")

    def take(self, n: int) -> bytes:
        if n > len(self.buf) - self.pos:
            if len(self.buf) >= MAX_HEADER_BYTES:
                raise self.fail(f"the header is larger than the {MAX_HEADER_BYTES >> 20} MiB qconvert reads")
            raise self.fail(f"needs {n:,} more bytes but the file ends")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        return struct.unpack("<" + fmt, self.take(size))[0]

    def name(self, what: str) -> str:
        """A key or tensor name: ggml looks them up as C strings, so a NUL would make it another name."""
        text = self.string(what)
        if "\0" in text:
            as_c_string = text.split("\0")[0]
            raise self.fail(f"{what} {shown(text)} holds a NUL byte; ggml would read it as {shown(as_c_string)}")
        return text

    def string(self, what: str) -> str:
        n = self.unpack("Q")
        raw = self.take(n)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None
        return check_text(text, str(self.path), what)


def check_header(path: str | Path, *, max_name: int = GGML_MAX_NAME) -> Header:
    """Validate a GGUF file's header against the file (see module docstring).  ``max_name`` is the
    GGML_MAX_NAME of the ggml build that will read the file (128 for stable-diffusion.cpp's)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            buf = f.read(min(size, MAX_HEADER_BYTES))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if buf[:4] != MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (no GGUF magic)")
    if len(buf) < 24:
        raise CheckpointError(f"{path}: {size} bytes, too short for a GGUF header; the file is truncated")
    version = struct.unpack_from("<I", buf, 4)[0]
    if version & 0xFFFF == 0 and struct.unpack_from(">I", buf, 4)[0] in VERSIONS:
        # gguf-py would read it, but ggml reads GGUF in the machine's own (little-endian) byte order.
        raise CheckpointError(f"{path}: a big-endian GGUF file; ggml (llama.cpp, ComfyUI-GGUF's kernels) on "
                              "little-endian machines cannot load it")
    if version not in VERSIONS:
        raise CheckpointError(f"{path}: GGUF version {version}; qconvert reads versions 2 and 3")
    cur = _Cursor(path, buf, max_name)
    cur.pos = 8
    n_tensors, n_kv = cur.unpack("Q"), cur.unpack("Q")
    if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
        raise cur.fail(f"{n_tensors:,} tensors and {n_kv:,} metadata keys, more than qconvert reads "
                       f"({MAX_TENSORS:,} and {MAX_KV:,})")
    keys: dict = {}  # insertion-ordered; a set's lookups, so 65,536 keys stay linear work
    alignment, budget = DEFAULT_ALIGNMENT, [MAX_ARRAY_ITEMS]
    for _ in range(n_kv):
        key = cur.name("metadata key")
        if not key:
            raise cur.fail("a metadata key is empty")
        if key in keys:
            raise cur.fail(f"metadata key {shown(key)} appears twice")
        keys[key] = None
        code = cur.unpack("I")
        if key == ALIGNMENT_KEY:
            if code != _UINT32:
                raise cur.fail(f"{ALIGNMENT_KEY} must be a UINT32")
            alignment = cur.unpack("I")
            if alignment == 0 or alignment & (alignment - 1):
                raise cur.fail(f"{ALIGNMENT_KEY} is {alignment}, not a power of two")
        else:
            _skip_value(cur, code, key, budget)
    tensors = [_tensor_info(cur) for _ in range(n_tensors)]
    names: set = set()
    for t in tensors:
        if t.name in names:
            raise cur.fail(f"tensor {shown(t.name)} appears twice")
        names.add(t.name)
    data_start = -(-cur.pos // alignment) * alignment
    _check_data(path, tensors, data_start, alignment, size)
    return Header(version, tuple(keys), tuple(tensors), data_start, alignment)


def _skip_value(cur: _Cursor, code: int, key: str, budget: list) -> None:
    if code in _SCALARS:
        cur.take(struct.calcsize(_SCALARS[code]))
    elif code == _STRING:
        cur.string(f"the value of {shown(key)}")
    elif code == _ARRAY:
        item, count = cur.unpack("I"), cur.unpack("Q")
        # ggml checks the item type even of an empty array, and reads no arrays of arrays.
        if item not in _SCALARS and item != _STRING:
            what = "an array of arrays" if item == _ARRAY else f"an array of unknown value type {item}"
            raise cur.fail(f"{shown(key)} is {what}, which ggml does not read")
        budget[0] -= count
        if budget[0] < 0:
            raise cur.fail(f"arrays hold more than {MAX_ARRAY_ITEMS:,} items in all; qconvert reads diffusion "
                           "model GGUFs, which have none (is this a language model?)")
        if item in _SCALARS:
            cur.take(count * struct.calcsize(_SCALARS[item]))
        else:
            for _ in range(count):
                cur.string(f"an item of {shown(key)}")
    else:
        raise cur.fail(f"{shown(key)} has unknown value type {code}")


def _tensor_info(cur: _Cursor) -> TensorInfo:
    name = cur.name("tensor name")
    if len(name.encode("utf-8")) >= cur.max_name:
        raise cur.fail(f"tensor name {shown(name)} is {len(name.encode('utf-8'))} bytes; ggml reads names "
                       f"shorter than {cur.max_name}")
    n_dims = cur.unpack("I")
    if n_dims > GGML_MAX_DIMS:
        raise cur.fail(f"tensor {shown(name)} has {n_dims} dimensions (ggml allows at most {GGML_MAX_DIMS})")
    shape = tuple(cur.unpack("Q") for _ in range(n_dims))
    code, offset = cur.unpack("I"), cur.unpack("Q")
    extent = 1
    for d in shape:
        extent *= max(d, 1)
    if extent > MAX_ELEMENTS:
        raise cur.fail(f"tensor {shown(name)} has shape {list(shape)}, more than 2^48 elements")
    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(code)]
    except (ValueError, KeyError):
        raise cur.fail(f"tensor {shown(name)} has unknown type code {code}") from None
    if not shape and GGMLQuantizationType(code) not in _ELEMENT_TYPES:
        # ggml reads it as one value; gguf-py indexes the last dimension of every block type's shape.
        raise cur.fail(f"tensor {shown(name)} has 0 dimensions and type {GGMLQuantizationType(code).name}, "
                       "which gguf-py (ComfyUI-GGUF, diffusers) cannot read")
    row = shape[0] if shape else 1  # ggml reads missing dimensions as 1
    if row % block:
        raise cur.fail(f"tensor {shown(name)} has rows of {row} values, not a multiple of its type's "
                       f"block of {block}")
    numel = 1
    for d in shape:
        numel *= d
    return TensorInfo(name, shape, code, offset, numel // block * type_size)


def _check_data(path: Path, tensors: list, data_start: int, alignment: int, size: int) -> None:
    """Tensors packed in order, each padded to the alignment, as ggml requires."""
    at = 0
    for t in tensors:
        if t.offset != at:
            raise CheckpointError(f"{path}: tensor {shown(t.name)} starts at data offset {t.offset:,} but ggml "
                                  f"expects {at:,}; the GGUF file is corrupt")
        at += -(-t.nbytes // alignment) * alignment
        # ggml reads the data section whole, the last tensor's padding included.
        if data_start + at > size:
            raise CheckpointError(f"{path}: tensor {shown(t.name)} and its padding end at byte {data_start + at:,} "
                                  f"but the file has {size:,}; the file is truncated (re-download it)")


def open_gguf(path: str | Path, *, max_name: int = GGML_MAX_NAME):
    """gguf-py's reader over a file whose header ``check_header`` accepted."""
    import gguf

    check_header(path, max_name=max_name)
    return gguf.GGUFReader(str(path))
