"""diffusers-native fp8r / nvfp4 files (``to-diffusers``) against diffusers itself: its reference quantizers
(``quantizers/bfl/utils.py``) for the bytes, ``from_single_file`` with ``BFLQuantizationConfig`` for loading."""

from __future__ import annotations

import json

import pytest
import torch

from qconvert.codecs import bfl
from qconvert.core import tiny
from qconvert.core.errors import CheckpointError
from qconvert.core.io import write_safetensors
from qconvert.formats.bfl import BFLFile
from qconvert.formats.opener import open_output
from tests.cli_helpers import assert_one_line_error, run
from tests.formats.weights import outlier_weight

diffusers = pytest.importorskip("diffusers", reason="diffusers (quantizers/bfl) is the oracle")
pytest.importorskip("accelerate", reason="diffusers' BFL loader needs accelerate")
from diffusers.quantizers.bfl import utils as bfl_ref  # noqa: E402

pytestmark = pytest.mark.oracle


def _zero_rows() -> torch.Tensor:
    w = outlier_weight()
    w[5] = 0
    w[7, :16] = -0.0  # diffusers stores the sign of -0.0 as +
    return w


WEIGHTS = {
    "outliers": outlier_weight,
    "zero-rows": _zero_rows,
    "trained-bf16": lambda: tiny.trained_like("transformer_blocks.0.img_mlp.net.2.weight", (192, 768), 0)
    .to(torch.bfloat16),
    "modulation-bf16": lambda: tiny.trained_like("transformer_blocks.1.img_mod.1.weight", (1536, 256), 0)
    .to(torch.bfloat16),
}


@pytest.mark.parametrize("case", sorted(WEIGHTS))
def test_bytes_equal_diffusers_reference_quantizers(case):
    w = WEIGHTS[case]()
    q, scale = bfl_ref.quantize_fp8r(w)
    ours = bfl.encode_fp8r(w)
    assert torch.equal(ours["weight"].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(ours["weight_scale"], scale)
    assert torch.equal(bfl.decode_fp8r(ours), bfl_ref.dequantize_fp8r(q, scale))

    q, scale, scale_2 = bfl_ref.quantize_nvfp4(w)
    ours = bfl.encode_nvfp4(w, 1.0)
    assert torch.equal(ours["weight"], q)
    assert torch.equal(ours["weight_scale"].view(torch.uint8), scale.view(torch.uint8))
    assert torch.equal(ours["weight_scale_2"], scale_2)
    assert torch.equal(bfl.decode_nvfp4(ours), bfl_ref.dequantize_nvfp4(q, scale, scale_2))


def test_all_zero_weight_gives_zeros_where_diffusers_would_store_nan():
    ours = bfl.encode_nvfp4(torch.zeros(16, 64), 1.0)
    assert not bool(ours["weight"].any()) and float(ours["weight_scale_2"]) == 0
    assert torch.equal(bfl.decode_nvfp4(ours), torch.zeros(16, 64))


def test_nvfp4_inputs_saturate_beyond_the_static_scale():
    x = torch.tensor([[1.0] * 16 + [4000.0] * 16])  # two blocks of 16
    got = bfl.nvfp4_inputs(x, torch.tensor(1.0))
    assert float(got[0, -1]) == 2688.0  # 6 x 448 x input_scale
    assert torch.allclose(got[0, :16], x[0, :16], rtol=0.05)
    assert torch.allclose(bfl.nvfp4_inputs(x, torch.tensor(4000 / 2688)), x, rtol=0.2)


# ------------------------------------------------------------------ files, loaded by diffusers

@pytest.fixture(scope="module")
def files(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("bfl")
    written = {}
    for fmt in bfl.FORMATS:
        code, stdout, err = run_cli(["to-diffusers", tiny_model, "--format", fmt, "-o", out, "--json", "-q"])
        assert code == 0, err
        written[fmt] = json.loads(stdout)
    return written


def run_cli(args):
    """``qconvert ARGS`` in this process without capsys (module fixtures): (exit code, stdout, stderr)."""
    import contextlib
    import io

    from qconvert.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    return exc.value.code, stdout.getvalue(), stderr.getvalue()


def _inputs(config):
    g = torch.Generator().manual_seed(0)
    h = w = 8
    return dict(hidden_states=torch.randn(1, h * w, config.in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, 12, config.joint_attention_dim, generator=g),
                encoder_hidden_states_mask=torch.ones(1, 12, dtype=torch.long),
                timestep=torch.tensor([0.7]), img_shapes=[(1, h, w)], return_dict=False)


@pytest.mark.parametrize("fmt", bfl.FORMATS)
def test_diffusers_loads_the_file_natively_and_computes_what_qconvert_decodes(files, tiny_model, fmt):
    """from_single_file builds diffusers' quantized linears from the file, and its forward equals the model
    loaded with qconvert's decoded weights (the weight source verify measures)."""
    cls = diffusers.QwenImageTransformer2DModel
    report = files[fmt]
    native = cls.from_single_file(report["output"], config=str(tiny_model), subfolder="transformer",
                                  torch_dtype=torch.float32,
                                  quantization_config=diffusers.BFLQuantizationConfig(compute_dtype=torch.float32))
    linears = {name for name, m in native.named_modules() if type(m).__name__.startswith("BFL")}
    assert len(linears) == report["layers"] == 41
    assert "transformer_blocks.0.img_mod.1" not in linears and "transformer_blocks.2.attn.to_q" in linears

    source, kind = open_output(report["output"])
    assert kind == f"diffusers-{fmt}" and source.runtime == "bfl"
    decoded = cls.from_pretrained(tiny_model, subfolder="transformer", torch_dtype=torch.float32)
    decoded.load_state_dict({n: source.load(n) for n in source.names()}, strict=True)
    reference = cls.from_pretrained(tiny_model, subfolder="transformer", torch_dtype=torch.float32)
    inputs = _inputs(reference.config)
    with torch.no_grad():
        got, ours, ref = native(**inputs)[0], decoded(**inputs)[0], reference(**inputs)[0]
    assert torch.allclose(got, ours, atol=1e-5, rtol=1e-5)
    assert float((got - ref).norm() / ref.norm()) < (0.08 if fmt == "fp8r" else 0.3)


@pytest.mark.parametrize("fmt", bfl.FORMATS)
def test_memory_after_loading_is_the_files_tensor_bytes(files, tiny_model, fmt):
    cls = diffusers.QwenImageTransformer2DModel
    report = files[fmt]
    model = cls.from_single_file(report["output"], config=str(tiny_model), subfolder="transformer",
                                 torch_dtype=torch.bfloat16, quantization_config=diffusers.BFLQuantizationConfig())
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert held == report["loaded_bytes"]
    assert held < (0.6 if fmt == "fp8r" else 0.4) * report["bf16_bytes"]


def test_dry_run_plans_the_exact_size(files, tiny_model, tmp_path):
    for fmt, written in files.items():
        code, stdout, _ = run_cli(["to-diffusers", tiny_model, "--format", fmt, "-o", tmp_path, "--dry-run", "--json"])
        plan = json.loads(stdout)
        assert code == 0 and not plan["written"] and plan["bytes"] == written["bytes"]
        assert not list(tmp_path.iterdir())


def test_calibrated_input_scales(tiny_model, tmp_path):
    """--calib: each layer's input_scale is margin x its calibrated amax / 2688."""
    from qconvert.core.checkpoint import open_checkpoint
    from qconvert.formats.calibration import Stat, write_calibration

    source = open_checkpoint(tiny_model)
    stats = {}
    for name, meta in source.tensors.items():
        if name.startswith("transformer_blocks.") and name.endswith(".weight") and len(meta.shape) == 2:
            width = meta.shape[1]
            stats[name[: -len(".weight")]] = Stat(torch.ones(width, dtype=torch.float64), torch.full((width,), 10.0),
                                                  torch.zeros(4, width), 4)
    write_calibration(tmp_path / "stats.safetensors", stats, {})
    out = tmp_path / "cal.safetensors"
    code, _, err = run_cli(["to-diffusers", tiny_model, "--format", "nvfp4", "--calib", tmp_path / "stats.safetensors",
                            "--margin", "2", "-o", out, "-q"])
    assert code == 0, err
    _, tensors = BFLFile(out).layer_tensors("transformer_blocks.1.attn.to_q")
    assert float(tensors["input_scale"]) == pytest.approx(2 * 10 / 2688)


# ------------------------------------------------------------------ bad input

def test_a_format_diffusers_cannot_load_is_one_error(tiny_model, tmp_path, capsys):
    code, _, err = run(["to-diffusers", tiny_model, "--format", "int8", "-o", tmp_path], capsys)
    assert_one_line_error(code, err, "int8", "fp8r and nvfp4", "to-comfy")
    assert not list(tmp_path.iterdir())


def test_calibration_of_another_model_is_one_error(tiny_model, tmp_path, capsys):
    from qconvert.formats.calibration import Stat, write_calibration

    stats = {"transformer_blocks.0.attn.to_q": Stat(torch.ones(64, dtype=torch.float64), torch.ones(64),
                                                      torch.zeros(2, 64), 2)}
    write_calibration(tmp_path / "other.safetensors", stats, {})
    out = tmp_path / "out"
    code, _, err = run(["to-diffusers", tiny_model, "--format", "nvfp4", "--calib", tmp_path / "other.safetensors",
                        "-o", out], capsys)
    assert_one_line_error(code, err, "other.safetensors")
    assert not out.exists()


def test_calib_with_fp8r_is_a_usage_error(tiny_model, tmp_path, capsys):
    code, _, err = run(["to-diffusers", tiny_model, "--format", "fp8r", "--calib", tmp_path / "x.safetensors"], capsys)
    assert code == 2 and "--calib is for --format nvfp4" in err


# ------------------------------------------------------------------ hostile files

def _tampered(files, tmp_path, fmt, change):
    from safetensors.torch import load_file

    tensors = load_file(files[fmt]["output"])
    change(tensors)
    path = tmp_path / f"bad-{fmt}.safetensors"
    write_safetensors(path, tensors)
    return path


@pytest.mark.parametrize("fmt, change, message", [
    ("fp8r", lambda t: t.update({"transformer_blocks.1.attn.to_q.weight_scale": torch.ones(3)}), "weight_scale is"),
    ("nvfp4", lambda t: t.pop("transformer_blocks.1.attn.to_q.input_scale"), "input_scale is nothing"),
    ("nvfp4", lambda t: t.update({"transformer_blocks.1.attn.to_q.weight_scale_2": torch.ones(2)}), "weight_scale_2"),
    ("fp8r", lambda t: t.update({"transformer_blocks.1.attn.to_q.weight": torch.zeros(256, 256)}), "F8_E4M3"),
])
def test_inconsistent_layers_are_refused_when_opened(files, tmp_path, fmt, change, message):
    with pytest.raises(CheckpointError, match=message):
        BFLFile(_tampered(files, tmp_path, fmt, change))


def test_nan_scales_are_refused_when_read(files, tmp_path):
    def nan(t):
        t["transformer_blocks.1.attn.to_q.weight_scale"] = torch.full_like(
            t["transformer_blocks.1.attn.to_q.weight_scale"], float("nan"))
    f = BFLFile(_tampered(files, tmp_path, "fp8r", nan))
    with pytest.raises(CheckpointError, match="negative or non-finite"):
        f.load("transformer_blocks.1.attn.to_q.weight")
