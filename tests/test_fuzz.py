"""The fuzz harnesses (fuzz/): seeds pass, a mutation replay finds nothing, atheris runs.

A long campaign is ``python -m fuzz.run TARGET -runs=300000`` (README); these
tests keep the harnesses working and run a short smoke of each in CI.
"""

from __future__ import annotations

import contextlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz import targets
from fuzz.run import replay
from tests.cli_helpers import FRESH_PEAK

ROOT = Path(__file__).resolve().parent.parent
NAMES = sorted(targets.TARGETS)


@pytest.mark.parametrize("name", NAMES)
def test_seeds_read_without_any_error(name, monkeypatch):
    """qconvert's own files must pass every reader, or the fuzzer only explores error paths."""
    monkeypatch.setattr(targets, "expected_errors", contextlib.nullcontext)
    seeds = targets.seeds(name)
    assert seeds
    for data in seeds:
        targets.TARGETS[name](data)


@pytest.mark.parametrize("name", ["recipe", "fp8", "svdquant", "diffusers"])
def test_hostile_seeds_are_refused_in_one_line(name, monkeypatch):
    """Each class of hostile file found by hand is a seed, and its target refuses it with a QConvertError."""
    refused = []

    @contextlib.contextmanager
    def recording():
        from qconvert.core.errors import QConvertError

        try:
            yield
        except QConvertError as exc:
            targets.check_message(exc)
            refused.append(str(exc))

    monkeypatch.setattr(targets, "expected_errors", recording)
    hostile = targets.hostile_seeds(name, targets.seeds(name))
    assert hostile
    for data in hostile:
        before = len(refused)
        targets.TARGETS[name](data)
        assert len(refused) > before, f"{name}: a hostile seed passed every reader"


@pytest.mark.parametrize("name", NAMES)
def test_mutation_replay_finds_nothing(name, tmp_path):
    lines = []
    assert replay(name, 150, seed=1, log=lines.append, folder=tmp_path / "corpus",
                  findings_dir=tmp_path / "findings") == 0, "\n".join(lines)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("atheris") is None,
                    reason="atheris is not installed (pip install .[fuzz])")
@pytest.mark.parametrize("name", NAMES)
def test_atheris_smoke(name, tmp_path):
    """A few thousand coverage-guided inputs per harness: no finding."""
    cmd = [sys.executable, "-m", "fuzz.run", name, "--corpus", str(tmp_path / "corpus"),
           "--findings", str(tmp_path / "findings"), "-runs=3000", "-max_total_time=20"]
    done = subprocess.run([*FRESH_PEAK, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=300)
    tail = done.stderr[-3000:]
    assert done.returncode == 0, tail
    assert "Done" in tail, tail
    assert not any((tmp_path / "findings").iterdir()), tail
