"""A whole ``qconvert to-gguf`` run of a full-width Qwen-Image block against ggml's bare kernels.

    python3 benchmarks/bench_to_gguf.py [--level Q4_K_M] [--threads 2] [--model DIR]

qconvert is timed end to end as a user runs it (a fresh process: start-up,
reading the source, quantizing, writing the file).  ggml gets only its
``ggml_quantize_chunk`` calls, on the same tensors already in memory as
float32, spread over ``--threads`` workers, with the same per-tensor types
(city96 policy).  The model is one block at Qwen-Image's full width (inner
dim 3072), made once with ``make_tiny`` and kept in ``--model``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import ggml_oracle  # noqa: E402

from qconvert.core.checkpoint import open_checkpoint  # noqa: E402
from qconvert.core.tiny import make_tiny  # noqa: E402
from qconvert.formats.gguf.policy import assign_types  # noqa: E402

UNQUANTIZED = {"F32", "F16", "BF16"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--level", default="Q4_K_M")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", type=Path, default=Path(tempfile.gettempdir()) / "qconvert-bench-full-width-block")
    args = ap.parse_args()

    oracle, why = ggml_oracle.load()
    if oracle is None:
        sys.exit(f"ggml is not available: {why}")
    if not (args.model / "transformer").is_dir():
        print(f"making a full-width one-block model in {args.model} ...", flush=True)
        make_tiny(args.model, layers=1, heads=24, head_dim=128, text_dim=3584)
    source = open_checkpoint(args.model)
    types = assign_types(source.shapes(), args.level, source.config, policy="city96")

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.gguf"
        cmd = [sys.executable, "-m", "qconvert", "to-gguf", str(args.model), "--level", args.level, "-o", str(out),
               "--quiet"]
        subprocess.run(cmd, check=True, env=env)  # warm-up: numba's cache, the page cache
        start = time.perf_counter()
        subprocess.run(cmd, check=True, env=env)
        ours = time.perf_counter() - start

    # What any run pays once, whatever the model's size: importing torch and
    # numba, and loading each planned type's kernels from numba's cache (one
    # tiny BF16 row each).  On the 41 GB model it is lost in the noise.
    warm = ("import torch, qconvert.cli, qconvert.formats.gguf.writer\n"
            "from gguf import GGMLQuantizationType as QT\n"
            "from qconvert.codecs.gguf.quants import quantize\n"
            f"for t in {sorted({t.name for t in types.values()})}:\n"
            "    quantize(torch.zeros(1, 256, dtype=torch.bfloat16), QT[t])\n")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", warm], check=True, env=env)
    startup = time.perf_counter() - start

    data = {n: source.load(n).float().numpy() for n, t in types.items() if t.name not in UNQUANTIZED}
    start = time.perf_counter()
    for name, x in data.items():
        oracle.quantize(x, types[name], threads=args.threads)
    ggml = time.perf_counter() - start

    mb = sum(x.nbytes for x in data.values()) / 1e6
    print(f"{args.level}, {args.threads} thread(s), {len(data)} quantized tensors, {mb:,.0f} MB as float32")
    print(f"qconvert to-gguf, whole run  {ours:7.2f} s  ({mb / ours:6.1f} MB/s)")
    print(f"  of which start-up            {startup:7.2f} s")
    print(f"ggml bare kernels            {ggml:7.2f} s  ({mb / ggml:6.1f} MB/s)")
    print(f"ratio (ggml time / qconvert time)  {ggml / ours:.2f}; without start-up {ggml / (ours - startup):.2f}")


if __name__ == "__main__":
    main()
