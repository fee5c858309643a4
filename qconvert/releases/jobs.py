"""Jobs of a release: the converter calls that build, calibrate and verify, and their sizing.

A job is what one executor task runs: the converter for one output (or for
several GGUF levels that share everything but the level, so the source is read
once), then ``verify`` for each output: function calls with the converters' own
typed options, exactly what the command line runs.  Files are
built in a staging folder beside the release, renamed into place when whole,
then hashed.  Nothing here writes the manifest: the driver does, from what a
job returns, so every executor records the same thing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from qconvert.converters.base import Result, Source, UsageError, make_options
from qconvert.converters.registry import CONVERTERS
from qconvert.core.errors import QConvertError
from qconvert.core.io import fsync_dir
from qconvert.core.lora import parse_spec
from qconvert.releases import manifest
from qconvert.releases.recipes import FROM_RECIPE, VERIFY_OPTIONS, Output, Recipe

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


def converter_options(converter: str, pairs, calibration: str | None = None):
    """The converter's typed options from a recipe's ``(option, value)`` pairs; the recipe's calibration stands
    for "recipe" (the option is left out while there is none: plans made before it exists)."""
    conv = CONVERTERS[converter]
    values = {}
    for name, value in pairs:
        if value == FROM_RECIPE and name == conv.calibration:
            if calibration is None:
                continue
            value = calibration
        p = conv.param(name)
        if p.is_flag:
            values[p.attr] = bool(value)
        elif p.multiple:
            values[p.attr] = tuple(p.convert(v) for v in (value if isinstance(value, list) else [value]))
        else:
            values[p.attr] = p.convert(value)
    return make_options(conv.options, values)


def build_request(job: Job, loras: list[str], *, device: str | None = None) -> tuple:
    """``(converter, source, options)`` of the job's build: what ``qconvert CONVERTER ...`` would run."""
    pairs = [(k, v) for k, v in job.outputs[0].options if k != "level"]
    if job.converter == "to-gguf":
        pairs.append(("level", ",".join(o.level for o in job.outputs)))
    source = Source(job.source, tuple(loras), device=device or job.device)
    return CONVERTERS[job.converter], source, converter_options(job.converter, pairs, job.calibration)


def run_converter(conv, source: Source, options, output, *, dry_run: bool = False, quiet: bool = True) -> Result:
    """One converter call; what it says goes to stderr unless quiet; options that pass one by one but not
    together name the converter."""
    try:
        return conv.run(source, options, output, dry_run=dry_run, quiet=quiet, echo=_say(quiet))
    except UsageError as exc:
        raise QConvertError(f"qconvert {conv.name}: {exc}") from None


def _say(quiet: bool):
    """Where a job's commands speak: stderr (our stdout stays one JSON object for scripts), or nowhere."""
    return (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr))


def verify_output(output: Output, path: Path, report: Path, source: str, loras: list[str], device: str,
                  *, quiet: bool = True) -> None:
    """``qconvert verify PATH --reference SOURCE --report REPORT`` with the output's verify settings; what
    it says goes to stderr (our stdout stays one JSON object for scripts)."""
    from qconvert.running.defaults import VERIFY
    from qconvert.running.sample import SampleOptions
    from qconvert.running.verify import run_verify

    settings = {k: VERIFY_OPTIONS[k](v) for k, v in output.verify_settings().items() if k != "enabled"}
    decode = settings.pop("decode", True)
    max_minutes = settings.pop("max_minutes", None)
    settings["prompt_files"] = tuple(Path(f) for f in settings.pop("embeds", ()))
    if settings["prompt_files"]:  # as on the command line: files alone unless synthetic prompts are asked for too
        settings.setdefault("synthetic", 0)
    options = SampleOptions(**{**VERIFY, **settings, "device": device})
    with Source(source, tuple(loras)).open() as reference:
        run_verify(path, reference, options, report, max_minutes=max_minutes, decode=decode, echo=_say(quiet))


# ------------------------------------------------------------------ the job

def run_job(job: Job, out_dir: str, quiet: bool = True) -> dict:
    """Build the job's files, move them into place, hash and verify each.  What a Ray task runs."""
    out = Path(out_dir)
    loras = lora_paths(job.outputs[0].loras, fetch=True)
    built = {o.name: out / o.file for o in job.outputs} if job.verify_only else build_files(job, out, loras, quiet)
    lora_hashes = [manifest.file_sha256(parse_spec(s).path) for s in loras]
    results = {}
    for o in job.outputs:
        path = built[o.name]
        entry = {"bytes": path.stat().st_size, "sha256": manifest.file_sha256(path), "lora_sha256": lora_hashes}
        if o.verify_settings().get("enabled", True):
            report = out / "reports" / o.name
            verify_output(o, path, report, job.source, loras, job.device, quiet=quiet)
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
        source = Source(job.source, tuple(lora_paths(job.loras, fetch=True)), device=job.device)
        run_converter(CONVERTERS["calibrate"], source, converter_options("calibrate", job.options), made, quiet=quiet)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(made, target)
        fsync_dir(target.parent)
    return {"bytes": target.stat().st_size, "sha256": manifest.file_sha256(target)}


def build_files(job: Job, out: Path, loras: list[str], quiet: bool) -> dict:
    """The job's files, built in a staging folder and renamed to ``out``/FILE; {output name: path}."""
    with _staging(out, job.id) as staging:
        target = staging if job.converter == "to-gguf" else staging / job.outputs[0].file
        conv, source, options = build_request(job, loras)
        made = run_converter(conv, source, options, target, quiet=quiet).paths  # one per output, in order
        built = {}
        for o, path in zip(job.outputs, made):
            os.replace(path, out / o.file)
            built[o.name] = out / o.file
        fsync_dir(out)
    return built


def figures(report_json: Path) -> dict:
    """The figures a model card shows, from verify's report."""
    r = json.loads(report_json.read_text())
    out = {"settings": r.get("settings", {})}
    for part, keys in (("latents", ("psnr_db", "ssim", "rel_rmse")), ("pixels", ("psnr_db", "ssim", "lpips")),
                       ("weights", ("mean_rel_rmse", "worst_rel_rmse", "changed_tensors", "changed_mean_rel_rmse"))):
        values = r.get(part) or {}
        out[part] = {k: values.get(k) for k in keys if values.get(k) is not None}
        for k, bounds in (values.get("interval") or {}).items():
            if k in keys:
                out.setdefault("intervals", {})[f"{part}.{k}"] = list(bounds)
    out["samples"] = len(r.get("samples") or []) or 1
    out["pictures"] = sorted(p.name for p in report_json.parent.glob("*.png"))
    return out
