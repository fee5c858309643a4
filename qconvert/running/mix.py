"""Size-budgeted mixed precision for ComfyUI: each block linear gets BF16, FP8, MXFP8, INT8, NVFP4 or W4A8.

Sensitivity, measured by the block (the default): ``comfy_sensitivity``.
Sensitivity by weight (``--sensitivity weight``, or with ``--calib``): every
block linear is encoded in every candidate format and
decoded as ComfyUI dequantizes it; its error is the activation-weighted
relative squared error ``Σⱼ aⱼ‖ΔW[:, j]‖² / Σⱼ aⱼ‖W[:, j]‖²`` with ``aⱼ`` the
mean square of input channel j from ``qconvert calibrate`` (1 without
``--calib``): the expected output error of the layer on the calibrated
inputs.  One streaming pass over the weights, nothing held but the table.
Per-layer relative, not absolute (each layer's error energy over the mean
layer's): absolute did better on the tiny model (35.6/37.4 dB against
34.4/35.1 at 6/7 MB) but worse on a full-width two-block model (37.4/40.0 dB
against 39.7/41.3), the more realistic one.

Choice: minimize the summed error subject to the size (``--target-size``) or
the size subject to the mean error (``--max-error``), by the Lagrangian
relaxation: for a price λ each layer takes the format minimizing
``error + λ·bytes``; λ is bisected until the constraint just holds.  This
is exact for the relaxed problem and leaves at most one layer's difference
to the integer optimum.  The plan lists each layer's format and the errors of
the ones it passed over.
"""

from __future__ import annotations

import math

import torch

from qconvert.codecs.comfyui import registry
from qconvert.core.errors import QConvertError
from qconvert.core.models import qwen_image as qi
from qconvert.formats.comfyui.writer import FIRST_MODULATION, fitting, layer_entries

CANDIDATES = registry.MIX_CANDIDATES


def layer_bytes(shape: tuple, fmt: str) -> int:
    if fmt == registry.BF16:
        return 2 * shape[0] * shape[1]
    from qconvert.core.checkpoint import DTYPES

    return sum(math.prod(s) * DTYPES[d][0] for _, d, s in layer_entries("x", shape, fmt))


def roundtrip(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """The weight as ComfyUI would use it after storing it in ``fmt``."""
    return registry.roundtrip(w, fmt)


def block_linears(source) -> list[str]:
    return sorted(qi.describe(n).module for n in source.tensors
                  if qi.is_known(n) and qi.describe(n).is_block_linear)


def sensitivity(source, layers: list[str], importance: dict | None = None, *, device="cpu",
                progress=None, candidates: tuple = CANDIDATES) -> dict[str, dict[str, float]]:
    """{layer: {format: activation-weighted relative squared error}} for every candidate that fits the layer."""
    table = {}
    for layer in layers:
        w = source.load(f"{layer}.weight").to(device, torch.float32)
        a = importance[layer].to(device).float() if importance else torch.ones(w.shape[1], device=device)
        base = float((w.pow(2).sum(0) * a).sum()) or 1.0
        row = {}
        for fmt in (fitting(f, w.shape) for f in candidates):
            delta = roundtrip(w, fmt) - w
            row[fmt] = float((delta.pow(2).sum(0) * a).sum()) / base
        table[layer] = row
        if progress is not None:
            progress(layer)
    return table


def choose(errors: dict, sizes: dict, *, budget: int | None = None, max_error: float | None = None) -> dict:
    """{layer: format} meeting ``budget`` bytes (least summed error) or ``max_error`` mean error (least size)."""
    if (budget is None) == (max_error is None):
        raise ValueError("give exactly one of budget and max_error")

    def pick(price: float) -> dict:
        return {layer: min(row, key=lambda f: (row[f] + price * sizes[layer][f], sizes[layer][f]))
                for layer, row in errors.items()}

    def total(choice):
        return sum(sizes[l][f] for l, f in choice.items()), sum(errors[l][f] for l, f in choice.items())

    smallest = {layer: min(row, key=lambda f: sizes[layer][f]) for layer, row in errors.items()}
    if budget is not None and total(smallest)[0] > budget:
        raise QConvertError(f"the smallest mix (every layer in its smallest format) takes {total(smallest)[0]:,} "
                            f"bytes of linears, more than the {budget:,} the target size leaves")
    lo, hi = -60.0, 10.0  # log10 of the price of a byte
    best = smallest if budget is not None else pick(0.0)
    if max_error is not None and total(best)[1] / len(errors) > max_error:
        raise QConvertError(f"--max-error {max_error:g}: even all-BF16 layers err {total(best)[1] / len(errors):.3g}")
    for _ in range(80):
        mid = (lo + hi) / 2
        choice = pick(10 ** mid)
        size, err = total(choice)
        fits = size <= budget if budget is not None else err / len(errors) <= max_error
        if fits:
            best = choice
            if budget is not None:
                hi = mid  # cheaper bytes: more precision while it fits
            else:
                lo = mid  # dearer bytes: smaller while the error holds
        elif budget is not None:
            lo = mid
        else:
            hi = mid
    return best


def plan_lines(errors: dict, sizes: dict, choice: dict, limit: int = 40) -> list[str]:
    """Why each layer got its format: its error and size there, and the other candidates' errors."""
    lines = []
    for layer in sorted(choice)[:limit]:
        f = choice[layer]
        others = ", ".join(f"{g} {errors[layer][g]:.2e}" for g in errors[layer] if g != f)
        lines.append(f"  {layer:<44} {f:<6} err {errors[layer][f]:.2e}, {sizes[layer][f]:>12,} B  (else {others})")
    if len(choice) > limit:
        lines.append(f"  ... {len(choice) - limit} more in --json")
    return lines


def mix_candidates(names) -> tuple:
    """The formats a mix may choose among: ``names`` (BF16 is always one, so every layer has a choice), or all
    of ``CANDIDATES`` when none are given.  A mix of ``w4a8,int8`` runs natively on every GPU from Turing on."""
    names = tuple(dict.fromkeys(n.strip() for item in names for n in str(item).split(",") if n.strip()))
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        raise QConvertError(f"--candidates {unknown[0]}: a mix chooses among {', '.join(CANDIDATES)}")
    return tuple(f for f in CANDIDATES if f in names or f == registry.BF16) if names else CANDIDATES


def mixed_options(source, *, target_size: float | None = None, max_error: float | None = None, calib=None,
                  keep=(), device="cpu", echo=print, measure: str | None = None, runtime: str | None = None,
                  candidates: tuple = CANDIDATES):
    """``ComfyOptions`` of fmt "mix" for ``source``, and a summary of the choice (sizes exact).
    ``measure``: "block" (``comfy_sensitivity``, the default) or "weight" (this module's weight-space error,
    the default when ``calib`` is given).  ``runtime``: what the choice is made for, recorded in the file:
    "native" (the default for the block measure: inputs quantized as each format's matmul does) or
    "dequantized"; the weight measure sees weights only, so it chooses for the dequantized runtime."""
    measure = measure or ("weight" if calib is not None else "block")
    if measure == "weight" and runtime == "native":
        raise QConvertError("--sensitivity weight measures weights alone, so its choice is for --runtime "
                            "dequantized; for the native runtime use --sensitivity block (without --calib)")
    runtime = runtime or ("native" if measure == "block" else "dequantized")
    from dataclasses import replace

    from qconvert.core.io import safetensors_size
    from qconvert.formats.comfyui.writer import ComfyOptions, plan
    from qconvert.running.inputs import takes_references

    kept = frozenset().union(*(qi.ROLE_GROUPS[g] for g in keep))
    layers = [m for m in block_linears(source) if qi.describe(f"{m}.weight").role not in kept]
    if measure == "block":
        from qconvert.running.sensitivity import block_sensitivity, comfy_candidates

        if calib is not None:
            raise QConvertError("--sensitivity block measures on its own reference run; --calib is for the "
                                "weight-space measure (give one or the other)")
        how = ("inputs quantized as each format's native matmul does" if runtime == "native"
               else "dequantized weights, full-precision inputs")
        echo(f"to-comfy mix: chosen for the {runtime} runtime: measuring {len(layers)} linears in {len(candidates)} "
             f"formats each by the image-stream error after the next block ({how})")
        among = replace(comfy_candidates(runtime), names=candidates)
        errors = block_sensitivity(source, layers, device=device, runtime=runtime, echo=echo, candidates=among)
    else:
        importance = None
        if calib is not None:
            from qconvert.formats.calibration import read_stats

            importance = {m: s.sq_sum / max(s.seen, 1) for m, s in read_stats(calib, source, layers).items()}
        echo(f"to-comfy mix: chosen for the dequantized runtime: measuring {len(layers)} linears in "
             f"{len(candidates)} formats each "
             f"({'weighted by ' + str(calib) if calib else 'unweighted: pass --calib for activation-weighted errors'})")
        errors = sensitivity(source, layers, importance, device=device, candidates=candidates)
    if FIRST_MODULATION in errors:  # comfy-quants keeps it BF16 in every FP format: the most sensitive linear
        errors[FIRST_MODULATION] = {"bf16": 0.0}
    sizes = {m: {f: layer_bytes(tuple(source.tensors[f"{m}.weight"].shape), f) for f in errors[m]} for m in layers}
    all_bf16 = ComfyOptions("mix", tuple(keep), tuple((m, "bf16") for m in layers), chosen_for=runtime,
                            candidates=() if candidates == CANDIDATES else candidates)
    entries, meta, _ = plan(source, all_bf16, dry_run=True)
    fixed = safetensors_size(entries, meta) - sum(sizes[m]["bf16"] for m in layers)
    budget = None if target_size is None else int(target_size * 1e9) - fixed - 256 * len(layers)
    for _ in range(4):
        choice = choose(errors, sizes, budget=budget, max_error=max_error)
        options = replace(all_bf16, mix=tuple(sorted(choice.items())))
        entries, meta, _ = plan(source, options, dry_run=True)
        size = safetensors_size(entries, meta)
        if target_size is None or size <= target_size * 1e9:
            break
        budget -= size - int(target_size * 1e9)  # the header grew more than allowed for: tighten and rechoose
    summary = {"target_size_gb": target_size, "max_error": max_error, "bytes": size, "runtime": runtime,
               "measure": measure, "candidates": list(candidates),
               **({"measured_beside": "a synthetic reference image (an Edit model)"}
                  if measure == "block" and takes_references(source) else {}),
               "mean_error": sum(errors[m][f] for m, f in choice.items()) / len(choice),
               "layers": {m: {"format": f, "error": errors[m][f], "bytes": sizes[m][f],
                              "candidates": errors[m]} for m, f in sorted(choice.items())}}
    return options, summary, plan_lines(errors, sizes, choice)
