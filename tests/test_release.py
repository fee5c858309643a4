"""Releases: recipes and their errors, recipe run (manifest, resume, a killed run, Ray), publish and its card."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qconvert.core import tiny
from qconvert.releases import manifest, recipes
from tests.cli_helpers import assert_one_line_error, run

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "recipes").glob("*.toml"))


def write_recipe(path: Path, source, outputs: str, *, verify: str = 'height = 32\nwidth = 32\nsteps = 1\n'
                 'decode = false\n', extra: str = "") -> Path:
    path.write_text(f'[recipe]\nname = "tiny-release"\nsource = "{source}"\ndescription = "A tiny release."\n\n'
                    f'[card]\nbase_model = "Qwen/Qwen-Image"\n{extra}\n[verify]\n{verify}\n{outputs}')
    return path


OUTPUTS = '''
[[output]]
converter = "to-gguf"
levels = ["Q8_0", "Q4_K_M"]
file = "tiny-{level}.gguf"

[[output]]
name = "fp8"
converter = "to-fp8"
file = "tiny-fp8.safetensors"

[[output]]
name = "int8"
converter = "to-comfy"
format = "int8"
file = "tiny-int8.safetensors"
'''


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny.make_tiny(tmp_path_factory.mktemp("release") / "m", layers=2)


# ------------------------------------------------------------------ recipes

BAD = [
    ('converter = "to-png"', "converter 'to-png'", 14),
    ('converter = ["to-fp8"]', "converter ['to-fp8']", 14),  # found by the recipe fuzzer
    ('converter = "to-gguf"\nlevel = "Q9_K"', "unknown GGUF level 'Q9_K'", 15),
    ('converter = "to-fp8"\nname = "a"\nwidth = 3', "to-fp8 has no option 'width'", 16),
    ('converter = "to-fp8"\nname = "a"\nactivations = "fast"', "activations", 16),
    ('converter = "to-comfy"\nname = "a"\nformat = "nvfp4"\nverify = { steps = "four" }', "verify steps", 17),
    ('converter = "to-fp8"\nname = "a"\nfile = "../x.safetensors"', "a plain file name", 16),
    ('converter = "to-fp8"\nname = "a"\nfile = "x.gguf"', "a to-fp8 output ends in .safetensors", 16),
    ('converter = "to-gguf"\nlevels = ["Q8_0"]\nfile = "x.gguf"', "file must contain {level}", 16),
    ('converter = "to-svdquant"\nname = "a"\nlayout = "diffusers"', "not available in recipes", 16),
]


@pytest.mark.parametrize("body, message, line", BAD)
def test_bad_recipes_are_one_error_naming_file_line_and_key(tmp_path, capsys, body, message, line):
    text = f'[recipe]\nname = "r"\nsource = "x"\n\n[verify]\nsteps = 1\n\n[[output]]\nconverter = "to-fp8"\n' \
           f'name = "ok"\nfile = "ok.safetensors"\n\n[[output]]\n{body}\n'
    if "file =" not in body:
        text += 'file = "out.safetensors"\n'
    path = tmp_path / "r.toml"
    path.write_text(text)
    code, _, err = run(["recipe", "run", path, "--out", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, f"{path}:{line}:", message)
    assert not (tmp_path / "out").exists()


def test_recipe_structure_errors(tmp_path, capsys):
    cases = {
        "[recipe]\nname = 'r'\nsource = 'x'\n": "no outputs",
        "[recipe]\nname = 'r'\nsource = 'x'\n[colour]\nx = 1\n[[output]]\n": ":4: unknown table [colour]",
        "[recipe]\nname = 'r'\nsource = 'x'\n[verify]\nheight = 32\nsteep = 3\n": ":6: [verify] has no key 'steep'",
        "[recipe]\nname = 'r'\nsource = 'x'\n[[output\n": "not valid TOML",
        "[recipe]\nname = 'r'\nsource = 'x'\n[hub]\nrepo = 'no-slash'\n": ":5: [hub] repo must be OWNER/NAME",
        ("[recipe]\nname = 'r'\nsource = 'x'\n[[output]]\nconverter = 'to-fp8'\nname = 'a'\nfile = 'a.safetensors'\n"
         "[[output]]\nconverter = 'to-fp8'\nname = 'a'\nfile = 'b.safetensors'\n"):
            ":10: output name 'a' is used twice (also on line 6)",
        # tomllib recurses per level: a hostile depth was an internal RecursionError
        "[recipe]\nname = 'r'\nsource = 'x'\nz = " + "[" * 5000 + "]" * 5000 + "\n": "nested too deeply",
    }
    for i, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"r{i}.toml"
        path.write_text(text)
        code, _, err = run(["recipe", "run", path, "--dry-run"], capsys)
        assert_one_line_error(code, err, str(path), message)


@pytest.mark.parametrize("recipe", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_recipe_plans_on_the_full_size_layout(recipe, full_size_sparse, tmp_path, capsys):
    """Each shipped recipe parses and dry-runs against the real 60-block headers: exact sizes, nothing written."""
    r = recipes.load(recipe)
    assert r.outputs and r.card.get("base_model")
    code, out, err = run(["recipe", "run", recipe, "--source", full_size_sparse, "--out", tmp_path / "rel",
                          "--dry-run", "--json"], capsys)
    assert code == 0, err
    plan = json.loads(out)
    assert [p["name"] for p in plan["planned"]] == [o.name for o in r.outputs]
    for p, o in zip(plan["planned"], r.outputs):
        # a mix is chosen when built; a smoothed NVFP4 file, like calibrated FP8, plans with its statistics
        later = dict(o.options).get("format") == "mix" or (o.converter == "to-comfy" and o.calibrated)
        assert (p["bytes"] is None) == later and (later or p["bytes"] > 1e9)
    assert not (tmp_path / "rel").exists()
    if recipe.stem == "qwen-image-gguf":  # city96's names and sizes (spec gguf.md §8: Q2_K is published)
        assert len(r.outputs) == 14 and r.outputs[-1].file == "qwen-image-Q2_K.gguf"


# ---------------------------------------------------------------- recipe run

def test_run_writes_verified_outputs_and_a_manifest_then_resumes(model, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.toml", model, OUTPUTS)
    out = tmp_path / "rel"
    code, stdout, err = run(["recipe", "run", recipe, "--out", out, "--json"], capsys)
    assert code == 0, err
    result = json.loads(stdout)
    assert result["built"] == ["Q8_0", "Q4_K_M", "fp8", "int8"] and result["kept"] == []
    m = json.loads((out / "manifest.json").read_text())
    assert m["digest"] == manifest.digest(m) and m["order"] == ["Q8_0", "Q4_K_M", "fp8", "int8"]
    assert m["source"]["fingerprint"].startswith("sha256-sampled:")
    for name, entry in m["outputs"].items():
        path = out / entry["file"]
        assert entry["bytes"] == path.stat().st_size and entry["sha256"] == manifest.file_sha256(path)
        assert entry["qconvert_version"] == m["qconvert_version"]
        assert entry["source"]["fingerprint"] == m["source"]["fingerprint"]
        assert entry["verify"]["latents"]["psnr_db"] > 20 and (out / entry["report"] / "report.json").is_file()
        assert entry["verify"]["settings"]["height"] == 32
    assert m["outputs"]["Q4_K_M"]["format"] == "gguf" and m["outputs"]["Q4_K_M"]["options"]["level"] == "Q4_K_M"
    assert m["outputs"]["int8"]["format"] == "comfy-int8" and m["outputs"]["fp8"]["format"] == "fp8-comfy"
    # the files are exactly what the converters make on their own
    code, _, err = run(["to-gguf", model, "--level", "Q4_K_M", "-o", tmp_path / "alone.gguf", "-q"], capsys)
    assert code == 0 and (tmp_path / "alone.gguf").read_bytes() == (out / "tiny-Q4_K_M.gguf").read_bytes()
    assert not list(out.glob(".staging-*")) and not list(out.glob(".*.partial"))

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    code, stdout, err = run(["recipe", "run", recipe, "--out", out, "--json"], capsys)
    assert code == 0 and json.loads(stdout)["built"] == [] and len(json.loads(stdout)["kept"]) == 4, err
    assert all(p.stat().st_mtime_ns == mtimes[p.name] for p in out.iterdir() if p.name != "manifest.json"
               and p.is_file())

    # a file changed on disk (same size): found by sha256, rebuilt alone, and said
    data = bytearray((out / "tiny-fp8.safetensors").read_bytes())
    data[-1] ^= 1
    (out / "tiny-fp8.safetensors").write_bytes(bytes(data))
    code, stdout, err = run(["recipe", "run", recipe, "--out", out], capsys)
    assert code == 0, err
    assert "build  fp8" in stdout and "sha256 differs" in stdout and stdout.count("  build  ") == 1
    assert manifest.file_sha256(out / "tiny-fp8.safetensors") == m["outputs"]["fp8"]["sha256"]

    # a hand-edited manifest is noticed; an entry that no longer matches its file is redone
    edited = json.loads((out / "manifest.json").read_text())
    edited["outputs"]["int8"]["bytes"] += 1
    (out / "manifest.json").write_text(json.dumps(edited))
    code, stdout, err = run(["recipe", "run", recipe, "--out", out], capsys)
    assert code == 0 and "edited by hand" in err and "build  int8" in stdout, err
    assert stdout.count("  build  ") == 1

    # a changed recipe entry rebuilds that output only; --only narrows a run and keeps the others' entries
    recipe.write_text(recipe.read_text().replace('format = "int8"', 'format = "int8-row"'))
    code, stdout, err = run(["recipe", "run", recipe, "--out", out, "--only", "fp8", "--json"], capsys)
    assert code == 0 and json.loads(stdout)["built"] == [] and json.loads(stdout)["kept"] == ["fp8"], err
    assert set(json.loads((out / "manifest.json").read_text())["outputs"]) == {"Q8_0", "Q4_K_M", "fp8", "int8"}
    code, stdout, err = run(["recipe", "run", recipe, "--out", out, "--json"], capsys)
    assert code == 0 and json.loads(stdout)["built"] == ["int8"], err

    # new verify settings: every output verified again, none rebuilt
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    recipe.write_text(recipe.read_text().replace("height = 32", "height = 48"))
    code, stdout, err = run(["recipe", "run", recipe, "--out", out], capsys)
    assert code == 0 and stdout.count("verified again, not rebuilt") == 4, stdout + err
    m = json.loads((out / "manifest.json").read_text())
    assert all(e["verify"]["settings"]["height"] == 48 for e in m["outputs"].values())
    assert all(p.stat().st_mtime_ns == mtimes[p.name] for p in out.iterdir() if p.name != "manifest.json"
               and p.is_file())


def test_a_killed_run_redoes_only_the_output_in_progress(model, tmp_path):
    """SIGKILL while the second output is being built: the rerun keeps the first and builds the second."""
    outputs = '''
[[output]]
name = "fp8"
converter = "to-fp8"
file = "tiny-fp8.safetensors"

[[output]]
name = "svdq"
converter = "to-svdquant"
precision = "int4"
rank = 16
file = "tiny-svdq.safetensors"
'''
    model = tiny.make_tiny(tmp_path / "m", layers=2, heads=1, head_dim=128, text_dim=64)
    recipe = write_recipe(tmp_path / "r.toml", model, outputs)
    out = tmp_path / "rel"
    cmd = [sys.executable, "-m", "qconvert", "recipe", "run", str(recipe), "--out", str(out), "-q"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / ".staging-svdq").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["outputs"]) == {"fp8"} and not (out / "tiny-svdq.safetensors").exists()
    result = subprocess.run(cmd[:-1] + ["--json"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["kept"] == ["fp8"] and summary["built"] == ["svdq"]
    assert not list(out.glob(".staging-*"))


def test_bad_run_options(model, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.toml", model, OUTPUTS)
    code, _, err = run(["recipe", "run", recipe, "--only", "Q2_K"], capsys)
    assert_one_line_error(code, err, "--only Q2_K: no such output")
    code, _, err = run(["recipe", "run", recipe, "--address", "localhost:1"], capsys)
    assert code == 2 and "--address is for --executor ray" in err
    pytest.importorskip("ray")
    start = time.monotonic()
    code, _, err = run(["recipe", "run", recipe, "--out", tmp_path / "x", "--executor", "ray", "--address",
                        "127.0.0.1:9"], capsys)
    assert_one_line_error(code, err, "Ray at 127.0.0.1:9 does not answer")
    assert time.monotonic() - start < 60


@pytest.mark.ray
def test_ray_executor_matches_the_local_one_byte_for_byte(model, tmp_path, capsys, monkeypatch):
    """Same files, same manifest; a relative source works although Ray's workers run in another folder."""
    pytest.importorskip("ray", reason="Ray is the ray extra (pip install .[ray])")
    monkeypatch.chdir(Path(model).parent)
    calibrated = CALIBRATED.split("[[output]]")[:2]  # the [calibrate] table and one output reading it
    recipe = write_recipe(tmp_path / "r.toml", Path(model).name, OUTPUTS + "[[output]]".join(calibrated))
    code, _, err = run(["recipe", "run", recipe, "--out", tmp_path / "local", "-q"], capsys)
    assert code == 0, err
    code, _, err = run(["recipe", "run", recipe, "--out", tmp_path / "ray", "--executor", "ray", "-q"], capsys)
    assert code == 0, err
    local = json.loads((tmp_path / "local" / "manifest.json").read_text())
    remote = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert local == remote and len(local["calibrations"]) == 1 and "Q3_K_S-imatrix" in local["outputs"]
    assert Path(local["source"]["id"]).is_absolute()  # tasks on other machines run in other folders
    for entry in local["outputs"].values():
        assert (tmp_path / "local" / entry["file"]).read_bytes() == (tmp_path / "ray" / entry["file"]).read_bytes()


# ------------------------------------------------------------------- publish

@pytest.fixture(scope="module")
def release(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("published")
    recipe = write_recipe(folder / "r.toml", model, OUTPUTS, extra='[hub]\nrepo = "someone/tiny-release"\n')
    from qconvert.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["recipe", "run", str(recipe), "--out", str(folder / "rel"), "-q"])
    assert exc.value.code == 0
    return folder / "rel"


def test_card_metadata_and_body(release, capsys):
    from huggingface_hub import ModelCard

    code, out, err = run(["publish", release, "--dry-run", "--json"], capsys)
    assert code == 0, err
    plan = json.loads(out)
    assert plan["repo"] == "someone/tiny-release" and not plan["create_pr"]
    card = ModelCard(plan["card"])  # the Hub's own parser reads the YAML
    data = card.data.to_dict()
    assert data["base_model"] == "Qwen/Qwen-Image" and data["base_model_relation"] == "quantized"
    assert data["pipeline_tag"] == "text-to-image" and data["license"] == "apache-2.0"
    assert {"gguf", "comfyui", "diffusion-single-file", "fp8"} <= set(data["tags"])
    assert "library_name" not in data  # not all GGUF: the diffusion-single-file tag says it
    body = plan["card"]
    for entry in json.loads((release / "manifest.json").read_text())["outputs"].values():
        assert f"`{entry['file']}`" in body and f"{entry['report']}/reference.png" in body
    assert "Unet Loader (GGUF)" in body and "Load Diffusion Model" in body and "from_single_file" in body
    paths = [op["path"] for op in plan["operations"]]
    assert paths[:2] == ["README.md", "manifest.json"] and "tiny-Q8_0.gguf" in paths
    assert "reports/fp8/report.json" in paths
    assert not (release / "README.md").exists()  # a dry run writes nothing


def test_cards_of_diffusers_native_files_say_how_diffusers_loads_them():
    """A to-diffusers output is named as such in a release, and its card shows the BFL loader, not ComfyUI's."""
    from qconvert.releases import hub
    from qconvert.releases.recipes import Output
    from qconvert.releases.release import format_name

    assert format_name(Output("n", "to-diffusers", "f.safetensors", (("format", "nvfp4"),))) == "diffusers-nvfp4"
    m = {"card": {"base_model": "Qwen/Qwen-Image-2512"}, "source": {"id": "x"}, "qconvert_version": "0",
         "recipe": {"name": "r", "file": "r.toml"},
         "outputs": {"fp8r": {"file": "q-diffusers-fp8r.safetensors", "format": "diffusers-fp8r", "bytes": 1,
                              "options": {"format": "fp8r"}, "loras": []}}}
    body = hub.render_card(m, "someone/q")
    assert "BFLQuantizationConfig" in body and "q-diffusers-fp8r.safetensors" in body and "diffusers 0.42" in body
    assert "## ComfyUI" not in body and "RTX 40" in body
    assert "diffusers" in hub.card_metadata(m)["tags"]


def test_edit_cards_say_image_to_image(full_size_sparse, tmp_path):
    from qconvert.releases import hub

    m = {"card": {"base_model": "Qwen/Qwen-Image-Edit-2509"}, "source": {"id": "x"}, "qconvert_version": "0",
         "recipe": {"name": "r", "file": "r.toml"},
         "outputs": {"Q4_0": {"file": "e-Q4_0.gguf", "format": "gguf", "bytes": 1, "options": {"level": "Q4_0"},
                              "loras": []}}}
    meta = hub.card_metadata(m)
    assert meta["pipeline_tag"] == "image-to-image" and meta["library_name"] == "gguf"
    m["outputs"]["Q4_0"]["loras"] = [{"spec": "hf://lightx2v/Qwen-Image-Lightning/L-4steps.safetensors",
                                      "sha256": "0" * 64}]
    meta = hub.card_metadata(m)
    assert meta["base_model"] == ["Qwen/Qwen-Image-Edit-2509", "lightx2v/Qwen-Image-Lightning"]
    assert "lightning" in meta["tags"]


def test_publish_needs_a_token_and_never_shows_it(release, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    code, _, err = run(["publish", release], capsys)
    assert_one_line_error(code, err, "no Hugging Face token")
    assert not (release / "README.md").exists()

    secret = "hf_SECRETtoken1234567890"
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: secret)
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw))
            return type("Info", (), {"commit_url": "https://huggingface.co/someone/x/commit/abc"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    code, out, err = run(["publish", release, "--private", "--create-pr"], capsys)
    assert code == 0, err
    assert secret not in out + err
    assert calls[0] == ("init", secret)
    assert calls[1] == ("create_repo", "someone/tiny-release", {"private": True, "exist_ok": True,
                                                                "repo_type": "model"})
    upload = calls[2][1]
    assert upload["repo_id"] == "someone/tiny-release" and upload["create_pr"] is True
    assert upload["folder_path"] == str(release) and "README.md" in upload["allow_patterns"]
    assert "tiny-Q4_K_M.gguf" in upload["allow_patterns"] and "r.toml" not in upload["allow_patterns"]
    assert (release / "README.md").read_text().startswith("---\nbase_model:")
    assert secret not in (release / "README.md").read_text() + (release / "manifest.json").read_text()

    def failing(self, **kw):
        raise RuntimeError(f"401 Unauthorized for token {secret}")

    monkeypatch.setattr(FakeApi, "upload_folder", failing)
    code, out, err = run(["publish", release, "--repo", "someone/other", "-q"], capsys)
    assert_one_line_error(code, err, "upload to someone/other failed")
    assert secret not in out + err


def test_publish_refuses_a_release_whose_files_changed(release, tmp_path, monkeypatch, capsys):
    import shutil

    import huggingface_hub

    copy = tmp_path / "rel"
    shutil.copytree(release, copy)
    (copy / "tiny-Q8_0.gguf").write_bytes(b"not the file")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_x")
    code, _, err = run(["publish", copy, "--repo", "a/b", "-q"], capsys)
    assert_one_line_error(code, err, "output Q8_0", "changed on disk")
    code, _, err = run(["publish", tmp_path, "--repo", "a/b"], capsys)
    assert_one_line_error(code, err, "no manifest")
    (copy / "reports" / "fp8" / "output.png").unlink()
    (copy / "reports" / "fp8" / "output.png").symlink_to("/etc/hostname")
    code, _, err = run(["publish", copy, "--repo", "a/b", "--dry-run"], capsys)
    assert_one_line_error(code, err, "reports/fp8/output.png is a symbolic link")


def test_huggingface_hub_uploads_exactly_the_release(release, tmp_path, monkeypatch, capsys):
    """huggingface_hub's own upload_folder (its pattern matching, its operations) up to the network: the
    commit it would send holds the card, the manifest, every output and the reports, nothing else."""
    import shutil

    import huggingface_hub
    import huggingface_hub._upload_pipeline as pipeline

    copy = tmp_path / "rel"
    shutil.copytree(release, copy)
    (copy / "notes.txt").write_text("not part of the release")
    secret = "hf_SECRETtoken0987654321"
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: secret)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, *a, **k: None)
    sent = {}
    # the Hub checks a README's YAML on its server before the upload: the card is what it would be sent
    monkeypatch.setattr(huggingface_hub.HfApi, "_validate_yaml",
                        lambda self, content, **kw: sent.setdefault("card", content))

    def pipelined_upload(api, **kw):
        sent.update(kw, api_token=api.token)
        return "https://huggingface.co/someone/tiny-release/commit/0"

    monkeypatch.setattr(pipeline, "pipelined_upload", pipelined_upload)
    code, out, err = run(["publish", copy], capsys)
    assert code == 0, err
    assert secret not in out + err and secret in (sent["token"], sent["api_token"])
    assert sent["repo_id"] == "someone/tiny-release"
    paths = sorted(op.path_in_repo for op in sent["add_operations"])
    m = json.loads((copy / "manifest.json").read_text())
    reports = sorted(f"{e['report']}/{p.name}" for e in m["outputs"].values() for p in (copy / e["report"]).iterdir())
    assert paths == sorted(["README.md", "manifest.json", *(e["file"] for e in m["outputs"].values()), *reports])
    assert not sent["delete_operations"]
    assert sent["card"] == (copy / "README.md").read_text() and sent["card"].startswith("---\nbase_model:")


def test_a_changed_lora_file_rebuilds_its_outputs(model, tmp_path, capsys):
    lora = tiny.make_tiny_lora(tmp_path / "style.safetensors", model)
    outputs = f'''
[[output]]
name = "fp8-style"
converter = "to-fp8"
lora = ["{lora}:0.5"]
file = "tiny-fp8-style.safetensors"
'''
    recipe = write_recipe(tmp_path / "r.toml", model, outputs)
    out = tmp_path / "rel"
    code, _, err = run(["recipe", "run", recipe, "--out", out, "-q"], capsys)
    assert code == 0, err
    entry = json.loads((out / "manifest.json").read_text())["outputs"]["fp8-style"]
    assert entry["loras"] == [{"spec": f"{lora}:0.5", "sha256": manifest.file_sha256(lora)}]
    code, _, err = run(["to-fp8", model, "--lora", f"{lora}:0.5", "-o", tmp_path / "alone.safetensors", "-q"],
                       capsys)
    assert code == 0 and (tmp_path / "alone.safetensors").read_bytes() == (out / entry["file"]).read_bytes()
    tiny.make_tiny_lora(lora, model, seed=1)
    code, stdout, err = run(["recipe", "run", recipe, "--out", out], capsys)
    assert code == 0 and "build  fp8-style" in stdout and "a LoRA file" in stdout, stdout + err


CALIBRATED = '''
[calibrate]
synthetic = 1
height = 64
width = 64
steps = 2

[[output]]
name = "Q3_K_S-imatrix"
converter = "to-gguf"
level = "Q3_K_S"
imatrix = "recipe"
file = "tiny-Q3_K_S-imatrix.gguf"

[[output]]
name = "fp8-calibrated"
converter = "to-fp8"
activations = "calibrated"
calib = "recipe"
file = "tiny-fp8-calibrated.safetensors"

[[output]]
name = "fp8"
converter = "to-fp8"
file = "tiny-fp8.safetensors"
'''


def test_a_recipe_calibration_is_made_once_and_read_by_its_outputs(model, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.toml", model, CALIBRATED)
    out = tmp_path / "rel"
    code, stdout, err = run(["recipe", "run", recipe, "--out", out, "--dry-run"], capsys)
    assert code == 0 and "calibrate calibration/calib-" in stdout and "about " in stdout, err
    code, _, err = run(["recipe", "run", recipe, "--out", out, "-q"], capsys)
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    [(file, calibration)] = m["calibrations"].items()
    assert calibration["sha256"] == manifest.file_sha256(out / file) and calibration["options"]["synthetic"] == 1
    # exactly what the commands make by hand from that calibration
    code, _, err = run(["calibrate", model, "--synthetic", 1, "--height", 64, "--width", 64, "--steps", 2,
                        "-o", tmp_path / "calib.safetensors", "-q"], capsys)
    assert code == 0 and (tmp_path / "calib.safetensors").read_bytes() == (out / file).read_bytes(), err
    code, _, err = run(["to-gguf", model, "--level", "Q3_K_S", "--imatrix", out / file, "-o",
                        tmp_path / "alone.gguf", "-q"], capsys)
    assert code == 0 and (tmp_path / "alone.gguf").read_bytes() == (out / "tiny-Q3_K_S-imatrix.gguf").read_bytes()
    assert m["outputs"]["fp8-calibrated"]["bytes"] == (out / "tiny-fp8-calibrated.safetensors").stat().st_size

    # new calibration settings: the calibration and what reads it are made again, the rest kept
    recipe.write_text(recipe.read_text().replace("height = 64\n", "height = 48\n", 1))
    code, stdout, err = run(["recipe", "run", recipe, "--out", out, "--json"], capsys)
    assert code == 0, err
    result = json.loads(stdout)
    assert result["built"] == ["Q3_K_S-imatrix", "fp8-calibrated"] and result["kept"] == ["fp8"]
    m2 = json.loads((out / "manifest.json").read_text())
    assert list(m2["calibrations"]) != [file] and len(m2["calibrations"]) == 1
    assert not list(out.glob(".staging-*"))
    # a calibration the calibrate command refuses is found when planning, before anything is built
    recipe.write_text(recipe.read_text().replace("steps = 2\n", "steps = 1\n", 1))
    code, _, err = run(["recipe", "run", recipe, "--out", out], capsys)
    assert_one_line_error(code, err, "calibration calibration/calib-", "at least 2 steps")


def test_calibration_errors(model, tmp_path, capsys):
    cases = {
        CALIBRATED.replace("[calibrate]\nsynthetic = 1", "[calibrate]\nsynthetik = 1"): "calibrate has no option 'synthetik'",
        CALIBRATED.replace("synthetic = 1\n", ""): "[calibrate] needs synthetic = N or embeds",
        CALIBRATED.split("[[output]]", 1)[0].replace("[calibrate]\nsynthetic = 1\nheight = 64\nwidth = 64\nsteps = 2\n",
                                                     "") + "[[output]]" + CALIBRATED.split("[[output]]", 1)[1]:
            'imatrix = "recipe" needs a [calibrate] table',
    }
    for i, (outputs, message) in enumerate(cases.items()):
        recipe = write_recipe(tmp_path / f"r{i}.toml", model, outputs)
        code, _, err = run(["recipe", "run", recipe, "--out", tmp_path / "x", "--dry-run"], capsys)
        assert_one_line_error(code, err, str(recipe), message)


@pytest.mark.ray
def test_a_failure_on_ray_is_one_line_and_records_nothing(tmp_path, capsys):
    """A NaN weight passes planning (headers only) and fails in the task: one line naming the output."""
    pytest.importorskip("ray", reason="Ray is the ray extra (pip install .[ray])")
    from safetensors.torch import load_file, save_file

    model = tiny.make_tiny(tmp_path / "m", layers=1, shards=1)
    shard = next((model / "transformer").glob("*.safetensors"))
    tensors = load_file(shard)
    tensors["transformer_blocks.0.attn.to_q.weight"][0, 0] = float("nan")
    save_file(tensors, shard)
    recipe = write_recipe(tmp_path / "r.toml", model, OUTPUTS.split("[[output]]\nname = \"int8\"")[0])
    code, _, err = run(["recipe", "run", recipe, "--out", tmp_path / "rel", "--executor", "ray", "-q"], capsys)
    assert_one_line_error(code, err, "(on Ray)", "NaN")
    m = json.loads((tmp_path / "rel" / "manifest.json").read_text())
    assert all(e["file"] != "tiny-fp8.safetensors" for e in m["outputs"].values())
    assert not list((tmp_path / "rel").glob("*.safetensors")) and not list((tmp_path / "rel").glob(".staging-*"))


def test_reproduce_rebuilds_and_records_and_publish_can_require_it(model, tmp_path, capsys, monkeypatch):
    """--reproduce rebuilds every recorded output in a scratch folder, compares sha256 with the manifest and
    records the outcome; publish --require-reproduced refuses until every output is proven."""
    from qconvert.releases import release as release_module

    outputs = OUTPUTS.split("[[output]]\nname = \"int8\"")[0]  # two GGUF levels (one job) and FP8
    recipe = write_recipe(tmp_path / "r.toml", model, outputs)
    out = tmp_path / "rel"
    code, _, err = run(["recipe", "run", recipe, "--out", out, "-q"], capsys)
    assert code == 0, err
    code, _, err = run(["publish", out, "--repo", "a/b", "--dry-run", "--require-reproduced"], capsys)
    assert_one_line_error(code, err, "not rebuilt to the same bytes", "--reproduce")
    code, _, err = run(["recipe", "run", recipe, "--out", out, "--reproduce", "--dry-run"], capsys)
    assert code == 2 and "--reproduce rebuilds here" in err
    before = {p.name: p.read_bytes() for p in out.glob("tiny-*")}
    code, text, err = run(["recipe", "run", recipe, "--out", out, "--reproduce"], capsys)
    assert code == 0, err
    recorded = manifest.read(out)["outputs"]
    assert {name: e["reproduced"] for name, e in recorded.items()} == {"Q8_0": True, "Q4_K_M": True, "fp8": True}
    assert {p.name: p.read_bytes() for p in out.glob("tiny-*")} == before and not (out / ".reproduce").exists()
    code, _, err = run(["publish", out, "--repo", "a/b", "--dry-run", "--require-reproduced"], capsys)
    assert code == 0, err
    code, _, err = run(["recipe", "run", recipe, "--out", out, "-q"], capsys)  # a resume keeps the record
    assert code == 0 and manifest.read(out)["outputs"]["fp8"]["reproduced"] is True

    built = release_module.build_files

    def other_bytes(job, folder, loras, quiet):  # a build that is not deterministic
        made = built(job, folder, loras, quiet)
        for path in made.values():
            path.write_bytes(path.read_bytes() + b"x")
        return made

    monkeypatch.setattr(release_module, "build_files", other_bytes)
    code, _, err = run(["recipe", "run", recipe, "--out", out, "--only", "fp8", "--reproduce", "-q"], capsys)
    assert_one_line_error(code, err, "fp8 rebuilt to other bytes", "not reproducible")
    recorded = manifest.read(out)["outputs"]
    assert recorded["fp8"]["reproduced"] is False and recorded["Q8_0"]["reproduced"] is True
    assert {p.name: p.read_bytes() for p in out.glob("tiny-*")} == before  # the release itself untouched
