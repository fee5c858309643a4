"""Throughput of qconvert's GGUF encoders (torch and numba backends) against ggml's C reference.

    python3 benchmarks/bench_quants.py [--threads N] [--device cpu|cuda] [--shape 3072x3072]
                                       [--types Q4_K,Q6_K] [--backends torch,numba] [--imatrix]
                                       [--repeat 3] [--gpu-chunk 23,25]

All run in the same process on the same data: trained-looking bf16 values
(student-t, rows of different scale) held as float32.  ggml's
``ggml_quantize_chunk`` is single-threaded, so it runs on a thread pool of
``--threads`` workers over row chunks, and qconvert gets ``--threads`` torch
threads (its worker pool, for either backend): equal cores.  MB/s counts
float32 input bytes.  The contenders take turns in every repeat and the best
of ``--repeat`` runs is reported, so a noisy machine slows all of them alike;
"numba/torch" is the numba backend's speed-up over the torch one, "x ggml"
qconvert's (its default backend for the device: numba on the CPU where it has
the type, torch otherwise) over ggml, "identical" the
share of blocks each backend wrote byte-identical to ggml.  The numba kernels
are compiled (or loaded from numba's cache) during the warm-up, not timed.
On a GPU ``--gpu-chunk`` times each type once per chunk size (log2 of the
elements the device takes at a time), to choose ``quants._GPU_CHUNK``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import ggml_oracle  # noqa: E402

from qconvert.codecs.gguf import quants  # noqa: E402
from qconvert.codecs.gguf.quants import SUPPORTED_TYPES, quantize, type_size  # noqa: E402
from qconvert.codecs.gguf.types import cpu_kernels  # noqa: E402

DEFAULT_TYPES = "F16,BF16,Q8_0,Q4_0,Q4_1,Q5_0,Q5_1,Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,IQ4_NL,IQ4_XS"


def weights(rows: int, cols: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.standard_t(3, size=(rows, cols)).astype(np.float32) * 0.02
    x *= rng.lognormal(0.0, 0.7, size=(rows, 1)).astype(np.float32)
    return torch.from_numpy(x).bfloat16().float().numpy()


def has_numba_encoder(qtype: QT, device: str) -> bool:
    cpu = quants._cpu_backend()
    return device == "cpu" and cpu is not None and cpu_kernels(qtype) is not None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default="3072x3072", help="rows x row length")
    ap.add_argument("--types", default=DEFAULT_TYPES)
    ap.add_argument("--backends", default="torch,numba", help="qconvert backends to time")
    ap.add_argument("--imatrix", action="store_true", help="use a random importance matrix")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--gpu-chunk", default=str(quants._GPU_CHUNK.bit_length() - 1),
                    help="log2 of the elements per GPU chunk; a comma list times each")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    rows, cols = (int(v) for v in args.shape.lower().split("x"))
    x = weights(rows, cols)
    qw = np.random.default_rng(1).lognormal(0, 1.5, cols).astype(np.float32) if args.imatrix else None
    backends = [b.strip() for b in args.backends.split(",")]
    oracle, why = ggml_oracle.load()
    if oracle is None:
        print(f"(no ggml comparison: {why})")
    if "numba" in backends and quants._cpu_backend() is None:
        print("(no numba backend: numba is not installed)")
    mb = x.nbytes / 1e6
    print(f"{rows}x{cols} float32 ({mb:.1f} MB), {args.threads} thread(s), device {args.device}, "
          f"imatrix {'yes' if qw is not None else 'no'}, torch {torch.__version__}, best of {args.repeat}")
    print(f"{'type':9} {'torch MB/s':>10} {'numba MB/s':>10} {'ggml MB/s':>10} {'numba/torch':>11} {'x ggml':>7} "
          f"{'torch ident.':>12} {'numba ident.':>12}")
    chunks = [int(c) for c in args.gpu_chunk.split(",")] if args.device != "cpu" else [None]
    cases = [(name.strip(), c) for name in args.types.split(",") for c in chunks]
    for name, chunk in cases:
        qtype = QT[name]
        if chunk is not None:
            quants._GPU_CHUNK = 1 << chunk
        assert qtype in SUPPORTED_TYPES, name
        def contenders(data: np.ndarray) -> dict:
            runs = {b: (lambda b=b: quantize(data, qtype, qw, device=args.device, backend=b)) for b in backends
                    if b == "torch" or has_numba_encoder(qtype, args.device)}
            if oracle is not None:
                runs["ggml"] = lambda: oracle.quantize(data, qtype, qw, threads=args.threads)
            return runs

        for run in contenders(x[:64]).values():                     # warm-up (and numba's compile)
            run()
        runs = contenders(x)
        best = {b: float("inf") for b in runs}
        out = {}
        for _ in range(args.repeat):
            for b, run in runs.items():
                t0 = time.perf_counter()
                out[b] = run()
                best[b] = min(best[b], time.perf_counter() - t0)
        speed = {b: mb / t for b, t in best.items()}
        ts = type_size(qtype)

        def cell(b: str, width: int) -> str:
            return f"{speed[b]:{width}.1f}" if b in speed else f"{'-':>{width}}"

        ours = "numba" if "numba" in speed else "torch"

        def ratio(a: str, b: str, width: int) -> str:
            return f"{speed[a] / speed[b]:{width}.2f}" if a in speed and b in speed else f"{'-':>{width}}"

        def identical(b: str) -> str:
            if b not in out or "ggml" not in out:
                return f"{'-':>12}"
            same = (out[b].reshape(-1, ts) == out["ggml"].reshape(-1, ts)).all(1).mean()
            return f"{same:12.4%}"

        label = qtype.name if chunk is None or len(chunks) == 1 else f"{qtype.name}@{chunk}"
        print(f"{label:9} {cell('torch', 10)} {cell('numba', 10)} {cell('ggml', 10)} "
              f"{ratio('numba', 'torch', 11)} {ratio(ours, 'ggml', 7)} {identical('torch')} {identical('numba')}",
              flush=True)


if __name__ == "__main__":
    main()
