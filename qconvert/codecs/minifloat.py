"""E2M1, the 4-bit float of NVFP4, rounded as the NVFP4 quantizers of comfy-kitchen and diffusers round it.

Codes are uint8 with the sign in bit 3 and the magnitude index (0, 0.5, 1, 1.5, 2, 3, 4, 6) in bits 2-0.
Shared by ComfyUI's ``nvfp4`` layout and diffusers' ModelOpt-style ``nvfp4`` files; SVDQuant's NVFP4
rounds its ties differently (Nunchaku's kernels) and keeps its own.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0
E2M1_MAX = 6.0
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def e2m1_rne(x: torch.Tensor) -> torch.Tensor:
    """E2M1 codes rounding to nearest, ties to the even code; saturating at 6.  The sign bit follows the
    float's sign bit, so -0.0 (and a negative value rounding to 0) gives code 8."""
    mag = x.abs().clamp(max=E2M1_MAX)
    mids = torch.tensor(_MIDPOINTS, dtype=mag.dtype, device=mag.device)
    idx = torch.bucketize(mag, mids)  # ties go to the lower code here ...
    tie = (idx < len(_MIDPOINTS)) & (mag == mids[idx.clamp(max=len(_MIDPOINTS) - 1)])
    idx = torch.where(tie & (idx % 2 == 1), idx + 1, idx)  # ... and to the even one here
    return (idx | torch.signbit(x).to(idx.dtype) << 3).to(torch.uint8)


def e2m1_value(codes: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(E2M1 + tuple(-v for v in E2M1), dtype=torch.float32, device=codes.device)
    return table[codes.long()]
