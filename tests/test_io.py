"""The atomic writer and the streaming safetensors writer."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from collections import namedtuple

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qconvert.core import io
from qconvert.core.errors import QConvertError


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_output_success(tmp_path):
    target = tmp_path / "out.bin"
    with io.atomic_output(target) as f:
        f.write(b"hello")
        assert not target.exists(), "nothing appears under the final name before the end"
    assert target.read_bytes() == b"hello"
    assert leftovers(tmp_path) == ["out.bin"]


def test_atomic_output_failure_leaves_nothing_and_keeps_old_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with io.atomic_output(target) as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert leftovers(tmp_path) == ["out.bin"]


def test_atomic_output_keyboard_interrupt(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_output(target) as f:
            f.write(b"partial")
            raise KeyboardInterrupt
    assert leftovers(tmp_path) == []


def test_sigint_in_a_real_process_leaves_nothing(tmp_path):
    """Ctrl-C while a converter writes: the temporary goes, nothing under the final name."""
    # A shell that starts the suite in the background makes its children ignore SIGINT; Python keeps
    # that, so the child restores the default handler (Ctrl-C on a terminal always has it). It sleeps in
    # short steps, as a converter's loop works: importing torch starts threads, the kernel may hand
    # SIGINT to one of them, and Python raises only when the main thread next runs (one long sleep
    # made this test flaky under load).
    script = textwrap.dedent(f"""
        import signal, sys, time
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from qconvert.core.io import atomic_output
        with atomic_output({str(tmp_path / 'out.bin')!r}) as f:
            f.write(b"x" * 1000)
            f.flush()
            print("writing", flush=True)
            for _ in range(600):
                time.sleep(0.1)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    assert proc.returncode != 0
    assert leftovers(tmp_path) == []


def test_disk_space_is_checked_first(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(io.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(QConvertError, match="GB is free"):
        with io.atomic_output(tmp_path / "big.bin", expected_bytes=10**9):
            pass
    assert leftovers(tmp_path) == []


def test_atomic_directory_replaces_only_when_complete(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with io.atomic_directory(target) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("boom")
    assert leftovers(target) == ["old.txt"] and leftovers(tmp_path) == ["model"]
    with io.atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert leftovers(target) == ["new.txt"] and leftovers(tmp_path) == ["model"]


def test_streaming_writer_matches_safetensors(tmp_path):
    tensors = {
        "b": torch.randn(3, 5).to(torch.bfloat16),
        "a": torch.arange(7, dtype=torch.int32),
        "c": torch.randn(4).to(torch.float8_e4m3fn),
        "empty": torch.zeros(0),
        "scalar": torch.tensor(1.5),
    }
    ours = tmp_path / "ours.safetensors"
    io.write_safetensors(ours, tensors, metadata={"k": "v"})
    with safe_open(str(ours), framework="pt") as f:
        assert f.metadata() == {"k": "v"}
        for name, t in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
    assert io.safetensors_size([(n, io.TORCH_TO_DTYPE[t.dtype], tuple(t.shape)) for n, t in sorted(tensors.items())],
                               {"k": "v"}) == ours.stat().st_size


def test_byte_identical_to_safetensors_for_one_dtype(tmp_path):
    """With one dtype the library orders by name too, so the files must be identical."""
    tensors = {f"t{i}": torch.randn(i + 1, 3).to(torch.bfloat16) for i in range(12)}
    io.write_safetensors(tmp_path / "ours.safetensors", tensors, metadata={"format": "pt"})
    save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()


def test_writer_refuses_off_plan_tensors(tmp_path):
    with open(tmp_path / "x", "wb") as f:
        w = io.SafetensorsWriter(f, [("a", "F32", (2,)), ("b", "F32", (2,))])
        with pytest.raises(RuntimeError, match="plan expects a"):
            w.write("b", torch.zeros(2))
        with pytest.raises(RuntimeError, match="planned F32"):
            w.write("a", torch.zeros(3))
        w.write("a", torch.zeros(2))
        with pytest.raises(RuntimeError, match="only 1 of 2"):
            w.close()


def test_early_writeback_keeps_every_byte(tmp_path, monkeypatch):
    """Writes through the file and numpy's tofile (gguf-py's way) both land, across many write-back points."""
    import numpy as np

    monkeypatch.setattr(io, "WRITEBACK_BYTES", 1000)
    target = tmp_path / "out.bin"
    chunks = [bytes(range(256)) * 7, np.arange(3000, dtype=np.uint16), b"tail", np.arange(5, dtype=np.uint8)]
    with io.atomic_output(target) as f:
        for c in chunks:
            c.tofile(f) if isinstance(c, np.ndarray) else f.write(c)
    assert target.read_bytes() == b"".join(c.tobytes() if isinstance(c, np.ndarray) else c for c in chunks)
