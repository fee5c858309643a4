"""The sampler against diffusers' QwenImagePipeline denoising loop (its scheduler and transformer)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qconvert.core import tiny
from qconvert.core.checkpoint import open_checkpoint
from qconvert.running import sampler
from qconvert.running.model import QwenImageTransformer
from qconvert.running.providers import DenseProvider

diffusers = pytest.importorskip("diffusers", reason="diffusers is the oracle for the sampler")
pytestmark = pytest.mark.oracle

SCHEDULER_CONFIGS = {
    # Qwen/Qwen-Image scheduler/scheduler_config.json (spec §6.3)
    "qwen": dict(base_image_seq_len=256, max_image_seq_len=8192, base_shift=0.5, max_shift=0.9, shift=1.0,
                 shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True),
    # ModelTC's Lightning config (spec §6.8)
    "lightning": dict(base_image_seq_len=256, max_image_seq_len=8192, base_shift=math.log(3),
                      max_shift=math.log(3), shift=1.0, shift_terminal=None, time_shift_type="exponential",
                      use_dynamic_shifting=True),
}


def scheduler(name):
    return diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **SCHEDULER_CONFIGS[name])


@pytest.mark.parametrize("name, steps, seq", [("qwen", 50, 6889), ("qwen", 8, 4096), ("qwen", 3, 24),
                                              ("lightning", 4, 6889), ("lightning", 8, 100)])
def test_sigmas_equal_the_scheduler(name, steps, seq):
    ref = scheduler(name)
    mu = sampler.SCHEDULES[name].mu(seq)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    assert torch.equal(sampler.sigmas(sampler.SCHEDULES[name], steps, seq), ref.sigmas)


def test_worked_values_of_the_spec():
    assert sampler.SCHEDULES["qwen"].mu(6889) == pytest.approx(0.8343, abs=1e-4)
    s = sampler.sigmas(sampler.SCHEDULES["qwen"], 50, 6889)
    assert s[-2].item() == pytest.approx(0.02) and s[-1].item() == 0
    assert sampler.sigmas(sampler.SCHEDULES["lightning"], 4, 6889).tolist() == pytest.approx(
        [1.0, 0.9, 0.75, 0.5, 0.0], abs=1e-6)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    path = tiny.make_tiny(tmp_path_factory.mktemp("sampler") / "m", layers=2, heads=2, head_dim=32, text_dim=64)
    ref = diffusers.QwenImageTransformer2DModel.from_pretrained(path, subfolder="transformer",
                                                                torch_dtype=torch.float32).eval()
    ckpt = open_checkpoint(path)
    return QwenImageTransformer(ckpt.config, DenseProvider(ckpt)), ref


@pytest.mark.parametrize("name, steps, cfg", [("qwen", 4, 4.0), ("lightning", 4, 1.0)])
def test_sampling_matches_the_pipeline_loop(tiny_pair, name, steps, cfg):
    ours, ref = tiny_pair
    height, width = 64, 96
    g = torch.Generator().manual_seed(3)
    tokens = (height // 16) * (width // 16)
    noise = torch.randn(1, tokens, 64, generator=g)
    text, neg = torch.randn(1, 6, 64, generator=g), torch.randn(1, 5, 64, generator=g)
    mask, neg_mask = torch.ones(1, 6, dtype=torch.int64), torch.ones(1, 5, dtype=torch.int64)
    mask[:, -1] = 0
    pipe = diffusers.QwenImagePipeline(scheduler=scheduler(name), vae=None, text_encoder=None, tokenizer=None,
                                       transformer=ref)
    pipe.set_progress_bar_config(disable=True)
    neg_kwargs = dict(negative_prompt_embeds=neg, negative_prompt_embeds_mask=neg_mask) if cfg > 1 else {}
    with torch.no_grad():
        want = pipe(prompt_embeds=text, prompt_embeds_mask=mask, height=height, width=width,
                    num_inference_steps=steps, true_cfg_scale=cfg, latents=noise, output_type="latent",
                    **neg_kwargs).images
        got = sampler.sample(ours, noise, text, mask, steps=steps, schedule=name, cfg=cfg,
                             neg_text=neg if cfg > 1 else None, neg_mask=neg_mask,
                             img_shapes=[(1, height // 16, width // 16)])
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-4
    assert (got - noise).abs().mean() > 0.1  # it did denoise


@pytest.mark.slow
def test_edit_sampling_matches_the_edit_pipeline(tmp_path):
    """QwenImageEditPipeline with a reference image (a tiny random VAE encodes it; no text encoder needed
    with embeddings): our loop, given the same reference latents, ends on the same latents."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions
    from PIL import Image

    from qconvert.running import inputs

    path = tiny.make_tiny(tmp_path / "m", layers=1, heads=2, head_dim=32, text_dim=64)
    ref = diffusers.QwenImageTransformer2DModel.from_pretrained(path, subfolder="transformer",
                                                                torch_dtype=torch.float32).eval()
    vae = diffusers.AutoencoderKLQwenImage(base_dim=16, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1).eval()
    pipe = diffusers.QwenImageEditPipeline(scheduler=scheduler("qwen"), vae=vae, text_encoder=None, tokenizer=None,
                                           processor=None, transformer=ref)
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray((np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8))
    g = torch.Generator().manual_seed(3)
    text, mask = torch.randn(1, 6, 64, generator=g), torch.ones(1, 6, dtype=torch.int64)
    noise = inputs.seeded_noise(5, 64, 64)
    with torch.no_grad():
        want = pipe(image=image, prompt_embeds=text, prompt_embeds_mask=mask, height=64, width=64,
                    num_inference_steps=3, true_cfg_scale=1.0, latents=noise, output_type="latent").images
        # the reference latents as the pipeline makes them (its own resize, preprocess and VAE encode)
        w, h, _ = calculate_dimensions(1024 * 1024, image.size[0] / image.size[1])
        pixels = pipe.image_processor.preprocess(pipe.image_processor.resize(image, h, w), h, w).unsqueeze(2)
        packed = inputs.pack(pipe._encode_vae_image(pixels, generator=None))
        ckpt = open_checkpoint(path)
        got = sampler.sample(QwenImageTransformer(ckpt.config, DenseProvider(ckpt)), noise, text, mask, steps=3,
                             schedule="qwen", img_shapes=[(1, 4, 4), (1, h // 16, w // 16)], image_latents=packed)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["qwen-image", "edit-2511"])
def test_edit_plus_sampling_matches_the_edit_plus_pipeline(tmp_path, variant):
    """QwenImageEditPlusPipeline (Edit-2509; Edit-2511 with zero_cond_t) with two reference images of
    different shapes and true CFG: our loop, given the pipeline's reference latents, ends on its latents."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import VAE_IMAGE_SIZE, calculate_dimensions
    from PIL import Image

    from qconvert.running import inputs

    path = tiny.make_tiny(tmp_path / "m", layers=1, heads=2, head_dim=32, text_dim=64, variant=variant)
    ref = diffusers.QwenImageTransformer2DModel.from_pretrained(path, subfolder="transformer",
                                                                torch_dtype=torch.float32).eval()
    vae = diffusers.AutoencoderKLQwenImage(base_dim=16, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1).eval()
    pipe = diffusers.QwenImageEditPlusPipeline(scheduler=scheduler("qwen"), vae=vae, text_encoder=None,
                                               tokenizer=None, processor=None, transformer=ref)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random(size) * 255).astype(np.uint8)) for size in ((32, 64, 3), (48, 32, 3))]
    g = torch.Generator().manual_seed(3)
    text, neg = torch.randn(1, 6, 64, generator=g), torch.randn(1, 4, 64, generator=g)
    mask, neg_mask = torch.ones(1, 6, dtype=torch.int64), torch.ones(1, 4, dtype=torch.int64)
    noise = inputs.seeded_noise(5, 64, 64)
    with torch.no_grad():
        want = pipe(image=images, prompt_embeds=text, prompt_embeds_mask=mask, negative_prompt_embeds=neg,
                    negative_prompt_embeds_mask=neg_mask, true_cfg_scale=3.0, height=64, width=64,
                    num_inference_steps=3, latents=noise, output_type="latent").images
        shapes, packed = [(1, 4, 4)], []
        for image in images:  # the pipeline's own resize, preprocess and VAE encode, image by image
            w, h = calculate_dimensions(VAE_IMAGE_SIZE, image.size[0] / image.size[1])
            pixels = pipe.image_processor.preprocess(image, h, w).unsqueeze(2)
            packed.append(inputs.pack(pipe._encode_vae_image(pixels, generator=None)))
            shapes.append((1, h // 16, w // 16))
        ckpt = open_checkpoint(path)
        got = sampler.sample(QwenImageTransformer(ckpt.config, DenseProvider(ckpt)), noise, text, mask, steps=3,
                             schedule="qwen", cfg=3.0, neg_text=neg, neg_mask=neg_mask, img_shapes=shapes,
                             image_latents=torch.cat(packed, dim=1))
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-4
