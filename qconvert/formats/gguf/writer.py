"""GGUF files for the Qwen-Image transformer: plan (exact bytes), then stream.

``plan_gguf`` is a pure function of the source header and the options: every
tensor's type and byte count, the metadata, and the exact file size, which it
gets by laying out the header with the same gguf-py ``GGUFWriter`` that later
writes it.  ``write_gguf`` then reads each source tensor once, quantizes it to
every type the planned files need, and appends it to each file through
``GGUFWriter.write_tensor_data``: several levels are written side by side,
tensor by tensor, so memory holds a few tensors whatever the model's size: three
recycled read buffers (read ahead, encoding, written behind) and two encodings.

Layout (spec ``gguf.md`` §3, §11): bare diffusers names in sorted order;
``general.architecture = "qwen_image"``, ``general.quantization_version = 2``,
``general.file_type`` first, in that order; 32-byte alignment.  Unless
``minimal_metadata``, provenance follows as ``qconvert.*`` string keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Mapping, Sequence

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGML_QUANT_VERSION, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFWriter
from gguf.gguf_writer import WriterState

from qconvert.codecs.gguf import quants
from qconvert.core.checkpoint import Checkpoint
from qconvert.core.errors import QConvertError
from qconvert.core.io import atomic_output, check_disk_space
from qconvert.core.models import qwen_image as qi
from qconvert.core.pipeline import BufferRing, TensorPlan, parse_device, prefetched, progress, provenance, type_counts

from .policy import FILE_TYPE, LEVELS, assign_types, tensor_nbytes
from .reader import GGML_MAX_DIMS, GGML_MAX_NAME

ARCHITECTURE = qi.ARCHITECTURE  # "qwen_image": ComfyUI-GGUF's IMG_ARCH_LIST entry
METADATA_PREFIX = "qconvert."


def _pad(n: int) -> int:
    return GGUFWriter.ggml_pad(n, GGUF_DEFAULT_ALIGNMENT)


@dataclass(frozen=True)
class GGUFPlan:
    """One GGUF file: its tensors in file order, extra metadata and exact size."""

    level: str
    policy: str
    tensors: tuple  # TensorPlan rows, sorted by name
    metadata: tuple = ()  # (key, string value) after the three general.* keys
    header_bytes: int = 0  # header + KV + tensor infos, padded to the alignment

    @property
    def file_type(self) -> int:
        return FILE_TYPE[self.level]

    @property
    def bytes(self) -> int:
        return self.header_bytes + sum(_pad(t.out_bytes) for t in self.tensors)

    def to_json(self) -> dict:
        roles: dict = {}
        for t in self.tensors:
            roles.setdefault(t.role, Counter())[t.out_type] += 1
        return {
            "level": self.level,
            "policy": self.policy,
            "file_type": self.file_type,
            "bytes": self.bytes,
            "types": type_counts(self.tensors),
            "roles": {role: dict(sorted(c.items())) for role, c in sorted(roles.items())},
            "metadata": dict(self.metadata),
            "tensors": {t.out_name: t.out_type for t in self.tensors},
        }


def _role(name: str) -> str:
    return qi.describe(name).role.value if qi.is_known(name) else "extra"


def plan_gguf(source, level: str, *, policy: str, metadata: Sequence[tuple[str, str]] = (),
              has_imatrix: bool = False, chosen: Mapping[str, GGMLQuantizationType] | None = None) -> GGUFPlan:
    """Types, byte counts and file size from the source header alone; ``chosen`` (``--policy measured``)
    gives the block linears' types, the rest keep the fixed rules'."""
    shapes = source.shapes()
    for name, shape in shapes.items():  # only --allow-extra tensors can break ggml's rules
        if not 1 <= len(shape) <= GGML_MAX_DIMS:
            raise QConvertError(f"tensor {name} has {len(shape)} dimensions; qconvert writes GGUF tensors of 1 to "
                                f"{GGML_MAX_DIMS} (ggml reads at most {GGML_MAX_DIMS}): leave it out of the source")
        if len(name.encode("utf-8")) >= GGML_MAX_NAME:
            raise QConvertError(f"tensor {name}: ggml reads GGUF tensor names shorter than {GGML_MAX_NAME} bytes: "
                                "leave it out of the source")
    types = assign_types(shapes, level, source.config, policy="uniform" if chosen else policy,
                         has_imatrix=has_imatrix)
    types.update(chosen or {})
    tensors = tuple(
        TensorPlan(name, name, tuple(shapes[name]), qtype.name, tensor_nbytes(qtype, tuple(shapes[name])),
                   _role(name))
        for name, qtype in types.items())
    plan = GGUFPlan(level, policy, tensors, tuple(metadata))
    header = io.BytesIO()
    _start_file(header, plan)
    return dataclasses.replace(plan, header_bytes=_pad(header.tell()))


def provenance_metadata(info: dict) -> tuple[tuple[str, str], ...]:
    """``pipeline.provenance`` as flat ``qconvert.*`` string keys (options inlined), sorted."""
    flat = {k: v for k, v in info.items() if k not in ("tool", "options")}
    flat.update(info.get("options", {}))
    return tuple((METADATA_PREFIX + k, v if isinstance(v, str) else json.dumps(v, sort_keys=True))
                 for k, v in sorted(flat.items()))


def plan_files(source, levels: Sequence[str], *, policy: str, minimal_metadata: bool = False,
               dry_run: bool = False, imatrix: str | None = None, chosen: Mapping | None = None,
               measured: dict | None = None) -> list[GGUFPlan]:
    """One plan per level.  Provenance (which fingerprints the source) is computed once.
    ``imatrix`` is how provenance names the importance matrix ("calib.safetensors sha256:…");
    ``chosen`` maps a level to its measured types, ``measured`` says what they were measured on."""
    options = {"policy": policy, **({"imatrix": imatrix} if imatrix else {}), **(measured or {})}
    info = None if minimal_metadata else provenance(source, fmt="gguf", options=options, dry_run=dry_run)
    plans = []
    for level in levels:
        metadata = ()
        if info is not None:
            metadata = provenance_metadata({**info, "options": {**info["options"], "level": level}})
        plans.append(plan_gguf(source, level, policy=policy, metadata=metadata, has_imatrix=imatrix is not None,
                               chosen=(chosen or {}).get(level)))
    return plans


# ------------------------------------------------------------------ container

class _FileObjectWriter(GGUFWriter):
    """gguf-py's writer, aimed at a file object we own instead of a path it opens.

    The file object is ``atomic_output``'s temporary (or a BytesIO when
    planning); it is never closed here.
    """

    def __init__(self, fileobj: BinaryIO):
        super().__init__(path=None, arch=ARCHITECTURE)
        self._fileobj = fileobj

    def open_output_file(self, path: Path | None = None) -> None:
        self.fout = [self._fileobj]
        self.state = WriterState.EMPTY


def _start_file(f: BinaryIO, plan: GGUFPlan) -> GGUFWriter:
    """Write header, KV pairs and tensor infos; the writer then expects the tensor data in order."""
    w = _FileObjectWriter(f)
    w.add_quantization_version(GGML_QUANT_VERSION)
    w.add_file_type(plan.file_type)
    for key, value in plan.metadata:
        w.add_string(key, value)
    for t in plan.tensors:
        # raw_dtype with a non-uint8 dtype: the shape is taken as the logical one.
        w.add_tensor_info(t.out_name, t.shape, np.dtype(np.float32), t.out_bytes,
                          raw_dtype=GGMLQuantizationType[t.out_type])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    return w


class GGUFFileWriter:
    """Streams one planned GGUF file: tensors must arrive in plan order, with planned sizes."""

    def __init__(self, f: BinaryIO, plan: GGUFPlan):
        self._f = f
        self._plan = plan
        self._writer = _start_file(f, plan)
        self._next = 0

    def write(self, name: str, data: np.ndarray) -> None:
        if self._next >= len(self._plan.tensors):
            raise RuntimeError(f"tensor {name} was not planned")
        planned = self._plan.tensors[self._next]
        if name != planned.name or data.nbytes != planned.out_bytes:
            raise RuntimeError(f"tensor {name} ({data.nbytes} bytes) written where the plan has "
                               f"{planned.name} ({planned.out_bytes} bytes)")
        self._writer.write_tensor_data(data)
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._plan.tensors):
            raise RuntimeError(f"only {self._next} of {len(self._plan.tensors)} tensors written")
        self._f.flush()
        if self._f.tell() != self._plan.bytes:
            raise RuntimeError(f"wrote {self._f.tell()} bytes, planned {self._plan.bytes}")


# ------------------------------------------------------------------- encoding

def encode(name: str, x: torch.Tensor, qtype: GGMLQuantizationType, *, device: str | None = None,
           on_slow_start: Callable[[str], None] | None = None, imatrix: torch.Tensor | None = None,
           out: np.ndarray | None = None) -> np.ndarray:
    """One tensor (any float dtype) as the bytes GGUF stores for ``qtype``; ``imatrix`` weights the
    block types' rounding error per input column, as llama-quantize does; ``out`` a buffer to reuse."""
    if imatrix is not None and GGML_QUANT_SIZES[qtype][0] == 1:
        imatrix = None  # float types are cast, not fitted
    return quants.quantize(x, qtype, imatrix, device=device, name=name, on_slow_start=on_slow_start, out=out)


def write_gguf(source, plans: Sequence[GGUFPlan], paths: Sequence[Path], *, device: str | None = None,
               quiet: bool = False, imatrix: dict | None = None) -> None:
    """Write every planned file, reading each source tensor once.  All or nothing.
    ``imatrix`` maps weight names to importance vectors (``calibrate``'s ``in_sq_mean``)."""
    parse_device(device)
    if len(plans) > 1:
        # Each atomic_output checks its own file; together they must fit too.
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        check_disk_space(paths[0], sum(p.bytes for p in plans))
    names = [t.name for t in plans[0].tensors]
    with contextlib.ExitStack() as stack:
        writers = [GGUFFileWriter(stack.enter_context(atomic_output(path, expected_bytes=plan.bytes)), plan)
                   for plan, path in zip(plans, paths)]
        bar = stack.enter_context(progress(sum(p.bytes for p in plans), "to-gguf", quiet=quiet))
        say = None if quiet else functools.partial(bar.write, file=sys.stderr)   # above the bar, if any
        # One encoding is written by this thread while the next is computed;
        # it is joined before the outputs close (or are removed on failure).
        write_behind = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="qconvert-write"))
        pending = None

        def write(name: str, data: np.ndarray, ks: list[int]) -> int:
            for k in ks:
                writers[k].write(name, data)
            return _pad(data.nbytes) * len(ks)

        # In its stored dtype: quantize upcasts chunk by chunk (or lets the
        # kernels read BF16), checks for NaN/Inf, and copies BF16 to BF16 as is.
        # Read into three recycled buffers (read ahead, encoding, written behind): tensor i's buffer is
        # refilled with tensor i+3, read once tensor i+2 is asked for, after tensor i+1's encoding waited
        # for tensor i's write (a BF16 tensor is written from the buffer itself).
        # Only a plain checkpoint: a wrapper (a LoRA merge) must go through its own load.
        load = source.load
        if isinstance(source, Checkpoint):
            load = functools.partial(source.load_into, buffers=BufferRing(3))
        tensors = stack.enter_context(contextlib.closing(prefetched(load, names)))
        # Block-type encodings alternate between two buffers: one written behind while the next is encoded.
        encoded = BufferRing(2)
        for i, (name, x) in enumerate(tensors):
            # Levels that share a type for this tensor share one encoding.
            by_type: dict[str, list[int]] = {}
            for k, plan in enumerate(plans):
                by_type.setdefault(plan.tensors[i].out_type, []).append(k)
            for out_type, ks in by_type.items():
                qtype = GGMLQuantizationType[out_type]
                # the float types (blocks of one) return their own array or the source itself: no buffer
                out = None if GGML_QUANT_SIZES[qtype][0] == 1 else encoded.take(plans[ks[0]].tensors[i].out_bytes)
                data = encode(name, x, qtype, device=device, on_slow_start=say, imatrix=(imatrix or {}).get(name),
                              out=None if out is None else out.numpy())
                if pending is not None:
                    bar.update(pending.result())
                pending = write_behind.submit(write, name, data, ks)
                del data
            del x
        if pending is not None:
            bar.update(pending.result())
        for w in writers:
            w.close()


# -------------------------------------------------------------- outputs, reports

def output_paths(model_name: str, levels: Sequence[str], output: Path | None) -> list[Path]:
    """``<model>-<LEVEL>.gguf`` as the community names them.

    One level: ``-o`` is the file (or an existing folder to put it in).  Several
    levels: ``-o`` is the folder.  Without ``-o``: the current folder.
    """
    names = [f"{model_name}-{level}.gguf" for level in levels]
    if output is None:
        return [Path(n) for n in names]
    output = Path(output)
    if len(levels) == 1 and not output.is_dir():
        if output.suffix.lower() != ".gguf":
            raise QConvertError(f"{output}: the output of one level is a .gguf file (or an existing folder)")
        return [output]
    if output.suffix.lower() == ".gguf":
        raise QConvertError(f"{output}: {len(levels)} levels write {len(levels)} files; give a folder with -o")
    return [output / n for n in names]


def report_json(plans: Sequence[GGUFPlan], paths: Sequence[Path], *, written: bool) -> dict:
    files = [{**plan.to_json(), "output": str(path), "written": written} for plan, path in zip(plans, paths)]
    if len(files) == 1:
        return files[0]
    levels = [p.level for p in plans]
    return {"level": "all" if levels == list(LEVELS) else ",".join(levels), "policy": plans[0].policy, "bytes": sum(p.bytes for p in plans), "written": written,
            "files": files}


def format_plan(plan: GGUFPlan, path: Path) -> str:
    """Type counts per role and the exact size, for --dry-run."""
    lines = [f"{path}  ({plan.level}, {plan.policy} policy, general.file_type {plan.file_type})"]
    for role, counts in plan.to_json()["roles"].items():
        lines.append(f"  {role:<14}" + ", ".join(f"{n} {t}" for t, n in counts.items()))
    lines.append(f"  {'total':<14}{len(plan.tensors)} tensors, {plan.bytes:,} bytes ({plan.bytes / 1e9:.2f} GB)")
    return "\n".join(lines)


# diffusers needs a config for a GGUF transformer; these repos have the right one per variant.
HUB_CONFIGS = {"qwen-image": "Qwen/Qwen-Image", "qwen-image-edit-2511": "Qwen/Qwen-Image-Edit-2511",
               "qwen-image-layered": "Qwen/Qwen-Image-Layered"}


def load_hints(path: Path, source) -> list[str]:
    """Where the file goes and how to load it (ComfyUI-GGUF, diffusers)."""
    config = source.path if source.layout == "diffusers" else HUB_CONFIGS.get(source.variant, "Qwen/Qwen-Image")
    return [
        "ComfyUI: put it in ComfyUI/models/diffusion_models/ (or models/unet/) and load it with the "
        "\"Unet Loader (GGUF)\" node of ComfyUI-GGUF",
        f"diffusers: QwenImageTransformer2DModel.from_single_file('{path}', "
        "quantization_config=GGUFQuantizationConfig(compute_dtype=torch.bfloat16), "
        f"torch_dtype=torch.bfloat16, config='{config}', subfolder='transformer')",
    ]
