"""The reference transformer against diffusers' QwenImageTransformer2DModel, variant by variant."""

from __future__ import annotations

import pytest
import torch

from qconvert.core import tiny
from qconvert.core.checkpoint import open_checkpoint
from qconvert.running.model import QwenImageTransformer
from qconvert.running.providers import DenseProvider

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


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return tiny.make_tiny(tmp_path_factory.mktemp("prov") / "m", layers=2, heads=2, head_dim=128, text_dim=256)


def run_model(provider_source, config):
    latents, text, mask, t = inputs([(1, 4, 4)], text_dim=config.joint_attention_dim)
    with torch.no_grad():
        return QwenImageTransformer(config, DenseProvider(provider_source))(latents, text, mask, t, [(1, 4, 4)])


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def test_gguf_provider(tmp_path, small):
    """BF16 GGUF runs exactly as its source; Q8_0 close; Q2_K further off (the ranking verify reports)."""
    import gguf

    from qconvert.formats.gguf import writer
    from qconvert.formats.opener import GGUFWeights

    ckpt = open_checkpoint(small)
    paths = {level: tmp_path / f"m-{level}.gguf" for level in ("BF16", "Q8_0", "Q2_K")}
    writer.write_gguf(ckpt, writer.plan_files(ckpt, list(paths), policy="uniform"), list(paths.values()), quiet=True)
    dense = run_model(ckpt, ckpt.config)
    err = {}
    for level, path in paths.items():
        source = GGUFWeights(path)
        # the weights are gguf-py's own dequantization of the file
        t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "transformer_blocks.1.img_mod.1.weight")
        want = gguf.quants.dequantize(t.data, t.tensor_type)
        assert torch.equal(source.load(t.name), torch.from_numpy(want.astype("float32")).reshape(
            source.load(t.name).shape))
        err[level] = rel_err(run_model(source, ckpt.config), dense)
    assert err["BF16"] == 0
    assert 0 < err["Q8_0"] < 0.05 and err["Q2_K"] > 5 * err["Q8_0"], err


def test_fp8_provider(tmp_path, small):
    from qconvert.formats.comfyui import fp8
    from qconvert.formats.comfyui.loader import load_dequantized
    from qconvert.formats.opener import FP8Weights

    ckpt = open_checkpoint(small)
    dense = run_model(ckpt, ckpt.config)
    errs = {}
    for layout in ("comfy", "scaled", "plain"):
        out = tmp_path / f"{layout}.safetensors"
        fp8.convert(ckpt, out, fp8.make_options(layout), quiet=True)
        source = FP8Weights(out)
        # the same weights as the documented loader gives diffusers
        assert torch.equal(source.load("transformer_blocks.0.attn.to_q.weight"),
                           load_dequantized(out, dtype=torch.float32)["transformer_blocks.0.attn.to_q.weight"])
        errs[layout] = rel_err(run_model(source, ckpt.config), dense)
    assert 0 < errs["comfy"] < 0.15 and errs["scaled"] < 0.15, errs
    assert errs["plain"] > errs["comfy"], errs  # unscaled small weights lose their bits


def test_finite_outputs_names_the_layer_that_breaks():
    """verify's guard: a layer that turns finite inputs into NaN/Inf is a one-line error naming it."""
    from qconvert.core.errors import QuantizationError
    from qconvert.running.providers import FiniteOutputs, StateDictProvider

    state = {"a.weight": torch.ones(2, 2), "a.bias": torch.zeros(2),
             "b.weight": torch.full((2, 2), float("nan")), "b.bias": torch.zeros(2)}
    provider = FiniteOutputs(StateDictProvider(state), "out.safetensors")
    x = torch.ones(1, 2)
    assert torch.equal(provider.linear("a")(x), torch.full((1, 2), 2.0))
    with pytest.raises(QuantizationError, match="out.safetensors: layer b turns finite inputs into NaN/Inf"):
        provider.linear("b")(x)
    provider.linear("b")(torch.full((1, 2), float("nan")))  # NaN that came in is not this layer's doing
