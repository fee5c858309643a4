"""``qconvert recipe run``: plan, build, verify and record every output of a recipe, resumably, here or on Ray.

The plan: which outputs (and recipe calibrations) the manifest still vouches
for, which must be made and why, and the exact size of each from its
converter's own dry run.  The run: calibrations first (a wave of their own),
then the output jobs (``jobs.py``), on the local or the Ray executor
(``executors.py``); as each finishes, this driver records it in
``manifest.json``, atomically, so both executors leave the same files and the
same manifest.

Resume: an output whose manifest entry has the current key (recipe entry,
source fingerprint, LoRA files, the calibration it reads, qconvert version)
and whose file still has the recorded size and sha256 is kept; anything else
is rebuilt, and the reason said.  New verify settings re-verify a kept file.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from qconvert import __version__
from qconvert.converters.base import Source
from qconvert.converters.registry import CONVERTERS
from qconvert.core.errors import QConvertError
from qconvert.core.lora import parse_spec
from qconvert.releases import gates, manifest
from qconvert.releases.executors import executor
from qconvert.releases.jobs import (
    HF_PREFIX,
    Job,
    build_files,
    build_request,
    calibration_job,
    converter_options,
    lora_paths,
    plan_jobs,
    run_calibration,
    run_converter,
    run_job,
)
from qconvert.releases.recipes import Output, Recipe

CALIBRATION_DIR = "calibration"


# -------------------------------------------------------------------- run

@dataclass
class Plan:
    recipe: Recipe
    source: str
    out: Path
    outputs: tuple
    todo: list  # (Output, reason)
    kept: list  # Output
    jobs: list
    fingerprint: str
    keys: dict
    planned_bytes: dict  # name -> bytes or None (a mix: chosen when built)
    previous: dict | None
    calibrations: dict = field(default_factory=dict)  # file -> {"key", "loras", "outputs"}: what is needed
    calibration_todo: list = field(default_factory=list)  # CalibrationJob, ...
    approximate: set = field(default_factory=set)  # names planned before their calibration exists
    recipe_calibrations: set = field(default_factory=set)  # every calibration file the whole recipe reads


def verify_key(o: Output) -> str:
    """What a report's figures depend on besides the file: the output's settings, the defaults under them, the
    report's schema (a report made under other defaults or another schema is measured again)."""
    from qconvert.running.defaults import VERIFY
    from qconvert.running.report import SCHEMA_VERSION

    return manifest.digest({"verify": o.verify_settings(), "defaults": VERIFY, "schema": SCHEMA_VERSION,
                            "qconvert": __version__})


def output_key(o: Output, fingerprint: str, lora_hashes: list, calibration: str | None) -> str:
    return manifest.digest({"spec": o.spec(), "source": fingerprint, "loras": lora_hashes,
                            "calibration": calibration, "qconvert": __version__})


def calibration_key(recipe: Recipe, loras: tuple, lora_hashes: list, fingerprint: str) -> str:
    return manifest.digest({"calibrate": list(recipe.calibrate), "loras": list(loras), "lora_sha256": lora_hashes,
                            "source": fingerprint, "qconvert": __version__})


def make_plan(recipe: Recipe, *, source: str | None, out: Path, only: str | None, say: Callable,
              quiet: bool = True) -> Plan:
    from qconvert.core.checkpoint import open_checkpoint
    from qconvert.core.pipeline import progress

    source = source or recipe.source
    if Path(source).expanduser().exists():  # a path: absolute, for Ray tasks running in other folders
        source = str(Path(source).expanduser().absolute())
    outputs = recipe.select(only)
    with open_checkpoint(source) as ckpt:
        fingerprint = ckpt.provenance()["source_fingerprint"]
        header = {n: t for n, t in ckpt.tensors.items()}
    previous = manifest.read(out, say=say)
    entries = (previous or {}).get("outputs", {})
    # each LoRA file hashed once, however many outputs bake it; with --only, the other outputs' too when the
    # recipe calibrates (their calibrations stay recorded)
    hashed: dict = {}
    hashing = recipe.outputs if recipe.calibrate else outputs
    lora_hashes = {o.name: _local_lora_hashes(o, recipe, hashed) for o in hashing}
    needed = _calibrations(recipe, outputs, lora_hashes, fingerprint)
    wanted = set(_calibrations(recipe, recipe.outputs, lora_hashes, fingerprint)) if recipe.calibrate else set()
    by_output = {name: file for file, info in needed.items() for name in info["outputs"]}
    keys, todo, kept, reverify = {}, [], [], {}
    recorded_calibrations = (previous or {}).get("calibrations", {})
    # every recorded file is hashed again (a file changed on disk may keep its size): a bar for the minutes
    recorded = sum(entries[o.name]["bytes"] for o in outputs if o.name in entries)
    with progress(recorded, "checking recorded files", quiet=quiet) as bar:
        calibration_todo = [calibration_job(recipe, file, tuple(info["loras"]), source, header)
                            for file, info in needed.items()
                            if file not in recorded_calibrations
                            or manifest.check(out, recorded_calibrations[file], info["key"]) is not None]
        for o in outputs:
            calibration = needed[by_output[o.name]]["key"] if o.name in by_output else None
            keys[o.name] = output_key(o, fingerprint, lora_hashes[o.name], calibration)
            reason = _status(o, entries.get(o.name), out, keys[o.name], bar.update)
            if reason is None and entries[o.name].get("verify_key") != verify_key(o):
                reverify[o.name] = entries[o.name]["bytes"]
                reason = "verify settings changed (verified again, not rebuilt)"
            if reason is None:
                kept.append(o)
            else:
                todo.append((o, reason))
    for job in calibration_todo:  # calibrate's own checks of its options together, before any work
        try:
            planned = Source(job.source, tuple(lora_paths(job.loras, fetch=False)))
            run_converter(CONVERTERS["calibrate"], planned, converter_options("calibrate", job.options),
                          Path(job.file), dry_run=True)
        except QConvertError as exc:
            raise QConvertError(f"{job.label}: {exc}") from None
    paths = {name: str(Path(out).absolute() / file) for name, file in by_output.items()}
    jobs = plan_jobs(recipe, [o for o, _ in todo], source, header, reverify, paths)
    sizes = planned_sizes([j for j in jobs if not j.verify_only])
    # planned without their statistics, these sizes miss the calibration's provenance (some bytes of metadata)
    approximate = {o.name for j in jobs if j.calibration and not Path(j.calibration).is_file() for o in j.outputs}
    return Plan(recipe, source, out, outputs, todo, kept, jobs, fingerprint, keys, {**sizes, **reverify}, previous,
                needed, calibration_todo, approximate, wanted)


def _local_lora_hashes(o: Output, recipe: Recipe, hashed: dict) -> list[str]:
    local = [parse_spec(s).path for s in o.loras if not s.startswith(HF_PREFIX)]
    for p in local:
        if not p.is_file():
            raise QConvertError(f"{recipe.path}: output {o.name}: LoRA {p} does not exist")
        if p not in hashed:
            hashed[p] = manifest.file_sha256(p)
    return [hashed[p] for p in local]


def _calibrations(recipe: Recipe, outputs, lora_hashes: dict, fingerprint: str) -> dict:
    """The recipe calibrations the outputs need: one per distinct LoRA set, named by its key."""
    needed: dict = {}
    for o in outputs:
        if o.calibrated:
            key = calibration_key(recipe, o.loras, lora_hashes[o.name], fingerprint)
            file = f"{CALIBRATION_DIR}/calib-{key[:16]}.safetensors"
            needed.setdefault(file, {"key": key, "loras": list(o.loras), "outputs": []})["outputs"].append(o.name)
    return needed


def _status(o: Output, entry: dict | None, out: Path, key: str, progress: Callable) -> str | None:
    """Why ``o`` must be built (None: its recorded file still stands)."""
    if entry is None:
        return "new" if not (out / o.file).exists() else f"{o.file} has no manifest entry"
    return manifest.check(out, entry, key, progress)


def planned_sizes(jobs) -> dict:
    """Exact bytes of each output from its converter's own dry run (planned on the CPU, LoRAs from the Hub left
    out: baking one does not change a size; a calibration not made yet left out too).  A mix is chosen only
    when built (its target is its bound), and so is what needs a calibration to plan (calibrated FP8, smoothed
    NVFP4); a
    measured GGUF is planned at its bound (city96's size at the level, or its --target-size)."""
    sizes = {}
    for job in jobs:
        options = dict(job.outputs[0].options)
        if job.converter == "to-comfy" and options.get("format") == "mix":
            sizes[job.outputs[0].name] = None
            continue
        if job.calibration and not Path(job.calibration).is_file():
            job = dataclasses.replace(job, calibration=None)
        measured = is_measured(job.outputs[0])
        if measured:  # chosen when built, within city96's size at each level (or its --target-size)
            job = dataclasses.replace(job, outputs=tuple(
                dataclasses.replace(o, options=(*((k, "city96" if k == "policy" else v) for k, v in o.options
                                                   if k not in ("target-size", "minimal-metadata")),
                                                 ("minimal-metadata", True))) for o in job.outputs))
        target = Path(".") if job.converter == "to-gguf" else Path(job.outputs[0].file)
        conv, source, options = build_request(job, lora_paths(job.outputs[0].loras, fetch=False), device="cpu")
        try:
            report = run_converter(conv, source, options, target, dry_run=True).report
        except QConvertError as exc:
            if job.outputs[0].calibrated and job.calibration is None:  # calibrated FP8 plans with its statistics
                sizes.update({o.name: None for o in job.outputs})
                continue
            raise QConvertError(f"{job.label}: {exc}") from None
        files = report.get("files", [report])
        for o, f in zip(job.outputs, files):
            sizes[o.name] = bound_bytes(o) if measured and bound_bytes(o) else int(f["bytes"])
    return sizes


def is_measured(o: Output) -> bool:
    """A GGUF whose types the block measure chooses when it is built."""
    return o.converter == "to-gguf" and dict(o.options).get("policy") == "measured"


def bound_bytes(o: Output) -> int:
    """A mix's --target-size in bytes (0 for --max-error, whose size is unknown until chosen)."""
    target = dict(o.options).get("target-size")
    return int(float(target) * 1e9) if target is not None else 0


def format_plan(plan: Plan) -> list[str]:
    lines = [f"recipe {plan.recipe.name} ({plan.recipe.path}): {len(plan.outputs)} outputs from {plan.source}, "
             f"into {plan.out}"]
    redo = {j.file for j in plan.calibration_todo}
    for file, info in plan.calibrations.items():
        loras = f"; LoRAs {', '.join(info['loras'])}" if info["loras"] else ""
        verb = "calibrate" if file in redo else "keep"
        lines.append(f"  {verb:<6} {file}  (read by {', '.join(info['outputs'])}{loras})")
    for o in plan.kept:
        lines.append(f"  keep   {o.name:<24} {o.file}  (unchanged since the manifest)")
    by_job = {o.name: job for job in plan.jobs for o in job.outputs}
    for o, reason in plan.todo:
        size = plan.planned_bytes.get(o.name)
        job = by_job[o.name]
        shared = f"; reads the source once with {len(job.outputs) - 1} other level(s)" if len(job.outputs) > 1 else ""
        bound = bound_bytes(o)
        about = "about " if o.name in plan.approximate else ""
        if size is not None and is_measured(o):
            about = "at most "
        shown = f"{about}{size:,} bytes" if size is not None else (
            f"at most {bound:,} bytes, chosen when built" if bound else "size chosen when built")
        lines.append(f"  build  {o.name:<24} {o.file}  ({o.converter}, {shown}; {reason}{shared})")
    total = sum(plan.planned_bytes.get(o.name) or bound_bytes(o) for o, _ in plan.todo)
    lines.append(f"  {len(plan.todo)} to build ({total / 1e9:.2f} GB planned), {len(plan.kept)} kept")
    return lines


def run(plan: Plan, *, kind: str = "local", address: str | None = None, quiet: bool = False,
        say: Callable = print) -> dict:
    from qconvert.core.io import check_disk_space
    from qconvert.core.pipeline import progress

    plan.out.mkdir(parents=True, exist_ok=True)
    check_disk_space(plan.out / manifest.NAME, sum(plan.planned_bytes.get(o.name) or bound_bytes(o)
                                                   for o, _ in plan.todo))
    record = new_manifest(plan)
    manifest.write(plan.out, record)  # kept entries only: a rebuilt output is absent until rebuilt
    # the overall bar (and its ETA) in planned bytes; a mix, whose size is chosen as it is built, counts 0
    total = sum(v or 0 for v in plan.planned_bytes.values())
    started = time.monotonic()
    with progress(total, f"recipe {plan.recipe.name}", quiet=quiet) as bar:
        count = [len(plan.kept)]

        def done(job: Job, results: dict) -> None:
            for o in job.outputs:
                record["outputs"][o.name] = entry_for(plan, o, results[o.name])
                manifest.write(plan.out, record)
                count[0] += 1
                bar.update(plan.planned_bytes.get(o.name) or 0)
                v = results[o.name].get("verify", {}).get("latents", {})
                psnr = f", latent PSNR {v['psnr_db']:.2f} dB" if v.get("psnr_db") is not None else ""
                say(f"[{count[0]}/{len(plan.outputs)}] {o.name}: {o.file} ({results[o.name]['bytes']:,} bytes"
                    f"{psnr}) after {time.monotonic() - started:.0f} s")

        def calibrated(job, result: dict) -> None:
            record["calibrations"][job.file] = {"file": job.file, "key": plan.calibrations[job.file]["key"],
                                                **result, "loras": list(job.loras), "options": dict(job.options)}
            manifest.write(plan.out, record)
            say(f"calibrated {job.file} ({result['bytes']:,} bytes) after {time.monotonic() - started:.0f} s")

        with executor(kind, address=address, quiet=quiet) as ex:
            if plan.calibration_todo:  # a wave of its own: the outputs after it read these files
                ex.run([(run_calibration, job) for job in plan.calibration_todo], plan.out, calibrated)
                waiting = [j for j in plan.jobs if j.calibration and not j.verify_only]
                plan.planned_bytes.update(planned_sizes(waiting))  # exact now that the statistics exist
                plan.approximate.clear()
            ex.run([(run_job, job) for job in plan.jobs], plan.out, done)
    failed = gates.judge_release(plan.recipe.outputs, plan.out, record)
    manifest.write(plan.out, record)
    for line in failed:
        say(f"gate failed: {line}")
    return record


def reproduce(plan: Plan, *, quiet: bool = False, say: Callable = print) -> dict:
    """Build every recorded output again (``--only``: those) in a scratch folder beside the release and compare
    its sha256 with the manifest's; each entry records ``reproduced``.  Raises naming the outputs whose bytes
    differ.  Outputs must be built and current first: a reproduction checks a release, it does not make one."""
    if plan.todo or plan.calibration_todo:
        missing = ", ".join(o.name for o, _ in plan.todo) or "its calibrations"
        raise QConvertError(f"{plan.out}: not every output is built and current ({missing}); run recipe run "
                            "first, then --reproduce")
    record = manifest.read(plan.out, required=True)
    reads = {name: str(plan.out.absolute() / file) for file, info in plan.calibrations.items()
             for name in info["outputs"]}
    scratch = plan.out / ".reproduce"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    differ = []
    try:
        for job in plan_jobs(plan.recipe, plan.kept, plan.source, {}, calibrations=reads):
            built = build_files(job, scratch, lora_paths(job.outputs[0].loras, fetch=True), quiet)
            for o in job.outputs:
                entry = record["outputs"][o.name]
                entry["reproduced"] = manifest.file_sha256(built[o.name]) == entry["sha256"]
                manifest.write(plan.out, record)
                same = "rebuilt to the same bytes" if entry["reproduced"] else "REBUILT TO OTHER BYTES"
                say(f"{o.name}: {o.file} {same}")
                differ += [] if entry["reproduced"] else [o.name]
                built[o.name].unlink()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if differ:
        raise QConvertError(f"{plan.out}: {', '.join(differ)} rebuilt to other bytes than manifest.json records: "
                            "the release is not reproducible here (recorded as reproduced = false)")
    return record


def new_manifest(plan: Plan) -> dict:
    """Kept entries, and (with --only) the previous entries of the recipe's other outputs, untouched."""
    previous = (plan.previous or {}).get("outputs", {})
    selected = {o.name for o in plan.outputs}
    kept = {o.name: previous[o.name] for o in plan.recipe.outputs
            if o.name in previous and (o in plan.kept or o.name not in selected)}
    return {"schema": manifest.SCHEMA, "qconvert_version": __version__,
            "recipe": {"name": plan.recipe.name, "file": plan.recipe.path.name, "sha256": plan.recipe.sha256,
                       "description": plan.recipe.description},
            "source": {"id": plan.source, "fingerprint": plan.fingerprint},
            "card": plan.recipe.card, "hub": plan.recipe.hub,
            "order": [o.name for o in plan.recipe.outputs], "outputs": kept,
            "calibrations": _kept_calibrations(plan)}


def _kept_calibrations(plan: Plan) -> dict:
    """Recorded calibrations, but those being made again and those no output of the recipe reads any more."""
    redo = {j.file for j in plan.calibration_todo}
    return {f: e for f, e in (plan.previous or {}).get("calibrations", {}).items()
            if f not in redo and f in plan.recipe_calibrations}


def entry_for(plan: Plan, o: Output, result: dict) -> dict:
    entry = {"file": o.file, "bytes": result["bytes"], "sha256": result["sha256"], "converter": o.converter,
             "format": format_name(o), "options": dict(o.options), "key": plan.keys[o.name],
             "loras": [{"spec": s, "sha256": h} for s, h in zip(o.loras, result.get("lora_sha256", []))],
             "source": {"id": plan.source, "fingerprint": plan.fingerprint}, "qconvert_version": __version__,
             "verify_key": verify_key(o)}
    if "verify" in result:
        entry["verify"] = result["verify"]
        entry["report"] = result["report"]
    return entry


def format_name(o: Output) -> str:
    options = dict(o.options)
    if o.converter == "to-gguf":
        return "gguf"
    if o.converter == "to-fp8":
        return f"fp8-{options.get('format', 'comfy')}"
    if o.converter == "to-comfy":
        return f"comfy-{options.get('format', 'nvfp4')}" + ("-smoothed" if options.get("smooth") else "")
    if o.converter == "to-diffusers":
        return f"diffusers-{options.get('format', 'fp8r')}"
    return f"svdquant-{options.get('precision', 'int4')}"


def summary(plan: Plan, record: dict | None) -> dict:
    return {"recipe": plan.recipe.name, "source": plan.source, "out": str(plan.out),
            "kept": [o.name for o in plan.kept], "built": [o.name for o, _ in plan.todo] if record else [],
            "planned": [{"name": o.name, "file": o.file, "reason": r, "bytes": plan.planned_bytes.get(o.name)}
                        for o, r in plan.todo],
            "outputs": (record or {}).get("outputs", {})}



DEMO_RECIPE = """[recipe]
name = "tiny-release"
source = "{model}"
description = "qconvert demo: a release of the tiny model, built, verified and described."

[card]
base_model = "Qwen/Qwen-Image"

[verify]
height = 64
width = 64
steps = 2

[[output]]
converter = "to-gguf"
levels = ["Q8_0", "Q4_K_M"]
file = "tiny-qwen-image-{{level}}.gguf"

[[output]]
name = "int8-convrot"
converter = "to-comfy"
format = "int8"
file = "tiny-qwen-image-int8-convrot.safetensors"
"""


def demo_step(model: Path, out: Path, quiet: bool, echo: Callable[[str], None]) -> list[Path]:
    """``qconvert demo``: a three-file release of the tiny model, its manifest and its model card."""
    from qconvert.releases import hub, recipes

    folder = Path(out) / "release"
    path = Path(out) / "tiny-release.toml"
    path.write_text(DEMO_RECIPE.format(model=Path(model).as_posix()))
    plan = make_plan(recipes.load(path), source=None, out=folder, only=None, say=lambda m: None)
    record = run(plan, quiet=True, say=lambda m: None)
    hub.write_card(folder, hub.render_card(record, "you/tiny-release"))
    echo(f"{'release':<16}{folder}/  ({len(record['outputs'])} files verified, manifest.json, README.md: the model "
         f"card); qconvert recipe run {path} --out {folder} resumes it, qconvert publish {folder} --repo "
         "OWNER/NAME uploads it")
    return [folder]
