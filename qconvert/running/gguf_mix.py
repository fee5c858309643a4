"""GGUF ``--policy measured``: each block linear's GGML type chosen by the block measure, within a size.

The candidates are Q2_K, Q3_K, IQ4_XS, Q4_K, Q5_K, Q6_K, Q8_0 and BF16;
each is judged by ``sensitivity.block_sensitivity`` (the ComfyUI mix's
measure: the image stream's error after the following block, the layer alone
in that type) with the weight as the GGUF loaders use it (ComfyUI-GGUF and
diffusers dequantize every type and multiply in BF16: the dequantized
runtime), quantized with the importance matrix when one is given.  The
choice is ``mix.choose``: least summed error within the byte budget.  One
measurement serves every level asked for.
"""

from __future__ import annotations

import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from qconvert.codecs.gguf import quants
from qconvert.core.errors import QConvertError
from qconvert.running import mix
from qconvert.running.sensitivity import Candidates

MEASURED_TYPES = (T.Q2_K, T.Q3_K, T.IQ4_XS, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0, T.BF16)
# what the measure ran on, recorded in the file (block_sensitivity's defaults)
MEASURED_ON = "image stream after the next block; 256x256, 2 lightning steps, seed 0; dequantized runtime"


def measured_on(source) -> str:
    """:data:`MEASURED_ON`, and for an Edit model the reference image it was measured beside."""
    from qconvert.running.inputs import takes_references

    return MEASURED_ON + ("; beside a synthetic reference image (Edit)" if takes_references(source) else "")


def candidates(importance: dict | None = None) -> Candidates:
    """The GGUF types, stored as ``quants.quantize`` writes them (imatrix-weighted where ``importance``
    has the weight) and decoded by gguf-py, as a loader dequantizes them."""
    def fitting(name: str, shape: tuple) -> str | None:
        return name if shape[-1] % GGML_QUANT_SIZES[T[name]][0] == 0 else None

    def as_run(module: str, w: torch.Tensor, name: str):
        if name == "BF16":
            return w.to(torch.bfloat16).to(w.dtype), None
        qw = None if importance is None else importance.get(f"{module}.weight")
        raw = quants.quantize(w.cpu(), T[name], qw, name=f"{module}.weight")
        back = quants.dequantize(raw, T[name], tuple(w.shape))
        return torch.from_numpy(back).to(w.device, w.dtype), None

    return Candidates(tuple(t.name for t in MEASURED_TYPES), fitting, as_run)


def check_runnable(source, layers: list[str]) -> None:
    """A measured policy runs the model: refuse a source that cannot run (no block linears) or holds no
    values (a sparse layout's file holes read as zeros) before any measuring starts."""
    if not layers:
        raise QConvertError(f"{source.name}: --policy measured runs the model, and this source has no block "
                            "linears to measure")
    probe = f"{layers[0]}.weight"
    if not bool(source.load(probe).any()):
        raise QConvertError(f"{source.name}: {probe} is all zeros (a sparse test layout?); --policy measured runs "
                            "the model and needs its real weights (use city96, quantstack or uniform)")


def measure(source, *, importance: dict | None = None, device: str = "cpu", echo=print) -> dict:
    """{module: {type name: error}} for every block linear and every type that fits it."""
    from qconvert.running.sensitivity import block_sensitivity

    layers = mix.block_linears(source)
    check_runnable(source, layers)
    echo(f"to-gguf --policy measured: measuring {len(layers)} linears in {len(MEASURED_TYPES)} types each by the "
         f"image-stream error after the next block{' (imatrix-weighted quantization)' if importance else ''}")
    return block_sensitivity(source, layers, device=device, runtime="dequantized", echo=echo,
                             candidates=candidates(importance))


def sizes_of(source) -> dict:
    """{module: {type name: bytes}} of every block linear in every type that fits it, from the header alone
    (so a size that cannot be met is refused before any measuring)."""
    from qconvert.formats.gguf.policy import tensor_nbytes

    fits = candidates().fitting
    out = {}
    for m in mix.block_linears(source):
        shape = tuple(source.tensors[f"{m}.weight"].shape)
        out[m] = {f: tensor_nbytes(T[f], shape) for f in (fits(t.name, shape) for t in MEASURED_TYPES) if f}
    return out


def check_budget(sizes: dict, budget: int, what: str) -> None:
    """Refuse a budget below every linear in its smallest type or at least all of them in BF16."""
    smallest = sum(min(row.values()) for row in sizes.values())
    largest = sum(max(row.values()) for row in sizes.values())
    if budget < smallest:
        raise QConvertError(f"{what} leaves {budget:,} bytes for the block linears, less than all of them take in "
                            f"their smallest type ({smallest:,}); ask for a larger size")
    if budget >= largest:
        raise QConvertError(f"{what} leaves {budget:,} bytes for the block linears, at least what all of them take "
                            f"in BF16 ({largest:,}): nothing to choose; ask for a smaller size")


def choose_types(errors: dict, sizes: dict, budget: int) -> dict[str, T]:
    """{weight name: type} with the least summed error whose linears take at most ``budget`` bytes."""
    choice = mix.choose(errors, sizes, budget=budget)
    return {f"{m}.weight": T[f] for m, f in choice.items()}
