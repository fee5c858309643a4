"""The reference model streaming blocks vs diffusers holding the model: seconds per step and peak RSS.

    python3 benchmarks/bench_reference_model.py [--layers 2] [--size 256] [--steps 2] [--model DIR]

Both run the same denoising steps (Lightning schedule, no CFG, float32 on
the CPU) on a Qwen-Image of full width (inner dim 3072, text dim 3584) with
``--layers`` blocks, made once with ``make_tiny`` and kept in ``--model``.
Each side runs in a fresh process so its peak RSS is its own: diffusers
loads every block (``from_pretrained``), qconvert reads one block at a time
and drops it; ``qconvert-cached`` keeps every converted block
(``--cache-gb`` large enough for the model).  Printed: seconds per step after
the first, peak RSS, and the ratios to diffusers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, resource, sys, time, torch
sys.path.insert(0, {root!r})
from qconvert.core.checkpoint import open_checkpoint
from qconvert.running import inputs, sampler
side, model, size, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ckpt = open_checkpoint(model)
prompt = inputs.synthetic_prompt(ckpt.config, 0, length=32, negative=False)
noise = inputs.seeded_noise(0, size, size)
if side == "diffusers":
    from diffusers import QwenImageTransformer2DModel
    net = QwenImageTransformer2DModel.from_pretrained(model, subfolder="transformer", torch_dtype=torch.float32).eval()
    run = lambda x, t, m, ts, shapes: net(x, t, m, ts, [shapes], return_dict=False)[0]
else:
    from qconvert.running.model import QwenImageTransformer
    from qconvert.running.providers import DenseProvider
    cache = 1 << 40 if side == "qconvert-cached" else 0
    run = QwenImageTransformer(ckpt.config, DenseProvider(ckpt, cache_bytes=cache))
times = []
def step(i, n, _):
    times.append(time.monotonic())
start = time.monotonic()
with torch.no_grad():
    sampler.sample(run, noise, prompt.embeds, prompt.mask, steps=steps, schedule="lightning",
                   img_shapes=[(1, size // 16, size // 16)], on_step=step)
per_step = [b - a for a, b in zip([start] + times[:-1], times)]
print(json.dumps({{"per_step_s": per_step, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def measure(side: str, model: Path, size: int, steps: int) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT)), side, str(model), str(size),
                          str(steps)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (multiple of 16)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--model", type=Path, default=Path(tempfile.gettempdir()) / "qconvert-bench-full-width")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from qconvert.core.tiny import make_tiny

    model = args.model / f"layers{args.layers}"
    if not (model / "transformer").is_dir():
        print(f"making a full-width model of {args.layers} block(s) in {model} ...", flush=True)
        make_tiny(model, layers=args.layers, heads=24, head_dim=128, text_dim=3584)
    sides = ("qconvert", "qconvert-cached", "diffusers")
    results = {side: measure(side, model, args.size, args.steps) for side in sides}
    print(f"{args.layers} full-width block(s), {args.size}x{args.size}, {args.steps} steps, float32 on the CPU")
    print(f"{'':<16}{'s/step (after the first)':>26}{'peak RSS MB':>14}")
    for side, r in results.items():
        later = r["per_step_s"][1:] or r["per_step_s"]
        r["step"] = sum(later) / len(later)
        print(f"{side:<16}{r['step']:>26.2f}{r['peak_rss_mb']:>14.0f}")
    d = results["diffusers"]
    for side in sides[:2]:
        q = results[side]
        print(f"{side} / diffusers: time {q['step'] / d['step']:.2f}x, peak RSS {q['peak_rss_mb'] / d['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
