"""The read-ahead every converter streams its source through."""

from __future__ import annotations

import contextlib
import threading

import pytest

from qconvert.core.errors import CheckpointError
from qconvert.core.pipeline import prefetched


class Source:
    """Records which names were read, and on which thread."""

    def __init__(self, broken: str | None = None):
        self.read: list[str] = []
        self.threads: set[str] = set()
        self.broken = broken

    def load(self, name: str) -> str:
        self.threads.add(threading.current_thread().name)
        if name == self.broken:
            raise CheckpointError(f"cannot read tensor {name}")
        self.read.append(name)
        return name.upper()


def test_yields_every_tensor_in_order_read_by_a_background_thread():
    source = Source()
    assert list(prefetched(source.load, ["a", "b", "c"])) == [("a", "A"), ("b", "B"), ("c", "C")]
    assert source.read == ["a", "b", "c"]
    assert all(t.startswith("qconvert-read") for t in source.threads)
    assert list(prefetched(source.load, [])) == []


def test_reads_one_tensor_ahead_and_no_further():
    source = Source()
    with contextlib.closing(prefetched(source.load, ["a", "b", "c", "d"])) as tensors:
        assert next(tensors) == ("a", "A")
        assert source.read in (["a"], ["a", "b"])   # "b" is being read while "a" is encoded
    assert source.read == ["a", "b"], "closing waits for the read under way and starts no other"


def test_a_read_error_surfaces_at_its_tensor():
    source = Source(broken="c")
    tensors = prefetched(source.load, ["a", "b", "c", "d"])
    assert [next(tensors), next(tensors)] == [("a", "A"), ("b", "B")]
    with pytest.raises(CheckpointError, match="cannot read tensor c"):
        next(tensors)
    assert "d" not in source.read
