"""Importance vectors for ``to-gguf --imatrix``: from a qconvert calibration file, or from llama.cpp's own
GGUF imatrix files (llama-imatrix, stable-diffusion.cpp)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qconvert.core.errors import QConvertError
from qconvert.core.models import qwen_image as qi
from qconvert.formats.calibration import calibration_means
from qconvert.formats.gguf.reader import SD_CPP_MAX_NAME, open_gguf


def read_imatrix(path, source) -> dict[str, torch.Tensor]:
    """weight name -> importance vector, from a calibration file made for ``source``'s model.

    Reads qconvert's calibration files and llama.cpp's GGUF imatrix files
    (``<weight>.in_sum2`` / ``<weight>.counts``, as llama-imatrix and
    stable-diffusion.cpp write them; ComfyUI/sd.cpp's ``model.diffusion_model.``
    prefix is stripped).  Every quantizable block linear of the model must be
    present with a vector of its input width; anything else is an error naming
    the tensor.
    """
    path = Path(path)
    vectors = _gguf_imatrix(path) if path.suffix.lower() == ".gguf" else calibration_means(path)
    out = {}
    for name, shape in source.shapes().items():
        if not qi.is_known(name) or not qi.describe(name).is_block_linear:
            continue
        module = qi.describe(name).module
        v = vectors.get(name)
        if v is None:
            raise QConvertError(f"{path}: no statistics for {module}; was it made from this model "
                                "(qconvert calibrate on the same source)?")
        if tuple(v.shape) != (shape[-1],):
            raise QConvertError(f"{path}: the importance of {module} has {v.numel()} values; this model's "
                                f"layer takes {shape[-1]} inputs (a calibration of another model?)")
        if not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
            raise QConvertError(f"{path}: the importance of {module} holds negative or non-finite values")
        out[name] = v
    return out


GGUF_IMATRIX_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def _gguf_imatrix(path: Path) -> dict[str, torch.Tensor]:
    """llama.cpp's rule: a weight's importance is in_sum2 / count (1 where the count is 0)."""
    # stable-diffusion.cpp writes names up to 127 bytes ("model.diffusion_model.transformer_blocks.…in_sum2")
    tensors = {t.name: t for t in open_gguf(path, max_name=SD_CPP_MAX_NAME).tensors}
    out = {}
    for key, t in tensors.items():
        if not key.endswith(".in_sum2"):
            continue
        base = key[: -len(".in_sum2")]
        counts = tensors.get(base + ".counts")
        if counts is None or t.tensor_type.name != "F32" or counts.tensor_type.name != "F32":
            raise QConvertError(f"{path}: {key} needs an F32 {base}.counts beside it (llama.cpp's imatrix format)")
        sums = np.asarray(t.data, dtype=np.float32).reshape(-1)
        n = np.asarray(counts.data, dtype=np.float32).reshape(-1)
        if n.size != 1:
            raise QConvertError(f"{path}: {base} has {n.size} matrices (an MoE layer); Qwen-Image has one")
        values = sums / n[0] if n[0] > 0 else np.ones_like(sums)
        name = next((base[len(p):] for p in GGUF_IMATRIX_PREFIXES if base.startswith(p)), base)
        out[name] = torch.from_numpy(values.astype(np.float32))
    return out
