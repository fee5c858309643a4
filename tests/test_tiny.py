"""Test models: trained-looking tiny ones that diffusers loads, sparse full-size ones."""

from __future__ import annotations

import json

import pytest
import torch

from qconvert.core.checkpoint import open_checkpoint
from qconvert.core.models import qwen_image as qi


def test_layout_and_shards(tiny_model):
    assert json.loads((tiny_model / "model_index.json").read_text())["transformer"][1] == qi.DIFFUSERS_CLASS
    assert len(list((tiny_model / "transformer").glob("*.safetensors"))) >= 2
    config = json.loads((tiny_model / "transformer" / "config.json").read_text())
    assert config["_class_name"] == qi.DIFFUSERS_CLASS


def test_weights_look_trained(tiny_model):
    ckpt = open_checkpoint(tiny_model)
    w = ckpt.load("transformer_blocks.1.img_mlp.net.0.proj.weight").float()
    centred = w - w.mean()
    kurtosis = float((centred ** 4).mean() / (centred ** 2).mean() ** 2)
    assert kurtosis > 5, "heavy tails, not N(0, 1)"
    assert 1e-3 < float(w.std()) < 0.5
    blocks = w.reshape(-1, 256)
    assert bool((blocks == 0).all(dim=1).any()), "an exact-zero super-block"
    amax = blocks.abs().amax(dim=1)
    assert bool(((amax > 0) & (amax < 1e-5)).any()), "a tiny-valued super-block"
    col_rms = w.pow(2).mean(dim=0).sqrt()
    assert float(col_rms.max() / col_rms.median()) > 3, "hot input channels"


def test_deterministic(tmp_path):
    from qconvert.core.tiny import make_tiny

    a = make_tiny(tmp_path / "a", layers=1, seed=3)
    b = make_tiny(tmp_path / "b", layers=1, seed=3)
    for fa, fb in zip(sorted((a / "transformer").iterdir()), sorted((b / "transformer").iterdir())):
        assert fa.read_bytes() == fb.read_bytes()


def test_every_format_applies_to_default_dims(tiny_model):
    ckpt = open_checkpoint(tiny_model)
    for name, meta in ckpt.tensors.items():
        if qi.describe(name).is_block_linear:
            rows, cols = meta.shape
            assert cols % 256 == 0, "K-quants need rows divisible by 256"
            assert rows % 128 == 0 and cols % 128 == 0, "Nunchaku packing needs multiples of 128"


@pytest.mark.oracle
def test_diffusers_loads_the_tiny_model(tiny_model):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is the oracle for the official layout")
    model = diffusers.QwenImageTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer",
                                                                   torch_dtype=torch.bfloat16)
    ckpt = open_checkpoint(tiny_model)
    state = model.state_dict()
    assert set(state) == set(ckpt.names())
    for name in ("txt_norm.weight", "transformer_blocks.2.attn.add_v_proj.weight"):
        assert torch.equal(state[name], ckpt.load(name))
    # And it runs.
    cfg = ckpt.config
    out = model(hidden_states=torch.randn(1, 16, cfg.in_channels, dtype=torch.bfloat16),
                encoder_hidden_states=torch.randn(1, 7, cfg.joint_attention_dim, dtype=torch.bfloat16),
                encoder_hidden_states_mask=torch.ones(1, 7, dtype=torch.long),
                timestep=torch.tensor([0.5]), img_shapes=[(1, 4, 4)], return_dict=False)[0]
    assert out.shape == (1, 16, 64) and bool(torch.isfinite(out).all())


def test_make_tiny_rejects_bad_dims(tmp_path):
    from qconvert.core.errors import QConvertError
    from qconvert.core.tiny import make_tiny

    with pytest.raises(QConvertError, match="head-dim"):
        make_tiny(tmp_path / "x", head_dim=40)
