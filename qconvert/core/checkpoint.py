"""Reading source checkpoints: validated headers first, tensors one at a time.

``open_checkpoint`` accepts a diffusers repo folder, a transformer folder with
sharded safetensors, a single ``.safetensors`` file (ComfyUI style, with or
without the ``model.diffusion_model.`` prefix) or a Hugging Face repo id.  It
reads and checks every header before anything else happens, and never holds
more than the one tensor asked for: ``load(name)`` reads that tensor through
safetensors' memory map.

Headers are treated as hostile: lengths, offsets, shapes and dtypes are all
checked against the file before a single tensor byte is trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping

import torch

from qconvert.core import untrusted
from qconvert.core.errors import CheckpointError
from qconvert.core.models import qwen_image as qi

if TYPE_CHECKING:
    from qconvert.core.pipeline import BufferRing

# safetensors dtype name → (bytes per element, torch dtype)
DTYPES: Mapping[str, tuple[int, torch.dtype]] = {
    "F64": (8, torch.float64),
    "F32": (4, torch.float32),
    "F16": (2, torch.float16),
    "BF16": (2, torch.bfloat16),
    "F8_E4M3": (1, torch.float8_e4m3fn),
    "F8_E5M2": (1, torch.float8_e5m2),
    "I64": (8, torch.int64),
    "I32": (4, torch.int32),
    "I16": (2, torch.int16),
    "I8": (1, torch.int8),
    "U8": (1, torch.uint8),
    "BOOL": (1, torch.bool),
}
TORCH_TO_DTYPE = {v[1]: k for k, v in DTYPES.items()}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}

# The safetensors library refuses headers above 100 MB; so do we.
MAX_HEADER_BYTES = 100 * 1024 * 1024
# Qwen-Image has 1,933 tensors and a whole ComfyUI checkpoint (VAE and text
# encoders too) a few thousand; a header with more is not a model we read.
MAX_TENSORS = 100_000
MAX_DIMS = 8
# Elements a shape may span, counting a zero dimension as one: an empty tensor
# with astronomically large other dimensions asks for work on them.
MAX_ELEMENTS = 2 ** 48
# Per entry: one object and two lists; about a dozen commas.  Metadata strings
# (kohya's tag lists, embedded workflows) add some: the room is generous.
HEADER_LIMITS = untrusted.Limits(objects=3 * MAX_TENSORS + 16, items=16 * MAX_TENSORS)
# config.json and shard indexes: a few KB to a few MB in real models.
MAX_JSON_FILE_BYTES = 64 * 1024 * 1024
INDEX_LIMITS = untrusted.Limits(objects=1024, items=2 * MAX_TENSORS)
CONFIG_LIMITS = untrusted.Limits(objects=1024, items=4096)
MAX_SHARDS = 4096
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
COMFY_PREFIXES = ("model.diffusion_model.",)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class TensorMeta:
    name: str  # the model name (prefix stripped)
    dtype: str  # safetensors dtype name
    shape: tuple
    file: Path
    key: str  # the key inside the file
    begin: int  # absolute byte offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: dict  # key → TensorMeta (name == key)
    metadata: dict
    data_start: int


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """Parse and validate one safetensors header without reading tensor data.

    The rules are the safetensors library's own (a header that starts with
    ``{``, tensors that tile the data section from its first byte to the end
    of the file, byte counts that match dtype and shape), so a file qconvert
    accepts is one every other loader accepts too, plus bounds on what the
    header may ask of us (tensor count, dimensions, JSON structure).
    """
    path = Path(path)
    refuse_pickle(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: file is {size} bytes, too short to be safetensors (truncated?)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise _not_safetensors(path, head, f"header length field says {n:,} bytes but the file has "
                                                   f"{size:,}")
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if raw[:1] != b"{":
        raise _not_safetensors(path, head, "header does not start with '{'")
    header = untrusted.load_json(raw, f"{path}: header", HEADER_LIMITS)
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata  # absent or null, as the library reads it
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    if len(header) > MAX_TENSORS:
        raise CheckpointError(f"{path}: {len(header):,} tensors, more than the {MAX_TENSORS:,} qconvert reads "
                              "from one file")
    data_start = 8 + n
    tensors: dict[str, TensorMeta] = {}
    spans = []
    for key, entry in header.items():
        where = f"{path}: tensor {untrusted.shown(key)}"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where}: header entry is {untrusted.type_name(entry)}, not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise CheckpointError(f"{where}: unknown dtype {untrusted.shown(dtype, 40)}")
        if (not isinstance(shape, list) or len(shape) > MAX_DIMS
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
            raise CheckpointError(f"{where}: malformed shape {untrusted.shown(shape, 60)}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise CheckpointError(f"{where}: malformed data_offsets {untrusted.shown(offsets, 60)}")
        extent = 1
        for s in shape:
            extent *= max(s, 1)
        if extent > MAX_ELEMENTS:
            raise CheckpointError(f"{where}: shape {untrusted.shown(shape, 60)} spans more than 2^48 elements; "
                                  "no real tensor is that large")
        begin, end = offsets
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * DTYPES[dtype][0]
        if begin < 0 or end < begin or end - begin != nbytes:
            raise CheckpointError(f"{where}: data_offsets {offsets} hold {end - begin:,} bytes but shape "
                                  f"{shape} {dtype} needs {nbytes:,}")
        spans.append((begin, end, key))
        tensors[key] = TensorMeta(key, dtype, tuple(shape), path, key, data_start + begin, nbytes)
    _check_tiling(path, sorted(spans), size - data_start, size)
    return SafetensorsHeader(path, tensors, metadata, data_start)


def _check_tiling(path: Path, spans: list, data_len: int, size: int) -> None:
    """Tensors must cover the data section exactly, in order, as the safetensors library requires."""
    at = 0
    for begin, end, key in spans:
        if begin != at:
            what = "overlaps the tensor before it" if begin < at else f"leaves a gap of {begin - at:,} bytes"
            raise CheckpointError(f"{path}: tensor {untrusted.shown(key)} {what} in the data section; "
                                  "the file is corrupt (the safetensors library refuses it too)")
        at = end
    if at > data_len:
        raise CheckpointError(f"{path}: the tensors' data ends at byte {size - data_len + at:,} but the file has "
                              f"{size:,} bytes; the file is truncated (re-download it)")
    if at < data_len:
        raise CheckpointError(f"{path}: {data_len - at:,} bytes follow the last tensor's data; the file is "
                              "corrupt or was appended to (the safetensors library refuses it too)")


def _not_safetensors(path: Path, head: bytes, why: str) -> CheckpointError:
    if _looks_like_pickle(head):
        return _pickle_error(path)
    if head[:4] == b"GGUF":
        return CheckpointError(f"{path}: this is a GGUF file, not safetensors; give the .safetensors it was made from")
    return CheckpointError(f"{path}: {why}; the file is corrupt or not safetensors")


def refuse_pickle(path: Path) -> None:
    """Pickle-based checkpoints can run code when loaded; we never open them."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: refusing a pickle checkpoint ({path.suffix}): loading pickles can execute arbitrary code. "
            "Convert it to .safetensors with a tool you trust, or use the model's safetensors release")


def _looks_like_pickle(head: bytes) -> bool:
    """torch.save writes a zip ("PK") or a raw pickle (protocol 2-5 opcode)."""
    return head[:2] == b"PK" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))


def _pickle_error(path: Path) -> CheckpointError:
    return CheckpointError(f"{path}: this is a pickle/zip (torch.save) file, not safetensors; refusing to load it "
                           "because unpickling can execute arbitrary code")


class TensorReader:
    """Reads tensors that a validated header describes, one open descriptor per file.

    A plain positioned read rather than a memory map: the header was
    validated when the file was opened, and a read leaves nothing mapped, so
    resident memory stays at one tensor however many have been read.
    """

    def __init__(self) -> None:
        self._fds: dict = {}

    def read(self, meta: TensorMeta, into: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor, in a fresh buffer or in the first bytes of ``into`` (uint8, large enough)."""
        if into is None:
            # Uninitialised: zero-filling first (bytearray) costs as much as the read.
            buf = torch.empty(meta.nbytes, dtype=torch.uint8)
        else:
            buf = into[:meta.nbytes]
        try:
            fd = self._fds.get(meta.file)
            if fd is None:
                fd = self._fds[meta.file] = os.open(meta.file, os.O_RDONLY)
            view, done = memoryview(buf.numpy()), 0
            while done < meta.nbytes:
                n = os.preadv(fd, [view[done:]], meta.begin + done)
                if n == 0:
                    raise CheckpointError(f"{meta.file}: tensor {meta.key} ends early; the file was truncated "
                                          "after it was opened")
                done += n
        except OSError as exc:
            raise CheckpointError(f"{meta.file}: cannot read tensor {meta.key}: {exc.strerror or exc}") from None
        dtype = DTYPES[meta.dtype][1]
        if meta.nbytes == 0:
            return torch.empty(meta.shape, dtype=dtype)
        return buf.view(dtype).reshape(meta.shape)

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass
class Checkpoint:
    """A validated source: config, tensor metadata, and one-at-a-time loading."""

    path: Path
    layout: str  # "diffusers", "transformer-folder" or "single-file"
    config: qi.QwenImageConfig
    tensors: dict  # model name → TensorMeta, sorted by name
    metadata: dict = field(default_factory=dict)
    extra: list = field(default_factory=list)  # names outside the model (allowed by --allow-extra)
    config_source: str = "config.json"
    repo_id: str | None = None  # set when the source was a Hugging Face repo id
    pipeline: str | None = None  # model_index.json's _class_name (a diffusers folder only)
    _reader: TensorReader = field(default_factory=TensorReader, repr=False)

    @property
    def variant(self) -> str:
        return qi.variant(self.config, self.tensors)

    @property
    def edits(self) -> bool:
        """An Edit model: it denoises beside a reference image, so that is how it is measured."""
        return qi.edits(self.config, self.pipeline)

    @property
    def name(self) -> str:
        """A short model name for default output file names (e.g. ``qwen-image``)."""
        if self.repo_id:
            return re.sub(r"[^A-Za-z0-9.]+", "-", self.repo_id.split("/")[-1]).strip("-").lower()
        base = self.path.name if self.layout != "single-file" else self.path.stem
        if self.layout == "transformer-folder" and base == "transformer":
            base = self.path.parent.name
        base = re.sub(r"^models--[^-]+--", "", base)
        return re.sub(r"[^A-Za-z0-9.]+", "-", base).strip("-").lower() or "model"

    def names(self) -> list[str]:
        return list(self.tensors)

    def shapes(self) -> dict[str, tuple]:
        return {n: t.shape for n, t in self.tensors.items()}

    @property
    def parameter_count(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def load(self, name: str) -> torch.Tensor:
        """Read one tensor (a fresh CPU tensor in its stored dtype)."""
        return self._reader.read(self.tensors[name])

    def load_into(self, name: str, buffers: BufferRing) -> torch.Tensor:
        """Read one tensor into the next of ``buffers``: a streaming writer that knows when each tensor
        is done with saves the page faults of a fresh allocation per tensor (4x the read itself)."""
        meta = self.tensors[name]
        return self._reader.read(meta, into=buffers.take(meta.nbytes))

    def close(self) -> None:
        self._reader.close()

    def __del__(self) -> None:
        self.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def files(self) -> list[Path]:
        return sorted({t.file for t in self.tensors.values()})

    def fingerprint(self) -> str:
        """A sha256 over every header plus sampled data (fast even for 41 GB).

        Full hashes of 41 GB would dominate a conversion; headers alone would
        not tell a fine-tune from its base.  Hashing each file's header, size
        and 16 evenly spaced 64 KiB windows of its data catches both.
        """
        h = hashlib.sha256()
        for path in self.files():
            size = path.stat().st_size
            h.update(os.fsencode(path.name) + f":{size}\n".encode())
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                h.update(f.read(n))
                data_start = 8 + n
                span = max(size - data_start, 0)
                for i in range(16):
                    f.seek(data_start + span * i // 16)
                    h.update(f.read(65536))
        return h.hexdigest()

    def provenance(self, *, dry_run: bool = False) -> dict:
        """Source, layout, fingerprint, variant.  The sampled fingerprint is cheap,
        so a dry run computes it too."""
        return {"source": self.repo_id or untrusted.path_text(self.path), "source_layout": self.layout,
                "source_fingerprint": "sha256-sampled:" + self.fingerprint(), "variant": self.variant}


# ------------------------------------------------------------------ opening

def open_checkpoint(source: str | os.PathLike, *, allow_extra: bool = False) -> Checkpoint:
    """Open and validate a Qwen-Image transformer checkpoint (see module docstring)."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if not path.exists():
        if _REPO_ID.match(text) and not text.startswith((".", "/")):
            ckpt = _open_folder(_download(text), allow_extra=allow_extra)
            ckpt.repo_id = text
            return ckpt
        raise CheckpointError(f"{text}: no such file or directory (and not a Hugging Face repo id like Qwen/Qwen-Image)")
    if path.is_dir():
        return _open_folder(path, allow_extra=allow_extra)
    if path.suffix.lower() == ".gguf":
        raise CheckpointError(f"{path}: GGUF files are outputs, not sources; convert from the BF16 safetensors instead")
    refuse_pickle(path)
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{path}: not a .safetensors file or a model folder")
    return _open_single(path, allow_extra=allow_extra)


def _open_single(path: Path, *, allow_extra: bool) -> Checkpoint:
    header = read_safetensors_header(path)
    keys = list(header.tensors)
    prefix = next((p for p in COMFY_PREFIXES if any(k.startswith(p) for k in keys)), "")
    tensors = {}
    for key, meta in header.tensors.items():
        if prefix:
            if not key.startswith(prefix):
                continue  # full ComfyUI checkpoints also hold the VAE and text encoders
            name = key[len(prefix):]
        else:
            name = key
        tensors[name] = TensorMeta(name, meta.dtype, meta.shape, path, key, meta.begin, meta.nbytes)
    if not qi.detect(tensors):
        raise CheckpointError(f"{path}: {qi.explain_not_qwen(tensors)}")
    config = qi.config_from_shapes({n: t.shape for n, t in tensors.items()}, str(path))
    return _finish(path, "single-file", config, tensors, header.metadata, allow_extra, "inferred from shapes")


def _open_folder(path: Path, *, allow_extra: bool) -> Checkpoint:
    layout = "transformer-folder"
    folder = path
    if (path / "model_index.json").is_file() or (path / "transformer").is_dir():
        folder = path / "transformer"
        layout = "diffusers"
        if not folder.is_dir():
            raise CheckpointError(f"{path}: model_index.json found but no transformer/ folder")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    shards = sorted(p for p in folder.iterdir() if p.suffix == ".safetensors" and p.is_file())
    if not shards:
        if pickles:
            refuse_pickle(folder / pickles[0])
        raise CheckpointError(f"{folder}: no .safetensors files found")

    index_path = folder / INDEX_NAME
    if index_path.is_file():
        weight_map = _read_index(index_path)
        shard_names = sorted(set(weight_map.values()))
        shards = [folder / s for s in shard_names]
        for s in shards:
            if not _is_file(s):
                raise CheckpointError(f"{index_path}: names shard {s.name}, which is missing from {folder}")
    elif len(shards) > 1:
        raise CheckpointError(f"{folder}: {len(shards)} safetensors files but no {INDEX_NAME}")
    else:
        weight_map = None

    tensors: dict[str, TensorMeta] = {}
    metadata: dict = {}
    for shard in shards:
        header = read_safetensors_header(shard)
        metadata.update(header.metadata)
        for key, meta in header.tensors.items():
            if key in tensors:
                raise CheckpointError(f"tensor {key} appears in both {tensors[key].file.name} and {shard.name}")
            if weight_map is not None and weight_map.get(key) != shard.name:
                raise CheckpointError(f"{index_path}: tensor {key} is in {shard.name} but the index says "
                                      f"{weight_map.get(key, 'nothing')}; the index does not match the shards")
            tensors[key] = meta
    if weight_map is not None:
        absent = [k for k in weight_map if k not in tensors]
        if absent:
            raise CheckpointError(f"{index_path}: lists tensor {absent[0]} in {weight_map[absent[0]]}, "
                                  f"but that shard does not contain it ({len(absent)} such)")
    if not qi.detect(tensors):
        raise CheckpointError(f"{folder}: {qi.explain_not_qwen(tensors)}")

    config_path = folder / "config.json"
    if config_path.is_file():
        raw = read_json_file(config_path, CONFIG_LIMITS)
        if not isinstance(raw, dict):
            raise CheckpointError(f"{config_path}: not a JSON object")
        cls = untrusted.field_str(raw, "_class_name", str(config_path), default=qi.DIFFUSERS_CLASS)
        if cls != qi.DIFFUSERS_CLASS:
            raise CheckpointError(f"{config_path}: _class_name is {untrusted.shown(cls, 60)}, "
                                  f"not {qi.DIFFUSERS_CLASS}")
        config, how = qi.QwenImageConfig.from_json(raw, str(config_path)), "config.json"
    else:
        config = qi.config_from_shapes({n: t.shape for n, t in tensors.items()}, str(folder))
        how = "inferred from shapes"
    root = path if layout == "diffusers" else folder
    pipeline = _pipeline_class(path / "model_index.json") if layout == "diffusers" else None
    return _finish(root, layout, config, tensors, metadata, allow_extra, how, pipeline)


def _pipeline_class(index_path: Path) -> str | None:
    """model_index.json's ``_class_name``: the one place an Edit or Edit-2509 folder says it is one."""
    if not _is_file(index_path):
        return None
    raw = read_json_file(index_path, CONFIG_LIMITS)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{index_path}: not a JSON object")
    return untrusted.field_str(raw, "_class_name", str(index_path), default=None)


def _read_index(index_path: Path) -> dict:
    index = read_json_file(index_path, INDEX_LIMITS)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: not a safetensors index (no weight_map object)")
    for key, shard in weight_map.items():
        # An index is just JSON: it must not point outside its own folder.
        if not isinstance(shard, str) or not _is_shard_name(shard):
            raise CheckpointError(f"{index_path}: tensor {untrusted.shown(key)} maps to an invalid shard name "
                                  f"'{untrusted.shown(shard, 80)}' (not a .safetensors file name in this folder)")
    if len(set(weight_map.values())) > MAX_SHARDS:
        raise CheckpointError(f"{index_path}: names {len(set(weight_map.values())):,} shards, more than the "
                              f"{MAX_SHARDS:,} qconvert reads")
    return weight_map


def _is_shard_name(name: str) -> bool:
    """A plain file name in the same folder: no separators, NUL or control characters, within NAME_MAX."""
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return (name.endswith(".safetensors") and len(encoded) <= 255 and name.isprintable()
            and not any(c in name for c in "/\\"))


def read_json_file(path: Path, limits: untrusted.Limits) -> object:
    """A small JSON file (config, index) read within size and structure bounds."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_FILE_BYTES:
            raise CheckpointError(f"{path}: {size:,} bytes, far larger than a file of this kind can be; "
                                  "the file is corrupt")
        raw = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return untrusted.load_json(raw, str(path), limits)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError) as exc:  # a name the file system cannot take
        raise CheckpointError(f"{path}: cannot look it up: {getattr(exc, 'strerror', None) or exc}") from None


def _finish(path, layout, config, tensors, metadata, allow_extra, how, pipeline=None) -> Checkpoint:
    for name, meta in tensors.items():
        if meta.dtype not in FLOAT_DTYPES and name != qi.MARKER_EDIT_2511:
            raise CheckpointError(
                f"{meta.file}: tensor {name} is {meta.dtype}; sources must be BF16/F16/F32 "
                "(this looks like an already quantized file)")
    shapes = {n: t.shape for n, t in tensors.items()}
    extra = qi.check_keys(config, shapes, allow_extra=allow_extra, where=str(path))
    tensors = dict(sorted(tensors.items()))
    return Checkpoint(Path(path), layout, config, tensors, metadata, extra, how, pipeline=pipeline)


def _download(repo_id: str) -> Path:
    """Fetch (or find in the cache) a Hub repo's transformer files only."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(
            repo_id,
            allow_patterns=["model_index.json", "transformer/*.json", "transformer/*.safetensors"],
        ))
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
        raise CheckpointError(f"{repo_id}: not in the local Hugging Face cache and {why}; "
                              "download it once online, or pass a local path") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{repo_id}: no such repository on the Hugging Face Hub (or it is private: "
                              "log in with `hf auth login`)") from None
    except (HfHubHTTPError, OSError) as exc:  # server errors, a full disk, a cache we cannot write
        first_line = (str(exc).splitlines() or [""])[0]
        raise CheckpointError(f"{repo_id}: download failed ({type(exc).__name__}: {first_line}); "
                              "try again, or pass a local path") from None


def iter_tensors(ckpt: Checkpoint, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time; each tensor is dropped before the next is read."""
    for name in names if names is not None else ckpt.names():
        yield name, ckpt.load(name)
