"""Jobs of a release: the ``qconvert`` command lines that build, calibrate and verify, and their sizing.

A job is what one executor task runs: the converter for one output (or for
several GGUF levels that share everything but the level, so the source is read
once), then ``verify`` for each output, in-process (``invoke``).  Files are
built in a staging folder beside the release, renamed into place when whole,
then hashed.  Nothing here writes the manifest: the driver does, from what a
job returns, so every executor records the same thing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from . import manifest
from .errors import QConvertError
from .io import fsync_dir
from .lora import parse_spec
from .recipes import FROM_RECIPE, Output, Recipe

HF_PREFIX = "hf://"
GIB = 1 << 30


@dataclass(frozen=True)
class Job:
    id: str
    outputs: tuple  # Output, ...
    source: str
    device: str = "cpu"
    cpus: int = 1
    gpus: int = 0
    memory: int = 0  # bytes Ray reserves for the task
    verify_only: bool = False  # the file is kept; only its verify settings changed
    calibration: str | None = None  # the recipe's calibration file these outputs read (absolute)

    @property
    def converter(self) -> str:
        return self.outputs[0].converter

    @property
    def label(self) -> str:
        return f"output {self.id}"

    def cleanup(self, out: Path) -> None:
        """What a task killed mid-way leaves: its staging folder."""
        shutil.rmtree(staging_dir(out, self.id), ignore_errors=True)


@dataclass(frozen=True)
class CalibrationJob:
    """One ``qconvert calibrate`` run of the recipe's [calibrate] options, for one LoRA set."""
    id: str
    file: str  # relative to the release folder: calibration/calib-KEY.safetensors
    source: str
    options: tuple
    loras: tuple
    device: str = "cpu"
    cpus: int = 1
    gpus: int = 0
    memory: int = 0

    @property
    def label(self) -> str:
        return f"calibration {self.file}"

    def cleanup(self, out: Path) -> None:
        shutil.rmtree(staging_dir(out, self.id), ignore_errors=True)


def plan_jobs(recipe: Recipe, outputs, source: str, header, reverify=(), calibrations=None) -> list[Job]:
    """GGUF outputs with equal everything-but-level share a job; the rest one job each, in recipe order.
    Outputs in ``reverify`` are checked again without being rebuilt; ``calibrations`` maps an output's name
    to the absolute path of the calibration it reads."""
    calibrations = calibrations or {}
    groups: dict = {}
    for o in outputs:
        if o.name in reverify:
            key = ("verify", o.name)
        elif o.converter == "to-gguf":
            key = ("to-gguf", manifest.canonical([(k, v) for k, v in o.options if k != "level"]), o.loras,
                   manifest.canonical(o.verify))
        else:
            key = ("one", o.name)
        groups.setdefault(key, []).append(o)
    device = recipe.device
    jobs = []
    for members in groups.values():
        job = Job(members[0].name, tuple(members), source, device, recipe.build.get("cpus", 1),
                  1 if device.startswith("cuda") else 0, verify_only=members[0].name in reverify,
                  calibration=calibrations.get(members[0].name))
        jobs.append(dataclasses.replace(job, memory=memory_estimate(job, header)))
    return jobs


def calibration_job(recipe: Recipe, file: str, loras: tuple, source: str, header) -> CalibrationJob:
    device = recipe.device
    job = CalibrationJob(Path(file).stem, file, source, recipe.calibrate, loras, device, recipe.build.get("cpus", 1),
                         1 if device.startswith("cuda") else 0)
    # one block at a time, plus every layer's statistics (sums, absmax and the sampled rows) held to the end
    keep = int(dict(recipe.calibrate).get("keep-rows", 64))
    block = sum(t.numel for n, t in header.items() if n.startswith("transformer_blocks.0.")) * 4
    stats = sum((keep + 3) * t.shape[1] * 4 for t in header.values() if len(t.shape) == 2)
    return dataclasses.replace(job, memory=int(2 * block + stats + 2 * GIB))


def memory_estimate(job: Job, header) -> int:
    """Peak bytes of the job, from the source's header: converters hold one tensor (GGUF: and one encoding
    per level), SVDQuant and verify one block, all in float32; plus the interpreter and torch."""
    largest = max((t.numel for t in header.values()), default=0) * 4
    block = sum(t.numel for n, t in header.items() if n.startswith("transformer_blocks.0.")) * 4
    build = {"to-gguf": largest * (2 + len(job.outputs)), "to-svdquant": 3 * block}.get(job.converter,
                                                                                        4 * largest)
    if dict(job.outputs[0].options).get("format") == "mix":  # a weight and its five round trips at once
        build = 8 * largest
    check = 2 * block if any(o.verify_settings().get("enabled", True) for o in job.outputs) else 0
    return int(max(build, check) + 2 * GIB)


# ------------------------------------------------------------ command lines

def lora_paths(loras, *, fetch: bool) -> list[str]:
    """``FILE[:STRENGTH]`` as given; ``hf://OWNER/REPO/PATH[:STRENGTH]`` downloaded into the Hub cache
    (``fetch``) or left out (plans: a baked LoRA does not change a file's size)."""
    out = []
    for spec in loras:
        if not spec.startswith(HF_PREFIX):
            lora = parse_spec(spec)
            out.append(f"{lora.path.expanduser().absolute()}:{lora.strength}")
            continue
        if not fetch:
            continue
        lora = parse_spec(spec[len(HF_PREFIX):])
        parts = lora.path.as_posix().split("/")
        if len(parts) < 3:
            raise QConvertError(f"LoRA {spec}: write hf://OWNER/REPO/PATH/IN/REPO.safetensors[:STRENGTH]")
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]))
        except Exception as exc:  # network, missing file, gated repo: one line, no token
            raise QConvertError(f"LoRA {spec}: cannot download it ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
        out.append(f"{path}:{lora.strength}")
    return out


def option_args(options) -> list[str]:
    args = []
    for key, value in options:
        if isinstance(value, bool):
            args += [f"--{key}"] if value else []
        elif isinstance(value, list):
            for v in value:
                args += [f"--{key}", str(v)]
        else:
            args += [f"--{key}", str(value)]
    return args


def build_argv(job: Job, target: Path, loras: list[str], *, quiet: bool, device: str | None = None) -> list[str]:
    """The converter's command line; the recipe's calibration stands for "recipe" (left out without one)."""
    options = [(k, job.calibration if v == FROM_RECIPE else v) for k, v in job.outputs[0].options
               if k != "level" and not (v == FROM_RECIPE and job.calibration is None)]
    argv = [job.converter, job.source, *option_args(options)]
    if job.converter == "to-gguf":
        argv += ["--level", ",".join(o.level for o in job.outputs)]
    for spec in loras:
        argv += ["--lora", spec]
    argv += ["-o", str(target), "--device", device or job.device]
    return argv + (["-q"] if quiet else [])


def verify_argv(output: Output, path: Path, report: Path, source: str, loras: list[str], device: str,
                *, quiet: bool = True) -> list:
    settings = output.verify_settings()
    argv = ["verify", str(path), "--reference", source, "--report", str(report), "--device", device]
    argv += ["-q"] if quiet else []
    for key, value in sorted(settings.items()):
        if key == "enabled":
            continue
        if key == "decode":
            argv += [] if value else ["--no-decode"]
            continue
        argv += [f"--{key.replace('_', '-')}", str(value)]
    for spec in loras:
        argv += ["--lora", spec]
    return argv


def calibrate_argv(job: CalibrationJob, target: Path, loras: list[str], *, quiet: bool) -> list[str]:
    argv = ["calibrate", job.source, *option_args(job.options)]
    for spec in loras:
        argv += ["--lora", spec]
    return argv + ["-o", str(target), "--device", job.device] + (["-q"] if quiet else [])


def invoke(argv: list[str], *, show: bool = False) -> str:
    """Run one qconvert command in this process; its stdout is returned, or with ``show`` passed to stderr
    (a command's plan and estimates for people; our stdout stays one JSON object for scripts)."""
    from .cli import cli

    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(sys.stderr if show else captured):
            cli.main(args=argv, prog_name="qconvert", standalone_mode=False)
    except click.ClickException as exc:  # options that pass one by one but not together
        raise QConvertError(f"qconvert {argv[0]}: {exc.format_message()}") from None
    return captured.getvalue()


# ------------------------------------------------------------------ the job

def run_job(job: Job, out_dir: str, quiet: bool = True) -> dict:
    """Build the job's files, move them into place, hash and verify each.  What a Ray task runs."""
    out = Path(out_dir)
    loras = lora_paths(job.outputs[0].loras, fetch=True)
    built = {o.name: out / o.file for o in job.outputs} if job.verify_only else _build(job, out, loras, quiet)
    lora_hashes = [manifest.file_sha256(parse_spec(s).path) for s in loras]
    results = {}
    for o in job.outputs:
        path = built[o.name]
        entry = {"bytes": path.stat().st_size, "sha256": manifest.file_sha256(path), "lora_sha256": lora_hashes}
        if o.verify_settings().get("enabled", True):
            report = out / "reports" / o.name
            invoke(verify_argv(o, path, report, job.source, loras, job.device, quiet=quiet), show=not quiet)
            entry["verify"] = figures(report / "report.json")
            entry["report"] = f"reports/{o.name}"
        results[o.name] = entry
    return results


def staging_dir(out: Path, job_id: str) -> Path:
    return Path(out) / f".staging-{job_id}"


@contextlib.contextmanager
def _staging(out: Path, job_id: str):
    """A job's own folder beside the release, emptied of a killed run's leftovers first, removed after."""
    staging = staging_dir(out, job_id)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def run_calibration(job: CalibrationJob, out_dir: str, quiet: bool = True) -> dict:
    """Calibrate into a staging folder, rename into place, hash.  What a Ray task runs."""
    out = Path(out_dir)
    target = out / job.file
    with _staging(out, job.id) as staging:
        made = staging / target.name
        invoke(calibrate_argv(job, made, lora_paths(job.loras, fetch=True), quiet=quiet), show=not quiet)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(made, target)
        fsync_dir(target.parent)
    return {"bytes": target.stat().st_size, "sha256": manifest.file_sha256(target)}


def _build(job: Job, out: Path, loras: list[str], quiet: bool) -> dict:
    with _staging(out, job.id) as staging:
        target = staging if job.converter == "to-gguf" else staging / job.outputs[0].file
        invoke(build_argv(job, target, loras, quiet=quiet))  # its bar shows; its summary would name staging
        built = {}
        for o in job.outputs:
            made = _made_file(staging, o) if job.converter == "to-gguf" else target
            os.replace(made, out / o.file)
            built[o.name] = out / o.file
        fsync_dir(out)
    return built


def _made_file(staging: Path, output: Output) -> Path:
    found = [p for p in staging.iterdir() if p.name.endswith(f"-{output.level}.gguf")]
    if len(found) != 1:  # pragma: no cover - to-gguf names every level's file MODEL-LEVEL.gguf
        raise RuntimeError(f"to-gguf left {[p.name for p in staging.iterdir()]} for level {output.level}")
    return found[0]


def figures(report_json: Path) -> dict:
    """The figures a model card shows, from verify's report."""
    r = json.loads(report_json.read_text())
    out = {"settings": r.get("settings", {})}
    for part, keys in (("latents", ("psnr_db", "ssim", "rel_rmse")), ("pixels", ("psnr_db", "ssim", "lpips")),
                       ("weights", ("mean_rel_rmse", "worst_rel_rmse"))):
        values = r.get(part) or {}
        out[part] = {k: values.get(k) for k in keys if values.get(k) is not None}
    out["pictures"] = sorted(p.name for p in report_json.parent.glob("*.png"))
    return out
