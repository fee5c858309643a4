"""The reference transformer against diffusers' QwenImageTransformer2DModel, variant by variant."""

from __future__ import annotations

import pytest
import torch

from qconvert import tiny
from qconvert.checkpoint import open_checkpoint
from qconvert.verify.model import QwenImageTransformer
from qconvert.verify.providers import DenseProvider

diffusers = pytest.importorskip("diffusers", reason="diffusers is the oracle for the reference model")
pytestmark = pytest.mark.oracle

TOL = 1e-5


def models(tmp_path, variant):
    path = tiny.make_tiny(tmp_path / variant, layers=2, heads=2, head_dim=32, text_dim=64, variant=variant)
    ref = diffusers.QwenImageTransformer2DModel.from_pretrained(path, subfolder="transformer",
                                                                torch_dtype=torch.float32).eval()
    ckpt = open_checkpoint(path)
    return QwenImageTransformer(ckpt.config, DenseProvider(ckpt)), ref


def inputs(img_shapes, text_len=7, masked=2, seed=0, text_dim=64):
    g = torch.Generator().manual_seed(seed)
    tokens = sum(f * h * w for f, h, w in img_shapes)
    latents = torch.randn(1, tokens, 64, generator=g)
    text = torch.randn(1, text_len, text_dim, generator=g)
    mask = torch.ones(1, text_len, dtype=torch.int64)
    if masked:
        mask[:, -masked:] = 0
    return latents, text, mask, torch.tensor([0.63])


@pytest.mark.parametrize("img_shapes, masked", [
    ([(1, 4, 6)], 2),          # text to image, padded prompt
    ([(1, 5, 3)], 0),          # odd grid, no mask
    ([(1, 4, 4), (1, 6, 2)], 1),  # Edit / Edit-2509: a reference image after the target
])
def test_qwen_image_matches_diffusers(tmp_path, img_shapes, masked):
    ours, ref = models(tmp_path, "qwen-image")
    latents, text, mask, t = inputs(img_shapes, masked=masked)
    with torch.no_grad():
        want = ref(latents, text, mask, t, [img_shapes]).sample
        got = ours(latents, text, mask, t, img_shapes)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= TOL


def test_edit_2511_modulates_references_at_t0(tmp_path):
    ours, ref = models(tmp_path, "edit-2511")
    img_shapes = [(1, 4, 4), (1, 4, 4)]
    latents, text, mask, t = inputs(img_shapes)
    with torch.no_grad():
        want = ref(latents, text, mask, t, [img_shapes]).sample
        got = ours(latents, text, mask, t, img_shapes)
    assert (got - want).abs().max() <= TOL


def test_layered_matches_diffusers(tmp_path):
    ours, ref = models(tmp_path, "layered")
    img_shapes = [(1, 4, 4), (1, 4, 4), (1, 4, 4)]  # two layers, then the condition image
    latents, text, mask, t = inputs(img_shapes)
    cond = torch.tensor([1])
    with torch.no_grad():
        want = ref(latents, text, mask, t, [img_shapes], additional_t_cond=cond).sample
        got = ours(latents, text, mask, t, img_shapes, additional_t_cond=cond)
    assert (got - want).abs().max() <= TOL


def test_blocks_are_fetched_one_at_a_time(tmp_path):
    """The provider is asked for block i's layers only after block i-1 has run."""
    ours, _ = models(tmp_path, "qwen-image")
    asked, done = [], []
    linear = ours.provider.linear

    def spy(module):
        if module.startswith("transformer_blocks."):
            asked.append((int(module.split(".")[1]), len(done)))
        return linear(module)

    ours.provider.linear = spy
    latents, text, mask, t = inputs([(1, 2, 2)])
    with torch.no_grad():
        ours(latents, text, mask, t, [(1, 2, 2)], on_block=lambda i, *_: done.append(i))
    assert {block for block, _ in asked} == {0, 1}
    assert all(finished == block for block, finished in asked)
