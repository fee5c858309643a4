"""``manifest.json``: what a release folder holds, and whether each file is still what was built.

One entry per output: file, bytes, sha256, converter, format and options,
LoRAs, the source's fingerprint, qconvert's version, the verify figures, and
``key``: a digest of everything that decides the file's bytes.  The manifest
is rewritten atomically after every output, so a crash loses at most the
outputs in progress.  It carries a digest of its own content: a hand edit is
noticed, said, and every entry is then trusted only as far as its file's size
and sha256 confirm it (which ``check`` always does anyway).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

from qconvert.core import untrusted
from qconvert.core.errors import CheckpointError, QConvertError
from qconvert.core.io import atomic_output, file_sha256

NAME = "manifest.json"
SCHEMA = 1
MAX_BYTES = 16 << 20
LIMITS = untrusted.Limits(objects=200_000, items=2_000_000)
ENTRY_FIELDS = {"file": str, "bytes": int, "sha256": str, "converter": str, "format": str, "key": str,
                "options": dict, "loras": list, "source": dict, "qconvert_version": str}


def canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def digest(manifest: dict) -> str:
    return hashlib.sha256(canonical({k: v for k, v in manifest.items() if k != "digest"}).encode()).hexdigest()


def write(folder: Path, manifest: dict) -> None:
    body = {k: v for k, v in manifest.items() if k != "digest"}
    body["digest"] = digest(body)
    text = json.dumps(body, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    with atomic_output(Path(folder) / NAME) as f:
        f.write(text.encode("utf-8"))


def read(folder: Path, *, say: Callable[[str], None] = lambda m: None, required: bool = False) -> dict | None:
    """The folder's manifest with only well-formed entries; None when there is none (an error if required)."""
    path = Path(folder) / NAME
    if not path.exists():
        if required:
            raise QConvertError(f"{path}: no manifest; build the release with qconvert recipe run first")
        return None
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise QConvertError(f"{path}: {size:,} bytes is too large for a manifest (at most {MAX_BYTES:,}); "
                            "move it away to rebuild from scratch")
    try:
        data = untrusted.load_json(path.read_bytes(), str(path), LIMITS)
    except CheckpointError as exc:
        raise QConvertError(f"{exc}; move it away to rebuild from scratch") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("outputs"), dict):
        raise QConvertError(f"{path}: not a qconvert manifest (schema {SCHEMA}); move it away to rebuild")
    problem = top_problem(data)
    if problem:
        raise QConvertError(f"{path}: {problem}; move it away to rebuild")
    if data.get("digest") != digest(data):
        say(f"{path} was edited by hand (its digest does not match); every entry is checked against its file")
    calibrations = data.get("calibrations", {})
    if not isinstance(calibrations, dict):
        raise QConvertError(f"{path}: calibrations must be an object; move it away to rebuild")
    data["calibrations"] = {}
    for file, entry in calibrations.items():
        problem = calibration_problem(file, entry)
        if problem:
            say(f"{path}: calibration {untrusted.shown(file, 80)} is malformed ({problem}); it will be made again")
            continue
        data["calibrations"][file] = entry
    outputs = {}
    for name, entry in data["outputs"].items():
        problem = entry_problem(entry)
        if problem:
            say(f"{path}: entry {untrusted.shown(name, 64)} is malformed ({problem}); it will be rebuilt")
            continue
        outputs[name] = entry
    data["outputs"] = outputs
    return data


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(x, str) for x in value)


def top_problem(data: dict) -> str | None:
    """What the card and the resume read outside the entries, typed (a hand edit may break any of it)."""
    recipe, source = data.get("recipe"), data.get("source")
    if not isinstance(recipe, dict) or not all(isinstance(recipe.get(k), str) for k in ("name", "file")):
        return "recipe must hold a name and a file"
    if not isinstance(recipe.get("description", ""), str):
        return "recipe description must be text"
    if not isinstance(data.get("qconvert_version"), str):
        return "qconvert_version must be text"
    if not isinstance(source, dict) or not isinstance(source.get("id"), str):
        return "source must hold an id"
    if not _strings(data.get("order", [])):
        return "order must be a list of output names"
    for table in ("card", "hub"):
        value = data.get(table, {})
        if not isinstance(value, dict):
            return f"{table} must be an object"
        for key, v in value.items():
            if not (isinstance(v, str) or _strings(v) or (key == "private" and isinstance(v, bool))):
                return f"{table}.{untrusted.shown(key, 40)} must be text or a list of text"
    return None


def calibration_problem(file: str, entry) -> str | None:
    if not (file.startswith("calibration/") and _plain_name(file[len("calibration/"):])):
        return "not calibration/NAME"
    if not isinstance(entry, dict) or entry.get("file") != file:
        return "not an object naming its file"
    for key, kind in (("key", str), ("sha256", str), ("bytes", int), ("loras", list), ("options", dict)):
        if not isinstance(entry.get(key), kind) or isinstance(entry.get(key), bool):
            return f"{key} is not a {kind.__name__}"
    if not _strings(entry["loras"]) or len(entry["sha256"]) != 64 or entry["bytes"] < 0:
        return "loras, sha256 or bytes out of range"
    return None


def entry_problem(entry) -> str | None:
    if not isinstance(entry, dict):
        return "not an object"
    for key, kind in ENTRY_FIELDS.items():
        value = entry.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return f"{key} is not a {kind.__name__}"
    if entry["bytes"] < 0 or len(entry["sha256"]) != 64:
        return "bytes or sha256 out of range"
    if not _plain_name(entry["file"]):
        return "file is not a plain file name"
    if not all(isinstance(x, dict) and isinstance(x.get("spec"), str) and isinstance(x.get("sha256"), str)
               for x in entry["loras"]):
        return "loras must be {spec, sha256} objects"
    if not all(isinstance(v, (str, int, float, bool)) or _strings(v) for v in entry["options"].values()):
        return "options must be values or lists of text"
    if "reproduced" in entry and not isinstance(entry["reproduced"], bool):
        return "reproduced must be true or false"
    report = entry.get("report")
    if report is not None and not (isinstance(report, str) and report.startswith("reports/")
                                   and _plain_name(report[len("reports/"):])):
        return "report must be reports/NAME"
    verify = entry.get("verify")
    if verify is not None:
        if not isinstance(verify, dict) or not isinstance(verify.get("settings", {}), dict):
            return "verify must be an object"
        for part in ("latents", "pixels", "weights"):
            figures = verify.get(part, {})
            if not isinstance(figures, dict) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in figures.values()):
                return f"verify.{part} must hold numbers"
        intervals = verify.get("intervals", {})
        if not isinstance(intervals, dict) or not all(
                isinstance(v, list) and len(v) == 2 and all(_number_or_null(x) for x in v) for v in intervals.values()):
            return "verify.intervals must map figures to [low, high]"
        if not isinstance(verify.get("samples", 1), int):
            return "verify.samples must be a whole number"
        pictures = verify.get("pictures", [])
        if not _strings(pictures) or not all(_plain_name(p) for p in pictures):
            return "verify.pictures must be file names"
    gates = entry.get("gates", [])
    if not isinstance(gates, list) or not all(
            isinstance(g, dict) and isinstance(g.get("passed"), bool) and isinstance(g.get("gate"), str)
            and isinstance(g.get("why") or "", str) for g in gates):
        return "gates must be verdicts {gate, passed, why}"
    return None


def _number_or_null(x) -> bool:
    return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool))


def _plain_name(name: str) -> bool:
    return bool(name) and len(name) <= 255 and "/" not in name and "\\" not in name and not name.startswith(".") \
        and name.isprintable()


def check(folder: Path, entry: dict, key: str, progress: Callable[[int], None] | None = None) -> str | None:
    """Why an output must be rebuilt (None: its file is exactly what the entry and the recipe say)."""
    if entry.get("key") != key:
        return "its recipe entry, the source, a LoRA file or qconvert changed"
    path = Path(folder) / entry["file"]
    if not path.is_file():
        return f"{entry['file']} is missing"
    size = os.path.getsize(path)
    if size != entry["bytes"]:
        return f"{entry['file']} changed on disk ({size:,} bytes, the manifest says {entry['bytes']:,})"
    if file_sha256(path, progress) != entry["sha256"]:
        return f"{entry['file']} changed on disk (its sha256 differs from the manifest's)"
    return None
