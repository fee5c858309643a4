"""The converters by name, each with what it says of itself in one paragraph: what ``qconvert --help`` lists
without importing them (their options come from modules that import torch, which takes seconds)."""

from __future__ import annotations

ABOUT = {
    "to-gguf": "GGUF for ComfyUI-GGUF and diffusers, at one llama.cpp level or all of them.",
    "to-fp8": "FP8 safetensors for ComfyUI (and diffusers, through qconvert's dequantizing loader).",
    "to-comfy": "ComfyUI per-layer quantized safetensors: NVFP4, MXFP8, INT8 with ConvRot (and FP8), byte for byte "
                "what comfy-kitchen's quantizers make, streamed tensor by tensor.",
    "to-diffusers": "Single files diffusers loads natively quantized (fp8r, nvfp4) with BFLQuantizationConfig.",
    "to-svdquant": "SVDQuant 4-bit files (Nunchaku INT4/NVFP4), calibrated, one block in memory at a time.",
    "bake-lora": "Merge LoRAs into the weights: a checkpoint in the source's dtype and layout.",
    "calibrate": "Activation statistics of every linear layer: importance matrix, absmax, sampled input rows.",
}


def help_text(name: str, details: str) -> str:
    """A converter's help: its paragraph here, then the module's details (examples after ``\\b``)."""
    return ABOUT[name] + "\n\n" + details
