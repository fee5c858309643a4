"""Block-measured sensitivity for the size-budgeted mixes: each linear judged by what its format does.

One measure serves the ComfyUI mix (``mix``, :data:`COMFY`) and the GGUF
``--policy measured`` (``gguf_mix``): a :class:`Candidates` names the
formats and how each stores and runs a weight.

The weight-space error (``comfy_mix.sensitivity``) treats every linear alike;
the network does not.  Measured on the tiny model, one layer moved from NVFP4
to INT8 changed verify's latent PSNR by -0.8 to +3.5 dB: the last block's
``img_mod.1`` (its scale, shift and gate multiply the whole image stream)
mattered most, the last block's text-side layers not at all (the text stream
ends there, so only ``txt_mod.1``'s first shift and scale reach the image,
through the keys and values).  Here a short reference sampling run (verify's
machinery) records each block's inputs at a few steps; then, block by block,
every linear is put in each candidate format alone and the block run again:
its error is the relative error it causes in the image stream (see below),
averaged over the recorded steps.

Each candidate is judged where its error reaches the image: by the image
stream after the *following* block (the last block's own image output for
that block's layers).  Summing the text stream's relative error with the
image's, as this measure first did, spent bytes on text-side layers whose
large relative errors (NVFP4 rounds the text embeddings' outliers coarsely)
barely reach the image: on the tiny model the 6.0 MB mix verified at 38.6
dB that way and 42.5 dB judged after the next block; the 6.9 MB one 43.3 and
50.4 dB (docs/quality.md has the current figures).  The next block is where
a text-side error first meets the image (a text query, the text MLP, the
text output projection touch the image only through the later blocks'
attention); errors that take longer to arrive are not seen.  Two blocks'
weights in memory at a time, and each candidate runs two blocks.

Each candidate is run as the target runtime computes it (``runtime``):
``native`` (the default, as verify's) also quantizes the layer's input as
that format's matmul does (NVFP4 and MXFP8 in blocks, INT8 per row), which
is what a GPU with the kernels runs; ``dequantized`` multiplies the stored
weights by full-precision inputs, as GPUs without them do.

Several prompts (``seeds``) run as one batch, so each block's weights are
read once for all of them; each prompt's error counts alike.  (NVFP4's
activations share one tensor-wide scale, so at the native runtime a batch is
measured as the runtime would run that batch.)

An Edit model is measured as it is run: beside a seeded reference image as
large as the target (``inputs.synthetic_reference``), judged on the target's
tokens; text-to-image inputs would rank its layers for a use nobody has.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from qconvert.codecs.comfyui.registry import MIX_CANDIDATES as CANDIDATES
from qconvert.codecs.comfyui.registry import as_run
from qconvert.formats.comfyui.writer import fitting


@dataclass(frozen=True)
class Candidates:
    """The formats a mix chooses among.  ``fitting(fmt, shape)``: the format a layer of that shape stores
    when ``fmt`` is asked for (a fallback), or None where it cannot; ``as_run(module, weight, fmt)``: the
    weight the runtime multiplies by, and what its matmul does to the layer's input (None: nothing)."""

    names: tuple
    fitting: Callable[[str, tuple], str | None]
    as_run: Callable[[str, torch.Tensor, str], tuple]


def comfy_candidates(runtime: str) -> Candidates:
    """ComfyUI's formats, run as ``runtime`` runs them."""
    return Candidates(CANDIDATES, fitting, lambda module, w, fmt: as_run(w, fmt, runtime))


def _relative(x: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    denom = float(ref.pow(2).sum())
    return float((x.double() - ref).pow(2).sum()) / denom if denom else 0.0


def _relative_each(x: torch.Tensor, ref: torch.Tensor) -> float:
    """:func:`_relative` of each sample of the batch, averaged: every prompt counts alike, however loud."""
    return sum(_relative(x[b], ref[b]) for b in range(ref.shape[0])) / ref.shape[0]


class _Inputs:
    """Dense weights from a state dict; the layers in ``inputs`` first pass their input through its function
    (a format's native activation quantization)."""

    def __init__(self, state, *, device):
        from qconvert.running.providers import StateDictProvider

        self.dense = StateDictProvider(state, device=device)
        self.inputs: dict = {}

    def tensor(self, name: str) -> torch.Tensor:
        return self.dense.tensor(name)

    def linear(self, module: str):
        run, quantize = self.dense.linear(module), self.inputs.get(module)
        return run if quantize is None else (lambda x: run(quantize(x)))


def _block_weights(source, i: int, dev) -> dict:
    prefix = f"transformer_blocks.{i}."
    return {n: source.load(n).to(dev, torch.float32) for n in source.tensors if n.startswith(prefix)}


def _image_after(weights: dict | None, i: int, config, dev, target: int):
    """``judge(img, txt, rest)``: the target's ``target`` image tokens after block ``i`` (dense ``weights``) run
    on block ``i - 1``'s outputs and the sample's other inputs ``rest``; the image itself where there is no block
    ``i``.  (An Edit model's reference tokens follow the target's; the model's output drops them.)"""
    if weights is None:
        return lambda img, txt, rest: img[:, :target]
    from qconvert.running.model import Block

    block = Block(_Inputs(weights, device=dev), i, config)
    return lambda img, txt, rest: block(img, txt, *rest)[0][:, :target]


def block_sensitivity(source, layers: list[str], *, size: int = 256, steps: int = 2, seeds: tuple = (0,),
                      device: str = "cpu", runtime: str = "native", echo=print,
                      candidates: Candidates | None = None) -> dict[str, dict[str, float]]:
    """{layer: {format: the image-stream error that format alone causes after the following block}} for every
    candidate that fits: ``candidates`` (default ComfyUI's, run as ``runtime`` runs them).  One seeded
    synthetic prompt per seed in ``seeds``, all run as one batch (each block's weights read once), the error
    averaged over them."""
    candidates = candidates or comfy_candidates(runtime)
    from qconvert.running import inputs
    from qconvert.running.model import Block, QwenImageTransformer
    from qconvert.running.providers import DenseProvider
    from qconvert.running.sample import SampleOptions
    from qconvert.running.verify import Batch, measured_steps, sample_latents

    config = source.config
    options = SampleOptions(height=size, width=size, steps=steps, cfg=1.0, schedule="lightning", seed=seeds[0],
                            device=device, dtype="float32")
    # not verify's held-out prompts; negatives are not run (no CFG)
    prompt = inputs.batch_prompts([inputs.synthetic_prompt(config, seed, negative=False) for seed in seeds])
    reference = None
    if inputs.takes_references(source):
        reference = torch.cat([inputs.synthetic_reference(seed, size, size) for seed in seeds])
    noise = torch.cat([inputs.seeded_noise(seed, size, size) for seed in seeds])
    batch = Batch(prompt, noise, [{"seed": seed} for seed in seeds], reference)
    along: dict = {}
    start = time.monotonic()
    sample_latents(source, source, options, batch, record=(measured_steps(steps), along))
    edit = "" if reference is None else " beside a synthetic reference image (an Edit model)"
    echo(f"  reference run for the block inputs ({len(seeds)} prompt(s) in one batch){edit}: "
         f"{time.monotonic() - start:.1f} s; then {len(layers)} linears x {len(candidates.names)} formats x "
         f"{len(along)} steps, each its block and the next")
    dev = torch.device(device)
    prompt = prompt.to(dev, torch.float32)
    shapes = batch.shapes(size, size)
    target = inputs.tokens(size, size)  # the image tokens judged: the target's (a reference's reach it or nothing)
    dense = QwenImageTransformer(config, DenseProvider(source, device=dev))
    states = [dense.embed(batch.model_input(latents.to(dev)), prompt.embeds, prompt.mask, t.to(dev), shapes)
              for _, (latents, t) in sorted(along.items())]
    wanted = set(layers)
    table: dict[str, dict[str, float]] = {}
    first = time.monotonic()
    following = _block_weights(source, 0, dev)
    for i in range(config.num_layers):
        if i == 1:
            took = time.monotonic() - first
            echo(f"  block 1 of {config.num_layers} took {took:.1f} s; about {took * config.num_layers / 60:.1f} min "
                 "in all")
        weights, last = following, i == config.num_layers - 1
        following = None if last else _block_weights(source, i + 1, dev)
        provider = _Inputs(weights, device=dev)
        args = [(s.img, s.txt, s.temb, s.mask, s.freqs, s.modulate_index) for s in states]
        with torch.no_grad():
            reference = [Block(provider, i, config)(*a) for a in args]
            judge = _image_after(following, i + 1, config, dev, target)
            wanted_images = [judge(img, txt, a[2:]) for a, (img, txt) in zip(args, reference)]
            for module in sorted(m for m in wanted if m.startswith(f"transformer_blocks.{i}.")):
                name = f"{module}.weight"
                original = weights[name]
                row = table.setdefault(module, {})
                fits = (candidates.fitting(f, tuple(original.shape)) for f in candidates.names)
                for fmt in dict.fromkeys(f for f in fits if f is not None):
                    weight, inputs_as = candidates.as_run(module, original, fmt)
                    weights[name] = weight.to(original.dtype)
                    if inputs_as is None and torch.equal(weights[name], original):  # BF16 of a BF16 source
                        row[fmt] = 0.0
                        continue
                    provider.inputs = {module: inputs_as} if inputs_as is not None else {}
                    error = sum(_relative_each(judge(*Block(provider, i, config)(*a), a[2:]), want)
                                for a, want in zip(args, wanted_images))
                    row[fmt] = error / len(args)
                weights[name] = original
                provider.inputs = {}
        for s, (img, txt) in zip(states, reference):
            s.img, s.txt = img, txt
        del weights, provider
    return table
