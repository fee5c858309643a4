"""Peak memory must not grow with the number of layers (the 41 GB model converts in 24 GB)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from qconvert.core import tiny
from tests.cli_helpers import FRESH_PEAK

pytestmark = pytest.mark.slow

PROBE = ("import atexit, resource, sys;"
         "atexit.register(lambda: print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr));"
         "from qconvert.cli import main; main(sys.argv[1:])")


def peak_rss_mb(args) -> float:
    proc = subprocess.run([*FRESH_PEAK, sys.executable, "-c", PROBE, *map(str, args)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    return int(re.search(r"MAXRSS (\d+)", proc.stderr).group(1)) / 1024


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """2 and 26 blocks of ~4.8 MB each in BF16: holding the model would add >110 MB (>230 MB as float32)."""
    root = tmp_path_factory.mktemp("depth")
    out = []
    for layers in (2, 26):
        model = tiny.make_tiny(root / f"m{layers}", layers=layers, seed=1)
        lora = tiny.make_tiny_lora(root / f"lora{layers}.safetensors", model, rank=8, alpha=8.0)
        out.append((model, lora))
    return out


@pytest.mark.parametrize("command, suffix", [
    (["to-gguf", "--level", "Q8_0"], ".gguf"),
    (["to-gguf", "--level", "Q4_K_M", "--lora", "LORA"], ".gguf"),
    (["to-fp8"], ".safetensors"),
    (["to-fp8", "--format", "plain"], ".safetensors"),
    (["bake-lora", "--lora", "LORA"], ""),
    # the reference model streams blocks: float32 weights of 26 blocks would add ~250 MB
    (["sample", "--synthetic-embeds", "--height", "64", "--width", "64", "--steps", "2", "--lora", "LORA"],
     ".safetensors"),
    # one block in memory; the calibration statistics (64 rows per layer, ~0.9 MB a block here) are all kept
    (["to-svdquant", "--rank", "16", "--grid", "2", "--lora", "LORA"], ".safetensors"),
])
def test_peak_memory_does_not_grow_with_depth(tmp_path, models, command, suffix):
    peaks = []
    for i, (model, lora) in enumerate(models):
        args = [str(lora) if c == "LORA" else c for c in command]
        peaks.append(peak_rss_mb([args[0], model, *args[1:], "-o", tmp_path / f"out{i}{suffix}", "--quiet"]))
    growth = peaks[1] - peaks[0]
    assert growth < 48, f"peak RSS grew by {growth:.0f} MB from 2 to 26 blocks ({peaks[0]:.0f} → {peaks[1]:.0f} MB)"
