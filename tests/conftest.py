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
