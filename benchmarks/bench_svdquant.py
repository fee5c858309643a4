"""to-svdquant on one full-width block (the real 3072/12288 shapes): seconds, the 60-block projection, peak RSS.

    python3 benchmarks/bench_svdquant.py [--precision int4] [--rank 32] [--grid 20] [--device cpu]

The block is made once with ``make_tiny`` (one block, 24 heads of 128, text
dim 3584) in ``--model``; its calibration rows are synthetic (64 rows per
layer with a few hot channels), so only the quantization is timed.  No
SVDQuant tool runs here to compare with, so the peer measured in the same run
is DeepCompressor's way of doing the most expensive step: a full float64
``torch.linalg.svd`` of the smoothed weight per smoothing candidate, timed on
the block's largest layer against qconvert's seeded randomized SVD.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, resource, sys, time, torch
sys.path.insert(0, {root!r})
from qconvert.core.checkpoint import open_checkpoint
from qconvert.formats.calibration import Stat
from qconvert.formats.svdquant.plan import SvdqOptions
from qconvert.running import svdquant_search as C
model, precision, rank, grid, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
src = open_checkpoint(model)
g = torch.Generator().manual_seed(0)
stats = {{}}
for m in C.block_stat_modules(src.config):
    width = src.shapes()[m + ".weight"][1]
    rows = torch.randn(64, width, generator=g)
    rows[:, :8] *= 30
    stats[m] = Stat(torch.zeros(0), rows.abs().amax(0), rows, 64)
options = SvdqOptions(precision=precision, rank=rank, grid=grid)
dev = torch.device(device)
start = time.monotonic()
block, found = C.quantize_block(src, 0, stats, options, dev)
if dev.type == "cuda":
    torch.cuda.synchronize()
seconds = time.monotonic() - start
w = src.load("transformer_blocks.0.img_mlp.net.0.proj.weight").float().to(dev)
from qconvert.codecs.svdquant.algorithm import lowrank
t = time.monotonic(); lowrank(w, rank); ours = time.monotonic() - t
t = time.monotonic(); torch.linalg.svd(w.double(), full_matrices=False); full = time.monotonic() - t
print(json.dumps({{"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "candidates": 2 * (grid - 1) + 1, "svd_ours_s": ours, "svd_full_s": full,
                  "mean_error": sum(r["error"] for r in found) / len(found),
                  "mean_plain_error": sum(r["plain_error"] for r in found) / len(found)}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", default="int4", choices=["int4", "nvfp4"])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--grid", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", type=Path, default=Path(tempfile.gettempdir()) / "qconvert-bench-full-width")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from qconvert.core.tiny import make_tiny

    model = args.model / "layers1"
    if not (model / "transformer").is_dir():
        print(f"making a full-width model of 1 block in {model} ...", flush=True)
        make_tiny(model, layers=1, heads=24, head_dim=128, text_dim=3584)
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT)), str(model), args.precision,
                          str(args.rank), str(args.grid), args.device], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"one full-width block, {args.precision} rank {args.rank}, {r['candidates']} smoothing candidates per "
          f"layer, on {args.device}")
    print(f"  {r['seconds']:.1f} s for the block; 60 blocks: about {r['seconds'] * 60 / 60:.0f} min; "
          f"peak RSS {r['peak_rss_mb']:.0f} MB")
    print(f"  layer output error {r['mean_error']:.3g} mean, plain 4-bit rounding {r['mean_plain_error']:.3g}")
    print(f"  SVD of img_mlp.net.0.proj [12288, 3072]: qconvert's randomized {r['svd_ours_s']:.2f} s, "
          f"DeepCompressor's full float64 {r['svd_full_s']:.2f} s: {r['svd_full_s'] / r['svd_ours_s']:.1f}x, "
          f"{r['candidates']} times per layer")


if __name__ == "__main__":
    main()
