"""Pictures for the report: latent previews, a difference map, a per-layer error chart; one HTML page.

Latents are previewed as ComfyUI previews Qwen-Image latents: a linear map of
the 16 normalised latent channels to RGB (``latent_formats.Wan21``'s
``latent_rgb_factors`` and bias), then ``(x + 1) / 2`` clamped.  That needs
no VAE, so a report has pictures on any machine.  PNGs are written with
zlib alone (no imaging library at run time).
"""

from __future__ import annotations

import html
import math
import struct
import zlib
from pathlib import Path

import torch

# ComfyUI comfy/latent_formats.py, class Wan21 (the Qwen-Image VAE's latent space): one row per channel.
LATENT_RGB_FACTORS = (
    (-0.1299, -0.1692, 0.2932), (0.0671, 0.0406, 0.0442), (0.3568, 0.2548, 0.1747), (0.0372, 0.2344, 0.1420),
    (0.0313, 0.0189, -0.0328), (0.0296, -0.0956, -0.0665), (-0.3477, -0.4059, -0.2925), (0.0166, 0.1902, 0.1975),
    (-0.0412, 0.0267, -0.1364), (-0.1293, 0.0740, 0.1636), (0.0680, 0.3019, 0.1128), (0.0032, 0.0581, 0.0639),
    (-0.1251, 0.0927, 0.1699), (0.0060, -0.0633, 0.0005), (0.3477, 0.2275, 0.2950), (0.1984, 0.0913, 0.1861),
)
LATENT_RGB_BIAS = (-0.1835, -0.0868, -0.3360)


def preview(latents: torch.Tensor) -> torch.Tensor:
    """[16, h, w] normalised latents -> [h, w, 3] uint8, as ComfyUI's latent preview."""
    factors = torch.tensor(LATENT_RGB_FACTORS, dtype=torch.float32)
    rgb = latents.float().movedim(0, -1) @ factors + torch.tensor(LATENT_RGB_BIAS)
    return ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8)


def difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pixel |a − b| over the channels, scaled so the largest difference is white: [h, w, 3] uint8."""
    d = (a.float() - b.float()).abs().mean(0)
    peak = float(d.max())
    d = d / peak if peak > 0 else d
    return d.mul(255).round().to(torch.uint8).unsqueeze(-1).expand(*d.shape, 3).contiguous()


def enlarge(image: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest-neighbour upscaling, so an 8x-downsampled latent is a visible picture."""
    return image.repeat_interleave(factor, 0).repeat_interleave(factor, 1)


def png(image: torch.Tensor) -> bytes:
    """[h, w, 3] uint8 as a PNG file's bytes (8-bit RGB, no filtering)."""
    h, w, _ = image.shape
    raw = b"".join(b"\x00" + image[y].numpy().tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def write_pictures(folder: Path, reference: torch.Tensor, output: torch.Tensor) -> list[str]:
    """reference.png, output.png and difference.png from unpacked [16, h, w] latents; returns the names."""
    factor = max(1, 256 // max(reference.shape[1:]))
    images = {"reference.png": preview(reference), "output.png": preview(output),
              "difference.png": difference(output, reference)}
    for name, image in images.items():
        (folder / name).write_bytes(png(enlarge(image, factor)))
    return list(images)


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[3, H, W] pixels in [0, 1] -> [H, W, 3] uint8."""
    return pixels.clamp(0, 1).mul(255).round().to(torch.uint8).movedim(0, -1).contiguous()


def write_pixel_pictures(folder: Path, reference: torch.Tensor, output: torch.Tensor) -> list[str]:
    """The decoded images and their difference map, from [3, H, W] pixels in [0, 1]; returns the names."""
    factor = max(1, 256 // max(reference.shape[1:]))  # small test images shown at a visible size
    images = {"reference-pixels.png": to_uint8(reference), "output-pixels.png": to_uint8(output),
              "pixel-difference.png": difference(output, reference)}
    for name, image in images.items():
        (folder / name).write_bytes(png(enlarge(image, factor)))
    return list(images)


def _figures(names: list[str]) -> str:
    return "".join(f'<figure><img src="{p}" alt="{p[:-4]}"><figcaption>{p[:-4]}</figcaption></figure>' for p in names)


def error_chart(layers: list[dict], width: int = 900, height: int = 220) -> str:
    """An inline SVG: one bar per layer (file order), height log-scaled relative RMSE; the worst in red."""
    if not layers:
        return ""
    values = [r["rel_rmse"] for r in layers]
    finite = [v for v in values if math.isfinite(v) and v > 0]
    if not finite:
        return "<p>Every layer is identical to the reference.</p>"
    lo, hi = math.log10(min(finite)), math.log10(max(finite))
    span = (hi - lo) or 1.0
    bar = width / len(values)
    worst = max(range(len(values)), key=lambda i: values[i] if math.isfinite(values[i]) else math.inf)
    parts = [f'<svg width="{width}" height="{height + 20}" role="img" aria-label="relative RMSE per layer">']
    for i, (row, v) in enumerate(zip(layers, values)):
        frac = 1.0 if not math.isfinite(v) else 0.0 if v <= 0 else 0.05 + 0.95 * (math.log10(v) - lo) / span
        h = frac * height
        colour = "#c0392b" if i == worst else "#2c7fb8"
        title = html.escape(f"{row['name']}: {v:.4g}")
        parts.append(f'<rect x="{i * bar:.2f}" y="{height - h:.2f}" width="{max(bar - 0.5, 0.5):.2f}" '
                     f'height="{h:.2f}" fill="{colour}"><title>{title}</title></rect>')
    parts.append(f'<text x="0" y="{height + 15}" font-size="11">log scale, {10 ** lo:.2g} to {10 ** hi:.2g}; '
                 f"hover a bar for its layer</text></svg>")
    return "".join(parts)


def page(report: dict, markdown_tables: str, pictures: list[str], pixel_pictures: list[str] = ()) -> str:
    """index.html: the pictures, the error chart and the report's tables."""
    title = html.escape(f"qconvert verify: {Path(report['output']).name}")
    figures = _figures(pictures)
    if pixel_pictures:
        pixels = _figures(pixel_pictures)
    else:
        pixels = f"<p>Not decoded: {html.escape(report.get('pixels_skipped') or 'no sampling run finished')}.</p>"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>"
            "body{font-family:sans-serif;margin:2em;max-width:1000px}figure{display:inline-block;margin:0 1em 1em 0}"
            "img{image-rendering:pixelated;border:1px solid #ccc}pre{background:#f6f6f6;padding:1em;overflow:auto}"
            f"</style></head><body><h1>{title}</h1>"
            + (f"<p><strong>Partial report</strong>: {html.escape(report['stopped'])}</p>" if not report["complete"]
               else "")
            + f"<h2>Images (decoded by the reference's VAE)</h2>{pixels}"
            f"<h2>Latents (ComfyUI's preview projection)</h2>{figures or '<p>No sampling run finished.</p>'}"
            f"<h2>Relative RMSE per layer</h2>{error_chart(report['per_layer'])}"
            f"<h2>Figures</h2><pre>{html.escape(markdown_tables)}</pre></body></html>\n")
