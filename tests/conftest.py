"""Shared fixtures: test models are made, never downloaded or committed."""

from __future__ import annotations

import pytest

from qconvert.core import tiny


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A 3-block trained-looking Qwen-Image in the diffusers layout (read-only: copy before changing)."""
    return tiny.make_tiny(tmp_path_factory.mktemp("models") / "tiny-qwen-image")


@pytest.fixture(scope="session")
def tiny_single_file(tmp_path_factory):
    return tiny.make_tiny_single_file(tmp_path_factory.mktemp("models") / "tiny-qwen-image.safetensors")


@pytest.fixture(scope="session")
def full_size_sparse(tmp_path_factory):
    """The real 60-layer layout with data as holes: for plans and sizes only."""
    return tiny.make_full_size_sparse(tmp_path_factory.mktemp("models") / "qwen-image-full")


@pytest.fixture(scope="session")
def demo_run():
    """``qconvert demo --out demo`` once for the session (the CLI test reads its reports, the golden test hashes
    its files), from one fixed folder: provenance records paths, and the golden hashes need them fixed.
    Gives (that folder, exit code, stdout, stderr)."""
    import contextlib
    import io
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from qconvert.cli import main

    folder = Path(tempfile.gettempdir()) / "qconvert-golden-demo"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    old, out, err, code = os.getcwd(), io.StringIO(), io.StringIO(), 0
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(["demo", "--out", "demo"])
    except SystemExit as exc:
        code = exc.code or 0
    finally:
        os.chdir(old)
    yield folder, code, out.getvalue(), err.getvalue()
    shutil.rmtree(folder, ignore_errors=True)
