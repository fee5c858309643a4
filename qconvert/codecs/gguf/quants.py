"""ggml-exact GGUF tensor encoders (F32, F16, BF16, legacy and K-quants).

``quantize`` reproduces what ggml's ``ggml_quantize_chunk`` writes, byte for
byte: the ``quantize_row_*_ref`` functions without an importance matrix and the
``quantize_row_*_impl`` ones with it (Q8_0 ignores it, as in ggml).  The
quantized types run in float32 whole chunks of blocks at a time (see ``_fit``
for how ggml's sequential float32 order is kept); F32/F16/BF16 are one
checked cast of the whole tensor.

gguf-py 0.19 cannot quantize the K types.  Its legacy and float encoders were
measured and not reused: they are single-threaded numpy without imatrix paths
(250-750 MB/s on one core here, about what one torch worker does) and its
Q4_0/Q4_1/Q5_0/Q5_1 differ from ggml on signed-zero and subnormal blocks.
``dequantize`` does delegate to gguf-py: it decodes every type written here
exactly, at 300-450 MB/s, which is plenty for tests and ``inspect``; nothing
in a conversion decodes.

On the CPU the chunks run on a small pool of single-threaded workers
(:func:`_cpu_pool`), one chunk each.  There, when numba is installed, the
quantized types run ggml's routines compiled with numba (``_cpu``, 3-15x
faster than the torch ops, which cost a memory pass per float32 operation);
the torch code serves CUDA devices and machines without numba, and
``backend=`` picks one explicitly (tests and benchmarks compare the two).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from torch import Tensor

from qconvert.codecs.gguf._fit import F32, div, seq_sum
from qconvert.codecs.gguf.types import FLOAT, IQ, LEGACY, TYPES, K, cpu_kernels, of_family
from qconvert.core.errors import QuantizationError
from qconvert.core.pipeline import all_finite, nonfinite_error

__all__ = [
    "FLOAT_TYPES",
    "IQ_QUANTS",
    "K_QUANTS",
    "LEGACY_QUANTS",
    "SUPPORTED_TYPES",
    "block_size",
    "bytes_per_row",
    "dequantize",
    "quantize",
    "type_size",
]

K_QUANTS = of_family(K)
IQ_QUANTS = of_family(IQ)
LEGACY_QUANTS = of_family(LEGACY)
FLOAT_TYPES = of_family(FLOAT)
SUPPORTED_TYPES = frozenset(TYPES)

# Elements per chunk.  On the CPU each worker thread takes one chunk at a time:
# measured best at 2^17-2^18 (0.5-1 MB of float32), where per-op overheads are
# amortised and the working set still mostly fits the 2 MB L2 (``GgmlType.cpu_chunk``;
# Q3_K prefers 2^19).  On a GPU a chunk must be large enough to fill the device.
_GPU_CHUNK = 1 << 23
_F16_MAX = 65504.0
_STORED_AS = {QT.F32: torch.float32, QT.F16: torch.float16, QT.BF16: torch.bfloat16}


def block_size(qtype: QT) -> int:
    """Elements per block (1 for the float types)."""
    return gguf.GGML_QUANT_SIZES[QT(qtype)][0]


def type_size(qtype: QT) -> int:
    """Bytes per block."""
    return gguf.GGML_QUANT_SIZES[QT(qtype)][1]


def bytes_per_row(qtype: QT, n: int) -> int:
    """Bytes of one row of ``n`` elements; ``n`` must fill whole blocks."""
    bs, ts = gguf.GGML_QUANT_SIZES[QT(qtype)]
    if n % bs:
        raise QuantizationError(f"a row of {n} elements is not a whole number of {QT(qtype).name} blocks of {bs}")
    return n // bs * ts


def quantize(
    data: Tensor | np.ndarray,
    qtype: QT,
    imatrix: Tensor | np.ndarray | None = None,
    *,
    device: str | torch.device | None = None,
    name: str | None = None,
    backend: str | None = None,
    on_slow_start: Callable[[str], None] | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Encode ``data`` along its last axis as ggml's ``ggml_quantize_chunk``.

    ``data`` is any floating torch tensor or numpy array (BF16 values are
    upcast to float32 exactly); ``imatrix`` an optional per-column importance
    vector of the row length.  Returns uint8 of shape
    ``(*data.shape[:-1], bytes_per_row(qtype, data.shape[-1]))`` for every
    type, F32/F16/BF16 included (their raw little-endian values).

    ``backend`` ("torch" or "numba") forces an implementation; by default the
    quantized types use numba on the CPU when it is installed, torch otherwise.
    Both write the same bytes.  A numba kernel compiles on its first use on a
    machine (then loads from numba's cache in about a second); when that
    first call runs long, ``on_slow_start`` gets a line to show the user.
    ``out``, a uint8 buffer of at least the encoding's bytes, receives the
    block types' bytes (a streaming writer recycles it rather than fault in
    fresh pages per tensor); the float types always return a new array or the
    source itself.
    """
    qtype = QT(qtype)
    label = name or "<unnamed>"
    if qtype not in SUPPORTED_TYPES:
        raise QuantizationError(f"tensor {label}: cannot encode {qtype.name}; supported: "
                                f"{', '.join(sorted(t.name for t in SUPPORTED_TYPES))}")
    rows = _source_rows(data, label)
    lead_shape = tuple(data.shape[:-1])
    n_rows, n = rows.shape
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    if n % bs:
        raise QuantizationError(f"tensor {label}: row length {n} is not a multiple of the "
                                f"{qtype.name} block size {bs}")
    if rows.numel() == 0:
        # Variant markers such as Edit-2511's `__index_timestep_zero__` hold no
        # elements; they encode to no bytes in any type.
        return np.empty((*lead_shape, n // bs * ts), dtype=np.uint8)
    dev = torch.device(device or "cpu")
    if qtype in FLOAT_TYPES:
        if backend is not None:
            _numba_kernels(qtype, dev, backend, label)      # refuses a backend it cannot honour
        return _encode_float(rows, qtype, dev, label).reshape(*lead_shape, n * ts)
    qw = None if imatrix is None else _importance(imatrix, n, label, dev)
    kernels = _numba_kernels(qtype, dev, backend, label)
    encode = (_encoder(qtype, rows, qw, dev, label) if kernels is None
              else _numba_encoder(qtype, kernels, rows, qw))

    nbytes = n_rows * n // bs * ts
    if out is None:
        out = np.empty(nbytes, dtype=np.uint8)
    elif out.dtype != np.uint8 or out.ndim != 1 or out.size < nbytes:
        raise QuantizationError(f"tensor {label}: out must be a uint8 vector of at least {nbytes} bytes")
    out = out[:nbytes].reshape(n_rows * n // bs, ts)
    flat = rows.reshape(-1, bs)
    chunk = TYPES[qtype].cpu_chunk if dev.type == "cpu" else _GPU_CHUNK
    per_chunk = max(1, chunk // bs)

    # The numba kernels read BF16 bits themselves: no float32 copy per chunk.
    as_is = kernels is not None and rows.dtype in (F32, torch.bfloat16)

    def run(b0: int) -> None:
        b1 = min(b0 + per_chunk, flat.shape[0])
        # To the device first, in the source dtype (half the bytes of float32
        # over PCIe), then widened there rather than on the CPU.
        x = flat[b0:b1] if as_is else flat[b0:b1].to(dev).to(F32)
        if not encode(x, b0, out[b0:b1]):
            raise nonfinite_error(label, rows)

    starts = range(0, flat.shape[0], per_chunk)
    with _first_use_notice((qtype, flat.dtype, qw is None) if kernels else None, on_slow_start,
                           f"compiling the {qtype.name} quantizer for this machine (numba; once, up to a minute)"):
        if dev.type == "cpu" and len(starts) > 1:
            list(_cpu_pool(torch.get_num_threads()).map(run, starts))
        else:
            for b0 in starts:
                run(b0)
    return out.reshape(*lead_shape, n // bs * ts)


_USED_KERNELS: set = set()       # (type, source dtype, no imatrix) run in this process
_SLOW_START_S = 3.0


@contextlib.contextmanager
def _first_use_notice(key, say: Callable[[str], None] | None, message: str):
    """Calls ``say(message)`` if the first use of ``key`` in this process
    takes longer than a cache load would (numba is compiling)."""
    if key is None or say is None or key in _USED_KERNELS:
        yield
        return
    timer = threading.Timer(_SLOW_START_S, say, [message])
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
    _USED_KERNELS.add(key)


_POOL_LOCK = threading.Lock()
_POOLS: dict[int, ThreadPoolExecutor] = {}
# A forked child inherits the pools but not their threads: start afresh there.
os.register_at_fork(after_in_child=_POOLS.clear)


def _cpu_pool(workers: int) -> ThreadPoolExecutor:
    """A persistent pool of ``workers`` threads that run torch single-threaded.

    One chunk per thread beats torch's intra-op parallelism here: the chunks
    are cache-sized, so splitting every op across threads costs more in
    synchronisation than it gains.  With OpenMP ``torch.set_num_threads``
    sets the calling thread's team size and the default for threads started
    later; each worker pins itself to 1, then the default is restored."""
    with _POOL_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            default = torch.get_num_threads()
            ready = threading.Barrier(workers)

            def pin() -> None:
                torch.get_num_threads()      # torch's lazy per-thread init, before the pin
                torch.set_num_threads(1)
                ready.wait()

            pool = ThreadPoolExecutor(workers, thread_name_prefix="qconvert-quantize", initializer=pin)
            list(pool.map(lambda _: None, range(workers)))
            torch.set_num_threads(default)
            _POOLS[workers] = pool
        return pool


def _source_rows(data: Tensor | np.ndarray, label: str) -> Tensor:
    """``data`` as a 2-D ``(rows, row_length)`` torch view in its own dtype."""
    if isinstance(data, np.ndarray):
        if not np.issubdtype(data.dtype, np.floating):
            raise QuantizationError(f"tensor {label}: expected floating-point data, got {data.dtype}")
        data = torch.from_numpy(np.ascontiguousarray(data))
    elif not isinstance(data, Tensor) or not data.is_floating_point():
        raise QuantizationError(f"tensor {label}: expected a floating-point tensor or array, "
                                f"got {getattr(data, 'dtype', type(data).__name__)}")
    if data.dim() == 0:
        raise QuantizationError(f"tensor {label}: cannot encode a 0-d scalar")
    # An explicit row count: -1 is ambiguous for zero-element tensors.
    return data.reshape(math.prod(data.shape[:-1]), data.shape[-1])


def _importance(imatrix: Tensor | np.ndarray, n: int, label: str, dev: torch.device) -> Tensor:
    qw = torch.as_tensor(imatrix).to(device=dev, dtype=F32)
    if qw.shape != (n,):
        raise QuantizationError(f"tensor {label}: imatrix has shape {tuple(qw.shape)}, "
                                f"expected ({n},) (one weight per input column)")
    if not bool(torch.isfinite(qw).all()):
        raise QuantizationError(f"tensor {label}: imatrix contains NaN/Inf values")
    return qw


Encoder = Callable[[Tensor, int, np.ndarray], bool]


def _encoder(qtype: QT, rows: Tensor, qw: Tensor | None, dev: torch.device, label: str) -> Encoder:
    """``encode(x, first_block, dst) -> finite`` in torch: writes the bytes of
    chunks ``x`` of ``(B, block)`` float32 blocks starting at flat block index
    ``first_block`` to ``dst``, or returns False when ``x`` holds NaN/Inf."""
    fn = _torch_encoder(qtype, rows, qw, dev, label)

    def encode(x: Tensor, b0: int, dst: np.ndarray) -> bool:
        if not all_finite(x):
            return False
        dst[...] = fn(x, b0).cpu().numpy()
        return True
    return encode


def _torch_encoder(qtype: QT, rows: Tensor, qw: Tensor | None, dev: torch.device, label: str
                   ) -> Callable[[Tensor, int], Tensor]:
    """``fn(x, first_block) -> bytes`` as a tensor."""
    t = TYPES[qtype]
    if qw is None or t.impl is None:
        ref = t.ref
        return lambda x, b0: ref(x)
    bs = block_size(qtype)
    blocks_per_row = rows.shape[1] // bs
    qw_blocks = qw.view(blocks_per_row, bs)

    def block_index(x: Tensor, b0: int) -> Tensor:
        return torch.arange(b0, b0 + x.shape[0], device=dev)

    impl = t.impl
    if t.family != LEGACY:
        return lambda x, b0: impl(x, qw_blocks[block_index(x, b0) % blocks_per_row])
    sigma2 = _row_mean_square(rows, dev)
    return lambda x, b0: impl(x, qw_blocks[block_index(x, b0) % blocks_per_row],
                              sigma2[block_index(x, b0) // blocks_per_row])


BACKENDS = ("torch", "numba")


def _numba_kernels(qtype: QT, dev: torch.device, backend: str | None, label: str) -> tuple | None:
    """The ``(ref, impl)`` numba kernels to use for ``qtype``, or None for the
    torch path: by default numba on the CPU where it is installed."""
    if backend not in (None, *BACKENDS):
        raise QuantizationError(f"tensor {label}: unknown quantization backend {backend!r}; "
                                f"use one of {', '.join(BACKENDS)}")
    if backend == "torch" or backend is None and dev.type != "cpu":
        return None
    if dev.type != "cpu":
        raise QuantizationError(f"tensor {label}: the numba backend runs on the CPU, not {dev}")
    cpu = _cpu_backend()
    kernels = None if cpu is None else cpu_kernels(qtype)
    if backend is None or kernels is not None:
        return kernels
    if cpu is None:
        raise QuantizationError(f"tensor {label}: the numba backend needs numba; pip install numba")
    raise QuantizationError(f"tensor {label}: the numba backend has no {qtype.name} encoder")


@functools.cache
def _cpu_backend():
    """The numba module ``_cpu``, or None without numba.  Imported on first
    use: numba takes a moment to load, and each kernel compiles on its first
    call (later ones load it from numba's on-disk cache)."""
    try:
        from qconvert.codecs.gguf import _cpu
    except ImportError:
        return None
    except (RuntimeError, OSError) as exc:
        # numba raises RuntimeError when no cache folder is writable; the torch
        # path writes the same bytes, only ~10x slower, so say so and go on.
        print(f"warning: numba kernels unavailable ({exc}); quantizing with torch, which is slower "
              "(set NUMBA_CACHE_DIR to a writable folder)", file=sys.stderr)
        return None
    return _cpu


def _numba_encoder(qtype: QT, kernels: tuple, rows: Tensor, qw: Tensor | None) -> Encoder:
    """``encode(x, first_block, dst) -> finite`` through the numba kernels,
    which write straight into ``dst`` and check the values on the way.  The
    imatrix ones take the row's importance as ``(blocks_per_row, block)`` and
    the block index; the legacy ones also each row's mean square."""
    ref, impl = kernels
    if qw is None or impl is None:
        return lambda x, b0, dst: ref(_c_array(x), dst)
    qw_blocks = _c_array(qw).reshape(-1, block_size(qtype))
    if TYPES[qtype].family != LEGACY:
        return lambda x, b0, dst: impl(_c_array(x), dst, qw_blocks, b0)
    sigma2 = _c_array(_row_mean_square(rows, torch.device("cpu")))
    return lambda x, b0, dst: impl(_c_array(x), dst, qw_blocks, b0, sigma2)


def _c_array(t: Tensor) -> np.ndarray:
    """A C-contiguous numpy view (numba compiles one variant per layout);
    BF16, which numpy lacks, as its uint16 bits."""
    t = t.detach().contiguous()
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def _row_mean_square(rows: Tensor, dev: torch.device) -> Tensor:
    """``sum_x2 += x[j]*x[j]`` over each whole row, ``/ n_per_row`` (the legacy
    ``quantize_row_*_impl`` statistic)."""
    n = rows.shape[1]
    step = max(1, (1 << 24) // n)
    parts = []
    for r0 in range(0, rows.shape[0], step):
        xt = rows[r0:r0 + step].to(device=dev, dtype=F32).T.contiguous()
        parts.append(div(seq_sum(xt * xt), float(n)))
    return torch.cat(parts)


def _encode_float(rows: Tensor, qtype: QT, dev: torch.device, label: str) -> np.ndarray:
    """F32/F16/BF16 as ``(rows, bytes)`` uint8: whole tensors, not chunks.

    One ``aminmax`` pass checks the values (NaN/Inf as ``all_finite`` does,
    and from the same extremes the F16 range), then
    torch converts with round to nearest even, as ggml's
    ``ggml_fp32_to_fp16_row`` / ``ggml_fp32_to_bf16_row_ref`` do; its
    multi-threaded cast runs at memory speed (about 3x ggml's F16 row).  A
    tensor already stored in the target type (a BF16 checkpoint at BF16) is
    its own answer: no float32 round trip."""
    lo, hi = torch.aminmax(rows)
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        raise nonfinite_error(label, rows)
    if qtype == QT.F16:
        # Values just past ±65504 would round back to it rather than to inf;
        # they are out of range all the same, so refuse them too.
        amax = max(-float(lo), float(hi))
        if amax > _F16_MAX:
            raise QuantizationError(f"tensor {label}: values up to {amax:.6g} exceed the F16 range "
                                    f"(±{_F16_MAX:g}); use BF16 or F32 for this tensor")
    target = _STORED_AS[qtype]
    out = rows if rows.dtype == target else rows.to(dev).to(target)
    return out.cpu().contiguous().view(torch.uint8).numpy()


def dequantize(raw: np.ndarray, qtype: QT, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Decode ``raw`` uint8 rows (as returned by :func:`quantize`) to float32
    with gguf-py, which implements every type written here exactly; ``shape``
    reshapes the result."""
    qtype = QT(qtype)
    raw = np.ascontiguousarray(raw).view(np.uint8)
    if qtype == QT.F32:
        values = raw.view(np.float32)
    elif qtype == QT.F16:
        values = raw.view(np.float16).astype(np.float32)
    else:
        values = gguf.quants.dequantize(raw, qtype)
    return values.reshape(shape) if shape is not None else values
