"""Same bytes before and after a refactoring: the golden hashes of what ``qconvert demo`` writes and of every
converter's ``--dry-run --json`` plan on the full-size sparse model.

A change that alters any of them must say why in its commit and update ``tests/golden/*.json`` with
``python -m tests.test_golden --update`` (it prints what changed).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden"
# Every converter plan the release recipes can ask for, on the real 60-block layout.
PLANS = {
    "to-gguf-all": ["to-gguf", "{model}", "--level", "all", "-o", "out"],
    "to-gguf-quantstack-Q4_K_M": ["to-gguf", "{model}", "--level", "Q4_K_M", "--policy", "quantstack"],
    "to-gguf-minimal-Q8_0": ["to-gguf", "{model}", "--level", "Q8_0", "--minimal-metadata"],
    "to-fp8-comfy": ["to-fp8", "{model}"],
    "to-fp8-comfy-keep-mod-e5m2": ["to-fp8", "{model}", "--keep", "mod", "--dtype", "e5m2"],
    "to-fp8-scaled": ["to-fp8", "{model}", "--format", "scaled"],
    "to-fp8-plain": ["to-fp8", "{model}", "--format", "plain"],
    **{f"to-comfy-{f}": ["to-comfy", "{model}", "--format", f]
       for f in ("fp8", "nvfp4", "mxfp8", "int8", "int8-row", "int8-tensor", "convrot-w4a4")},
    "to-comfy-nvfp4-keep-attn": ["to-comfy", "{model}", "--format", "nvfp4", "--keep", "attn"],
    "to-svdquant-int4-r32": ["to-svdquant", "{model}", "--precision", "int4", "--rank", "32"],
    "to-svdquant-nvfp4-r128": ["to-svdquant", "{model}", "--precision", "nvfp4", "--rank", "128"],
}
# Files the demo writes whose bytes hold measured figures or timings: the figures are checked by the
# verify tests, not here.
VOLATILE = ("reports/", "release/reports/", "release/manifest.json", "release/README.md")


def _run(argv: list[str]) -> str:
    import contextlib
    import io

    from qconvert.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(argv)
        except SystemExit as exc:
            assert exc.code in (0, None), f"qconvert {' '.join(argv)} exited {exc.code}"
    return out.getvalue()


def plan_hashes(folder: Path) -> dict:
    """sha256 of each plan's canonical JSON, run from ``folder`` with relative paths."""
    from qconvert.cli import main  # noqa: F401 - imported before chdir

    old = os.getcwd()
    os.chdir(folder)
    try:
        if not Path("qwen-full").exists():
            _run(["make-tiny", "qwen-full", "--full-size", "--sparse", "-q"])
        out = {}
        for name, argv in PLANS.items():
            text = _run([a.format(model="qwen-full") for a in argv] + ["--dry-run", "--json"])
            canonical = json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
            out[name] = hashlib.sha256(canonical.encode()).hexdigest()
        return out
    finally:
        os.chdir(old)


def demo_hashes(folder: Path) -> dict:
    """``hashes_of`` a ``qconvert demo --no-reports`` run from a relative --out, in the fixed folder the
    ``demo_run`` fixture uses: the release's recipe makes its source path absolute, and provenance records it."""
    import shutil
    import tempfile

    del folder
    folder = Path(tempfile.gettempdir()) / "qconvert-golden-demo"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    old = os.getcwd()
    os.chdir(folder)
    try:
        _run(["demo", "--out", "demo", "--no-reports", "-q"])  # the reports are measurements, not golden bytes
        return hashes_of(folder / "demo")
    finally:
        os.chdir(old)
        shutil.rmtree(folder, ignore_errors=True)


def hashes_of(demo: Path) -> dict:
    """sha256 of every file a demo wrote into ``demo`` but the measured ones, and its release's manifest keys."""
    out = {}
    for path in sorted(demo.rglob("*")):
        rel = path.relative_to(demo).as_posix()
        if path.is_file() and not rel.startswith(VOLATILE) and rel not in VOLATILE:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    # what a later recipe run compares to keep an output (the release resumes when these hold)
    manifest = json.loads((demo / "release" / "manifest.json").read_text())
    for name, entry in manifest["outputs"].items():
        out[f"release/manifest.json: {name} key"] = entry["key"]
        out[f"release/manifest.json: {name} verify_key"] = entry["verify_key"]
    return out


def _diff(golden: dict, now: dict) -> list[str]:
    keys = sorted(set(golden) | set(now))
    return [f"{k}: {golden.get(k, '(none)')[:12]} -> {now.get(k, '(none)')[:12]}" for k in keys
            if golden.get(k) != now.get(k)]


def test_converter_plans_keep_their_bytes(tmp_path):
    golden = json.loads((GOLDEN / "plans.json").read_text())
    assert not _diff(golden, plan_hashes(tmp_path))


@pytest.mark.slow
def test_demo_keeps_its_bytes(demo_run):
    """The demo the CLI test runs (with its reports, which are measurements and not hashed)."""
    pytest.importorskip("diffusers", reason="the demo's tiny VAE needs diffusers")
    folder, code, _, err = demo_run
    assert code == 0, err
    golden = json.loads((GOLDEN / "demo.json").read_text())
    assert not _diff(golden, hashes_of(folder / "demo"))


if __name__ == "__main__":  # python -m tests.test_golden --update
    import tempfile

    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python -m tests.test_golden --update")
    with tempfile.TemporaryDirectory() as tmp:
        for name, now in (("plans", plan_hashes(Path(tmp))), ("demo", demo_hashes(Path(tmp)))):
            path = GOLDEN / f"{name}.json"
            old = json.loads(path.read_text()) if path.exists() else {}
            print("\n".join(f"{name} {line}" for line in _diff(old, now)) or f"{name}: unchanged")
            path.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
