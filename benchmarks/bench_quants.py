"""Throughput of qconvert's GGUF encoders against ggml's C reference.

    python3 benchmarks/bench_quants.py [--threads N] [--device cpu|cuda] [--shape 3072x3072]
                                       [--types Q4_K,Q6_K] [--imatrix] [--repeat 3]

Both run in the same process on the same data: trained-looking bf16 values
(student-t, rows of different scale) held as float32.  ggml's
``ggml_quantize_chunk`` is single-threaded, so it runs on a thread pool of
``--threads`` workers over row chunks, and qconvert gets ``--threads`` torch
threads: equal cores.  MB/s counts float32 input bytes; the best of
``--repeat`` runs is reported, with the share of blocks that came out
byte-identical.
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
from qconvert.formats.gguf.quants import SUPPORTED_TYPES, quantize, type_size  # noqa: E402

DEFAULT_TYPES = "F16,BF16,Q8_0,Q4_0,Q4_1,Q5_0,Q5_1,Q2_K,Q3_K,Q4_K,Q5_K,Q6_K"


def weights(rows: int, cols: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.standard_t(3, size=(rows, cols)).astype(np.float32) * 0.02
    x *= rng.lognormal(0.0, 0.7, size=(rows, 1)).astype(np.float32)
    return torch.from_numpy(x).bfloat16().float().numpy()


def best_time(fn, repeat: int) -> tuple[float, np.ndarray]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default="3072x3072", help="rows x row length")
    ap.add_argument("--types", default=DEFAULT_TYPES)
    ap.add_argument("--imatrix", action="store_true", help="use a random importance matrix")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    rows, cols = (int(v) for v in args.shape.lower().split("x"))
    x = weights(rows, cols)
    qw = np.random.default_rng(1).lognormal(0, 1.5, cols).astype(np.float32) if args.imatrix else None
    oracle, why = ggml_oracle.load()
    if oracle is None:
        print(f"(no ggml comparison: {why})")
    mb = x.nbytes / 1e6
    print(f"{rows}x{cols} float32 ({mb:.1f} MB), {args.threads} thread(s), device {args.device}, "
          f"imatrix {'yes' if qw is not None else 'no'}, torch {torch.__version__}")
    print(f"{'type':6} {'qconvert MB/s':>14} {'ggml MB/s':>10} {'ratio':>6} {'identical':>10}")
    for name in args.types.split(","):
        qtype = QT[name.strip()]
        assert qtype in SUPPORTED_TYPES, name
        quantize(x[:64], qtype, qw, device=args.device)                  # warm-up
        t_ours, ours = best_time(lambda: quantize(x, qtype, qw, device=args.device), args.repeat)
        line = f"{qtype.name:6} {mb / t_ours:14.1f}"
        if oracle is not None:
            t_ggml, ref = best_time(lambda: oracle.quantize(x, qtype, qw, threads=args.threads), args.repeat)
            ts = type_size(qtype)
            same = (ours.reshape(-1, ts) == ref.reshape(-1, ts)).all(1).mean()
            line += f" {mb / t_ggml:10.1f} {t_ggml / t_ours:6.2f} {same:10.4%}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
