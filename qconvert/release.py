"""``qconvert recipe run``: build, verify and record every output of a recipe, resumably, here or on Ray.

A recipe's outputs become jobs: GGUF levels that share a source, LoRAs and
options form one job that reads each source tensor once (``to-gguf --level
A,B,...``); every other output is a job of its own.  A job is the same
``qconvert`` command lines a person would type (the converter, then ``verify``
for each output), run in-process by ``run_job``; the local executor calls it
here, the Ray executor as a task sized by the job's plan.  Files go to a
staging folder beside the outputs and are renamed into place when complete;
the driver then records each output in ``manifest.json`` (atomically), so
both executors leave the same files and the same manifest.

Resume: an output whose manifest entry has the current key (recipe entry,
source fingerprint, LoRA files, qconvert version) and whose file still has the
recorded size and sha256 is kept; anything else is rebuilt, and the reason said.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import __version__, manifest
from .errors import QConvertError
from .io import fsync_dir
from .lora import parse_spec
from .recipes import Output, Recipe, canonical

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

    @property
    def converter(self) -> str:
        return self.outputs[0].converter


def plan_jobs(recipe: Recipe, outputs, source: str, header, reverify=()) -> list[Job]:
    """GGUF outputs with equal everything-but-level share a job; the rest one job each, in recipe order.
    Outputs in ``reverify`` are checked again without being rebuilt."""
    groups: dict = {}
    for o in outputs:
        if o.name in reverify:
            key = ("verify", o.name)
        elif o.converter == "to-gguf":
            key = ("to-gguf", canonical([(k, v) for k, v in o.options if k != "level"]), o.loras,
                   canonical(o.verify))
        else:
            key = ("one", o.name)
        groups.setdefault(key, []).append(o)
    device = recipe.device
    jobs = []
    for members in groups.values():
        job = Job(members[0].name, tuple(members), source, device, recipe.build.get("cpus", 1),
                  1 if device.startswith("cuda") else 0, verify_only=members[0].name in reverify)
        jobs.append(dataclasses.replace(job, memory=memory_estimate(job, header)))
    return jobs


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
    options = [(k, v) for k, v in job.outputs[0].options if k != "level"]
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


def invoke(argv: list[str]) -> str:
    """Run one qconvert command in this process; its stdout is returned (chatter stays off ours)."""
    from .cli import cli

    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        cli.main(args=argv, prog_name="qconvert", standalone_mode=False)
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
            invoke(verify_argv(o, path, report, job.source, loras, job.device, quiet=quiet))
            entry["verify"] = figures(report / "report.json")
            entry["report"] = f"reports/{o.name}"
        results[o.name] = entry
    return results


def _build(job: Job, out: Path, loras: list[str], quiet: bool) -> dict:
    staging = out / f".staging-{job.id}"
    shutil.rmtree(staging, ignore_errors=True)  # a killed run's leftovers
    staging.mkdir(parents=True)
    try:
        target = staging if job.converter == "to-gguf" else staging / job.outputs[0].file
        invoke(build_argv(job, target, loras, quiet=quiet))
        built = {}
        for o in job.outputs:
            made = _made_file(staging, o) if job.converter == "to-gguf" else target
            os.replace(made, out / o.file)
            built[o.name] = out / o.file
        fsync_dir(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
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


# --------------------------------------------------------------- executors

def run_local(jobs, out_dir: Path, done: Callable, *, quiet: bool) -> None:
    for job in jobs:
        done(job, run_job(job, str(out_dir), quiet))


def run_ray(jobs, out_dir: Path, done: Callable, *, address: str | None, quiet: bool) -> None:
    try:
        import ray
    except ImportError:
        raise QConvertError("--executor ray needs Ray: pip install 'qconvert[ray]'") from None
    if address:
        _check_reachable(address)
    try:
        ray.init(address=address or None, ignore_reinit_error=True, include_dashboard=False,
                 log_to_driver=not quiet, logging_level="ERROR")
    except Exception as exc:  # ConnectionError, RuntimeError, ValueError for a bad address
        raise QConvertError(f"Ray at {address or '(local)'} does not answer: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}") from None
    try:
        _fits_cluster(ray, jobs)
        task = ray.remote(max_retries=0)(run_job)
        pending = {task.options(num_cpus=j.cpus, num_gpus=j.gpus, memory=j.memory).remote(j, str(out_dir), True): j
                   for j in jobs}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
                for ref in pending:
                    ray.cancel(ref, force=True)
                if isinstance(cause, QConvertError):
                    raise QConvertError(f"output {job.id} (on Ray): {cause}") from None
                raise QConvertError(f"output {job.id} failed on Ray: {type(cause).__name__}: "
                                    f"{str(cause).splitlines()[0][:300] if str(cause) else ''}") from None
            done(job, result)
    finally:
        if not address:
            ray.shutdown()


def _check_reachable(address: str) -> None:
    """A dead address makes ray.init retry for minutes: try the port first (5 s)."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise QConvertError(f"--address {address}: give HOST:PORT (or ray://HOST:PORT, or auto)")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except OSError as exc:
        raise QConvertError(f"Ray at {address} does not answer ({exc.strerror or exc}); start the cluster "
                            "(ray start --head) or check the address") from None


def _fits_cluster(ray, jobs) -> None:
    """A task no node can hold would wait forever: say so before submitting anything."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    for job in jobs:
        if not any(r.get("CPU", 0) >= job.cpus and r.get("GPU", 0) >= job.gpus and r.get("memory", 0) >= job.memory
                   for r in nodes):
            raise QConvertError(f"output {job.id} needs {job.cpus} CPU, {job.gpus} GPU and "
                                f"{job.memory / GIB:.1f} GiB of memory on one node; no node of the Ray cluster "
                                "has that (lower [build] cpus, or add a larger node)")


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


def verify_key(o: Output) -> str:
    return manifest.digest({"verify": o.verify_settings(), "qconvert": __version__})


def output_key(o: Output, fingerprint: str, lora_hashes: list) -> str:
    return manifest.digest({"spec": o.spec(), "source": fingerprint, "loras": lora_hashes,
                            "qconvert": __version__})


def make_plan(recipe: Recipe, *, source: str | None, out: Path, only: str | None, say: Callable,
              quiet: bool = True) -> Plan:
    from .checkpoint import open_checkpoint
    from .pipeline import progress

    source = source or recipe.source
    if Path(source).expanduser().exists():  # a path: absolute, for Ray tasks running in other folders
        source = str(Path(source).expanduser().absolute())
    outputs = recipe.select(only)
    with open_checkpoint(source) as ckpt:
        fingerprint = ckpt.provenance()["source_fingerprint"]
        header = {n: t for n, t in ckpt.tensors.items()}
    previous = manifest.read(out, say=say)
    entries = (previous or {}).get("outputs", {})
    keys, todo, kept, reverify = {}, [], [], {}
    # every recorded file is hashed again (a file changed on disk may keep its size): a bar for the minutes
    recorded = sum(entries[o.name]["bytes"] for o in outputs if o.name in entries)
    with progress(recorded, "checking recorded files", quiet=quiet) as bar:
        for o in outputs:
            reason = _status(o, entries.get(o.name), out, recipe, fingerprint, keys, bar.update)
            if reason is None and entries[o.name].get("verify_key") != verify_key(o):
                reverify[o.name] = entries[o.name]["bytes"]
                reason = "verify settings changed (verified again, not rebuilt)"
            if reason is None:
                kept.append(o)
            else:
                todo.append((o, reason))
    jobs = plan_jobs(recipe, [o for o, _ in todo], source, header, reverify)
    sizes = planned_sizes([j for j in jobs if not j.verify_only])
    return Plan(recipe, source, out, outputs, todo, kept, jobs, fingerprint, keys, {**sizes, **reverify}, previous)


def _status(o: Output, entry: dict | None, out: Path, recipe: Recipe, fingerprint: str, keys: dict,
            progress: Callable) -> str | None:
    """Why ``o`` must be built (None: its recorded file still stands); its key goes into ``keys``."""
    local = [parse_spec(s).path for s in o.loras if not s.startswith(HF_PREFIX)]
    for p in local:
        if not p.is_file():
            raise QConvertError(f"{recipe.path}: output {o.name}: LoRA {p} does not exist")
    keys[o.name] = output_key(o, fingerprint, [manifest.file_sha256(p) for p in local])
    if entry is None:
        return "new" if not (out / o.file).exists() else f"{o.file} has no manifest entry"
    return manifest.check(out, entry, keys[o.name], progress)


def planned_sizes(jobs) -> dict:
    """Exact bytes of each output from its converter's own dry run (planned on the CPU, LoRAs from the Hub left
    out: baking one does not change a size).  A mix is chosen only when built: its target is its bound."""
    sizes = {}
    for job in jobs:
        options = dict(job.outputs[0].options)
        if job.converter == "to-comfy" and options.get("format") == "mix":
            sizes[job.outputs[0].name] = None
            continue
        target = Path(".") if job.converter == "to-gguf" else Path(job.outputs[0].file)
        argv = build_argv(job, target, lora_paths(job.outputs[0].loras, fetch=False), quiet=True, device="cpu")
        report = json.loads(invoke(argv + ["--dry-run", "--json"]))
        files = report.get("files", [report])
        for o, f in zip(job.outputs, files):
            sizes[o.name] = int(f["bytes"])
    return sizes


def bound_bytes(o: Output) -> int:
    """A mix's --target-size in bytes (0 for --max-error, whose size is unknown until chosen)."""
    target = dict(o.options).get("target-size")
    return int(float(target) * 1e9) if target is not None else 0


def format_plan(plan: Plan) -> list[str]:
    lines = [f"recipe {plan.recipe.name} ({plan.recipe.path}): {len(plan.outputs)} outputs from {plan.source}, "
             f"into {plan.out}"]
    for o in plan.kept:
        lines.append(f"  keep   {o.name:<24} {o.file}  (unchanged since the manifest)")
    by_job = {o.name: job for job in plan.jobs for o in job.outputs}
    for o, reason in plan.todo:
        size = plan.planned_bytes.get(o.name)
        job = by_job[o.name]
        shared = f"; reads the source once with {len(job.outputs) - 1} other level(s)" if len(job.outputs) > 1 else ""
        bound = bound_bytes(o)
        shown = f"{size:,} bytes" if size is not None else (
            f"at most {bound:,} bytes, chosen when built" if bound else "size chosen when built")
        lines.append(f"  build  {o.name:<24} {o.file}  ({o.converter}, {shown}; {reason}{shared})")
    total = sum(plan.planned_bytes.get(o.name) or bound_bytes(o) for o, _ in plan.todo)
    lines.append(f"  {len(plan.todo)} to build ({total / 1e9:.2f} GB planned), {len(plan.kept)} kept")
    return lines


def run(plan: Plan, *, executor: str = "local", address: str | None = None, quiet: bool = False,
        say: Callable = print) -> dict:
    from .io import check_disk_space
    from .pipeline import progress

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

        if executor == "ray":
            run_ray(plan.jobs, plan.out, done, address=address, quiet=quiet)
        else:
            run_local(plan.jobs, plan.out, done, quiet=quiet)
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
            "order": [o.name for o in plan.recipe.outputs], "outputs": kept}


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
        return f"comfy-{options.get('format', 'nvfp4')}"
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
    from . import hub, recipes

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
