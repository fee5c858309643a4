"""ggml's own quantizer, through ctypes, as the oracle for qconvert's encoders.

llama-cpp-python ships ``libggml-base.so`` in ``llama_cpp/lib``; its exported
``ggml_quantize_chunk`` is what ``llama-quantize`` calls for every tensor:

    size_t ggml_quantize_chunk(enum ggml_type type, const float * src, void * dst,
                               int64_t start, int64_t nrows, int64_t n_per_row,
                               const float * imatrix);

It initialises any tables it needs itself (``ggml_quantize_init``).  The call
is single-threaded and ctypes releases the GIL during it, so row chunks can be
quantized on a thread pool.  The library is located without importing
``llama_cpp`` (which would load libllama too).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gguf
import numpy as np

_LIB_NAMES = ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll", "libggml.so")


def find_library() -> Path | None:
    """The libggml that exports ``ggml_quantize_chunk``: ``$QCONVERT_LIBGGML``
    if set (a GPU machine without llama-cpp-python gets a copied
    ``libggml-base.so``, see ``benchmarks/device_check.sh``), else the one in
    the installed ``llama_cpp`` package, or None."""
    if os.environ.get("QCONVERT_LIBGGML"):
        return Path(os.environ["QCONVERT_LIBGGML"])
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    lib_dir = Path(spec.origin).parent / "lib"
    for name in _LIB_NAMES:
        if (lib_dir / name).exists():
            return lib_dir / name
    return None


class GGMLOracle:
    """Quantize float32 rows with ggml's reference code."""

    def __init__(self, path: Path):
        self.path = path
        self._lib = ctypes.CDLL(str(path))
        fn = self._lib.ggml_quantize_chunk
        fn.restype = ctypes.c_size_t
        fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                       ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        self._quantize_chunk = fn

    def quantize(self, x: np.ndarray, qtype: gguf.GGMLQuantizationType,
                 imatrix: np.ndarray | None = None, threads: int = 1) -> np.ndarray:
        """``x`` (rows, n) -> uint8 (rows, bytes per row), as ggml writes it.
        ``threads > 1`` splits the rows over a thread pool."""
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
        rows, n = x.shape
        bs, ts = gguf.GGML_QUANT_SIZES[qtype]
        out = np.zeros((rows, n // bs * ts), dtype=np.uint8)
        qw = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
        qw_ptr = None if qw is None else qw.ctypes.data

        def run(r0: int, r1: int) -> None:
            written = self._quantize_chunk(int(qtype), x[r0:r1].ctypes.data, out[r0:r1].ctypes.data,
                                           0, r1 - r0, n, qw_ptr)
            assert written == (r1 - r0) * out.shape[1], (written, r1 - r0, out.shape)

        bounds = np.linspace(0, rows, max(1, min(threads, rows)) + 1).astype(int)
        pairs = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        if len(pairs) == 1:
            run(*pairs[0])
        else:
            with ThreadPoolExecutor(len(pairs)) as pool:
                list(pool.map(lambda p: run(*p), pairs))
        return out


def load() -> tuple[GGMLOracle | None, str]:
    """``(oracle, "")`` or ``(None, reason it is unavailable)``."""
    return _from_library(GGMLOracle, "ggml_quantize_chunk")


def _from_library(cls, function: str):
    path = find_library()
    if path is None:
        return None, "llama-cpp-python (package llama_cpp) with its libggml-base is not installed"
    try:
        return cls(path), ""
    except (OSError, AttributeError) as exc:
        return None, f"cannot use {function} from {path}: {exc}"


class _GGUFParams(ctypes.Structure):
    # struct gguf_init_params { bool no_alloc; struct ggml_context ** ctx; }
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]


class GGUFLoader:
    """ggml's own GGUF loader (``gguf_init_from_file``): the verdict llama.cpp and ggml-based tools give a file."""

    def __init__(self, path: Path):
        lib = ctypes.CDLL(str(path))
        self._init = lib.gguf_init_from_file
        self._init.restype = ctypes.c_void_p
        self._init.argtypes = [ctypes.c_char_p, _GGUFParams]
        self._free = lib.gguf_free
        self._free.argtypes = [ctypes.c_void_p]
        self._ggml_free = lib.ggml_free
        self._ggml_free.argtypes = [ctypes.c_void_p]

    def loads(self, path: str | os.PathLike) -> bool:
        """Whether ggml reads the header and the whole data section (no_alloc false: the blob is read)."""
        ctx = ctypes.c_void_p()
        gguf_ctx = self._init(os.fsencode(path), _GGUFParams(False, ctypes.pointer(ctx)))
        if ctx.value:
            self._ggml_free(ctx)
        if not gguf_ctx:
            return False
        self._free(gguf_ctx)
        return True


def gguf_loader() -> tuple[GGUFLoader | None, str]:
    """``(loader, "")`` or ``(None, reason it is unavailable)``."""
    return _from_library(GGUFLoader, "gguf_init_from_file")
