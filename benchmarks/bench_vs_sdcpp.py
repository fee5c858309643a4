"""A whole ``qconvert to-gguf`` run against stable-diffusion.cpp's converter on the same file and cores.

    python3 benchmarks/bench_vs_sdcpp.py --sd-cli PATH [--level Q8_0] [--layers 3] [--threads 2]

``PATH`` is stable-diffusion.cpp's ``sd-cli`` (built from its source: ``cmake
.. -DCMAKE_BUILD_TYPE=Release && make sd-cli``; the sdist of
``stable-diffusion-cpp-python`` carries it under ``vendor/``).  Both tools
convert one single-file safetensors of a Qwen-Image transformer at full width
(``--layers`` blocks, made once with ``make_tiny`` in ``--model``), each run a
fresh process, best of ``--repeat``.  The page cache is written back (``sync``)
before every run, so neither pays for the other's writes; qconvert's time
includes its fsync (its output is on disk when it exits), sd-cli's does not.

Printed: both whole runs and peak memories, qconvert's fixed start-up (importing torch and
numba, loading the kernels from numba's cache: the same whatever the model's
size, so 0.1% of a 41 GB conversion), and the ratios with and without it.
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

SD_TYPES = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1", "Q5_0": "q5_0", "Q5_1": "q5_1", "F16": "f16"}


def single_file(model: Path) -> Path:
    """The model's transformer as one safetensors file (sd-cli reads one file), made once."""
    out = model.parent / f"{model.name}.safetensors"
    if not out.exists():
        from safetensors.torch import load_file, save_file

        tensors = {}
        for shard in sorted((model / "transformer").glob("*.safetensors")):
            tensors.update(load_file(shard))
        save_file(tensors, out)
    return out


def prepare(model: Path, layers: int) -> Path:
    """The model and its single file, made in a child process: Linux reports in a child's ``ru_maxrss`` the
    larger of its own peak and its parent's resident memory when it was started, so a benchmark that had held
    the model itself would report that as every tool's peak."""
    script = ("import sys; from pathlib import Path; sys.path[:0] = [sys.argv[3]]\n"
              "from benchmarks.bench_vs_sdcpp import single_file\n"
              "from qconvert.core.tiny import make_tiny\n"
              "model = Path(sys.argv[1])\n"
              "if not (model / 'transformer').is_dir():\n"
              "    print(f'making a full-width {sys.argv[2]}-block model in {model} ...', flush=True)\n"
              "    make_tiny(model, layers=int(sys.argv[2]), heads=24, head_dim=128, text_dim=3584)\n"
              "single_file(model)\n")
    subprocess.run([sys.executable, "-c", script, str(model), str(layers), str(ROOT)], check=True)
    return model.parent / f"{model.name}.safetensors"


def best_of(repeat: int, cmd: list[str], output: Path, env: dict) -> tuple[float, float]:
    """(least wall time, largest peak resident memory in GB) over ``repeat`` runs."""
    times, peaks = [], []
    for _ in range(repeat):
        output.unlink(missing_ok=True)
        os.sync()
        start = time.perf_counter()
        child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)
        times.append(time.perf_counter() - start)
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            raise SystemExit(f"failed ({child.returncode}): {' '.join(cmd)}")
        peaks.append(usage.ru_maxrss * 1024 / 1e9)     # KiB on Linux
    return min(times), max(peaks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sd-cli", type=Path, required=True, help="stable-diffusion.cpp's sd-cli executable")
    ap.add_argument("--level", default="Q8_0", choices=sorted(SD_TYPES))
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--model", type=Path, default=None, help="Folder for the model (default: a temp folder, kept)")
    args = ap.parse_args()

    model = args.model or Path(tempfile.gettempdir()) / f"qconvert-bench-full-width-{args.layers}"
    source = prepare(model, args.layers)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}

    with tempfile.TemporaryDirectory(dir=model.parent) as tmp:
        ours_out, theirs_out = Path(tmp) / "qconvert.gguf", Path(tmp) / "sd.gguf"
        ours_cmd = [sys.executable, "-m", "qconvert", "to-gguf", str(source), "--level", args.level, "-o",
                    str(ours_out), "--quiet"]
        theirs_cmd = [str(args.sd_cli), "-M", "convert", "-m", str(source), "-o", str(theirs_out), "--type",
                      SD_TYPES[args.level], "-t", str(args.threads)]
        subprocess.run(ours_cmd, check=True, env=env)      # warm-up: numba's cache, the page cache
        ours, ours_rss = best_of(args.repeat, ours_cmd, ours_out, env)
        theirs, theirs_rss = best_of(args.repeat, theirs_cmd, theirs_out, env)
        sizes = ours_out.stat().st_size, theirs_out.stat().st_size

    warm = ("import torch, qconvert.cli.main, qconvert.converters.gguf\n"
            "from gguf import GGMLQuantizationType as QT\n"
            "from qconvert.codecs.gguf.quants import quantize\n"
            f"quantize(torch.zeros(1, 256, dtype=torch.bfloat16), QT.{args.level})\n")
    startup = min(_timed([sys.executable, "-c", warm], env) for _ in range(args.repeat))

    gb = source.stat().st_size / 1e9
    print(f"{args.level}, {args.threads} thread(s), {args.layers} full-width blocks, {gb:.2f} GB of BF16 in one file")
    print(f"qconvert to-gguf, whole run  {ours:6.2f} s  ({sizes[0] / 1e9:.2f} GB written, fsync'ed; "
          f"peak RSS {ours_rss:.2f} GB)")
    print(f"  of which fixed start-up     {startup:6.2f} s  (imports, numba kernels from cache)")
    print(f"sd-cli -M convert            {theirs:6.2f} s  ({sizes[1] / 1e9:.2f} GB written, not synced; "
          f"peak RSS {theirs_rss:.2f} GB)")
    print(f"speed-up (sd-cli time / qconvert time)  whole run {theirs / ours:.2f}x; "
          f"without qconvert's start-up {theirs / (ours - startup):.2f}x")


def _timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
