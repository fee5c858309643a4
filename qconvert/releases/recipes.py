"""Release recipes: a TOML file naming a source, the outputs to build, how to verify them and where to publish.

A recipe is parsed and checked whole before any work: every converter, option
and level is validated against the converter's own options (``converters``,
the same definition its command line is made from), so a recipe can ask for
exactly what ``qconvert to-*`` accepts and nothing else.
A mistake is one line naming the file, the line and the key.

    [recipe]
    name = "qwen-image-gguf"
    source = "Qwen/Qwen-Image"            # Hub id or path; recipe run --source overrides it

    [card]                                # the model card (qconvert publish)
    base_model = "Qwen/Qwen-Image"
    license = "apache-2.0"

    [hub]                                 # optional: publish's default target
    repo = "you/Qwen-Image-GGUF"

    [build]                               # where each output is computed
    device = "cpu"                        # cuda: every task asks Ray for a GPU
    cpus = 2

    [verify]                              # verify's options, for every output
    height = 512

    [calibrate]                           # optional: calibrate's options; one run per distinct LoRA set,
    synthetic = 8                         # read by the outputs that say calib (imatrix) = "recipe"

    [[output]]
    converter = "to-gguf"
    levels = ["Q8_0", "Q4_K_M"]           # one output per level, named by level
    file = "qwen-image-{level}.gguf"

    [[output]]
    name = "fp8"
    converter = "to-fp8"
    file = "qwen-image-fp8.safetensors"
    lora = ["hf://lightx2v/Qwen-Image-Lightning/Qwen-Image-Lightning-4steps-V1.0.safetensors:1.0"]
    verify = { steps = 4, schedule = "lightning" }

    [[output]]
    name = "nvfp4"
    converter = "to-comfy"
    format = "nvfp4"
    file = "qwen-image-nvfp4.safetensors"
    gate = [{ figure = "latents.psnr_db", min = 25 },              # judged on the 95% interval's bound
            { figure = "latents.psnr_db", max_gap = 3, to = "Q8_0" }]  # paired: loses at most 3 dB to Q8_0

Output options are the converter's long options without ``--`` (``keep``,
``activations``, ``precision`` ...).  Relative paths in options, LoRAs and the
source are taken from the current folder, as on the command line, and made
absolute (a Ray task runs in another folder, maybe on another machine).
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from qconvert.converters.base import Param
from qconvert.converters.registry import CONVERTERS as REGISTRY
from qconvert.core import untrusted
from qconvert.core.errors import QConvertError
from qconvert.releases import gates

# converter -> the file suffix its recipe outputs must have (the converters that write one file)
CONVERTERS = {c.name: c.suffix for c in REGISTRY.values() if c.suffix}
# values a release cannot record: a folder (not one file with one sha256), "all" (list the levels)
NOT_IN_RECIPES = {(c.name, option): value for c in REGISTRY.values() for option, value in c.not_in_recipes}
VERIFY_OPTIONS = {"enabled": bool, "height": int, "width": int, "steps": int, "cfg": float, "schedule": str,
                  "seed": int, "runtime": str, "decode": bool, "max_minutes": float, "dtype": str, "cache_gb": float,
                  "synthetic": int, "seeds": int, "embeds": tuple}
MAX_VERIFY_EMBEDS = 1024
VERIFY_CHOICES = {"schedule": ("qwen", "lightning"), "runtime": ("native", "dequantized"),
                  "dtype": ("float32", "bfloat16", "float16")}
# The option of each converter that takes a calibration file; "recipe" there means the recipe's own
# [calibrate] run (one per distinct LoRA set, shared by the outputs that ask for it)
CALIBRATION_OPTION = {c.name: c.calibration for c in REGISTRY.values() if c.calibration}
FROM_RECIPE = "recipe"
TABLES = {"recipe": {"name", "source", "description"},
          "card": {"base_model", "license", "pipeline_tag", "title", "language", "tags", "quantized_by"},
          "hub": {"repo", "private"},
          "build": {"device", "cpus"},
          "verify": set(VERIFY_OPTIONS)}
OUTPUT_KEYS = {"name", "converter", "file", "level", "levels", "lora", "verify", "gate"}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,199}")
REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
MAX_RECIPE_BYTES = 1 << 20
MAX_OUTPUTS = 256


class RecipeError(QConvertError):
    pass


@dataclass(frozen=True)
class Output:
    name: str
    converter: str
    file: str
    options: tuple  # ((cli option name, value), ...) in the recipe's order, values checked
    loras: tuple = ()  # "FILE[:STRENGTH]" or "hf://OWNER/REPO/PATH[:STRENGTH]"
    verify: tuple = ()  # ((verify option, value), ...): the recipe's [verify] with this output's overrides
    line: int = 0
    gates: tuple = ()  # gates.Gate, ...: what its verify figures must show before the release is published

    @property
    def level(self) -> str | None:
        return dict(self.options).get("level")

    @property
    def calibrated(self) -> bool:
        """Whether the output reads the recipe's [calibrate] statistics."""
        return dict(self.options).get(CALIBRATION_OPTION[self.converter]) == FROM_RECIPE

    def spec(self) -> dict:
        """What determines the output's bytes (with the source and qconvert's version): its manifest key."""
        return {"converter": self.converter, "file": self.file, "options": dict(self.options),
                "loras": list(self.loras)}

    def verify_settings(self) -> dict:
        return dict(self.verify)


@dataclass(frozen=True)
class Recipe:
    path: Path
    name: str
    source: str
    outputs: tuple
    card: dict = field(default_factory=dict)
    hub: dict = field(default_factory=dict)
    build: dict = field(default_factory=dict)
    description: str = ""
    sha256: str = ""
    calibrate: tuple = ()  # ((calibrate option, value), ...) of the [calibrate] table; () when there is none

    @property
    def device(self) -> str:
        return self.build.get("device", "cpu")

    def select(self, only: str | None) -> tuple:
        if not only:
            return self.outputs
        names = [n.strip() for n in only.split(",") if n.strip()]
        known = {o.name for o in self.outputs}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise RecipeError(f"{self.path}: --only {','.join(unknown)}: no such output; the recipe has "
                              f"{', '.join(sorted(known))}")
        return tuple(o for o in self.outputs if o.name in names)


# ------------------------------------------------------------------ parse

def load(path: str | Path) -> Recipe:
    path = Path(path)
    if path.suffix.lower() != ".toml":
        raise RecipeError(f"{path}: a recipe is a .toml file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read the recipe ({exc.strerror or exc})") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: {len(raw):,} bytes is not a recipe (at most {MAX_RECIPE_BYTES:,})")
    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text)
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses once per level of nested arrays and inline tables
        raise RecipeError(f"{path}: arrays or inline tables nested too deeply to be a recipe (a recipe nests "
                          "two or three levels)") from None
    return parse(data, path, text, hashlib.sha256(raw).hexdigest())


def parse(data: dict, path: Path, text: str = "", sha256: str = "") -> Recipe:
    where = _Locator(path, text)
    for key, value in data.items():
        if key in ("output", "calibrate"):
            continue
        if key not in TABLES:
            raise where.error(f"unknown table [{key}] (a recipe has {', '.join(sorted({*TABLES, 'output'}))})", key)
        if not isinstance(value, dict):
            raise where.error(f"{key} must be a table ([{key}])", key)
        for k in value:
            if k not in TABLES[key]:
                raise where.error(f"[{key}] has no key {k!r} (choose {', '.join(sorted(TABLES[key]))})", k,
                                  table=key)
    recipe = data.get("recipe", {})
    name = _string(where, recipe, "name", "recipe", required=True)
    if not NAME.fullmatch(name):
        raise where.error(f"name {name!r}: letters, digits, '.', '_', '+', '-'", "name", table="recipe")
    source = _string(where, recipe, "source", "recipe", required=True)
    card = _card(where, data.get("card", {}))
    hub = _hub(where, data.get("hub", {}))
    build = _build(where, data.get("build", {}))
    verify_defaults = _verify(where, data.get("verify", {}), table="verify")
    calibrate = data.get("calibrate")
    if calibrate is not None and not isinstance(calibrate, dict):
        raise where.error("calibrate must be a table ([calibrate])", "calibrate")
    calibration = tuple(_options(where, "calibrate", calibrate, table="calibrate")) if calibrate is not None else ()
    if calibrate is not None and not any(k in ("synthetic", "embeds") for k, _ in calibration):
        raise where.error("[calibrate] needs synthetic = N or embeds = [...] (the prompts to calibrate on)",
                          None, table="calibrate")
    raw_outputs = data.get("output")
    if not isinstance(raw_outputs, list) or not raw_outputs:
        raise where.error("no outputs: add [[output]] tables", None)
    if len(raw_outputs) > MAX_OUTPUTS:
        raise where.error(f"{len(raw_outputs)} [[output]] tables; at most {MAX_OUTPUTS}", None)
    outputs: list[Output] = []
    for index, raw in enumerate(raw_outputs):
        outputs += _outputs(where, raw, index, verify_defaults, calibrate is not None)
    by_name = {o.name: o for o in outputs}
    for o in outputs:
        for g in o.gates:
            problem = gates.reference_problem(g, o, by_name) if g.to else None
            if problem is None and o.verify_settings().get("enabled") is False:
                problem = f"gate on {g.figure}: the output is not verified (verify enabled = false)"
            if problem:
                raise RecipeError(f"{path}:{o.line}: output {o.name}: {problem}")
    seen: dict = {}
    for o in outputs:
        for kind, value in (("name", o.name), ("file", o.file)):
            if (kind, value) in seen:
                raise RecipeError(f"{path}:{o.line}: output {kind} {value!r} is used twice (also on line "
                                  f"{seen[kind, value]}); each output needs its own")
            seen[kind, value] = o.line
    return Recipe(path, name, source, tuple(outputs), card, hub, build,
                  _string(where, recipe, "description", "recipe") or "", sha256, calibration)


def _outputs(where, raw, index: int, verify_defaults: dict, has_calibrate: bool) -> list[Output]:
    at = dict(index=index)
    if not isinstance(raw, dict):
        raise where.error("each [[output]] must be a table", None, **at)
    converter = raw.get("converter")
    if not isinstance(converter, str) or converter not in CONVERTERS:
        raise where.error(f"converter {converter!r}: choose {', '.join(CONVERTERS)}", "converter", **at)
    file_template = raw.get("file")
    if not isinstance(file_template, str):
        raise where.error("give the output's file name (file = \"...\")", "file", **at)
    loras = raw.get("lora", [])
    if isinstance(loras, str):
        loras = [loras]
    if not isinstance(loras, list) or not all(isinstance(x, str) and x for x in loras):
        raise where.error("lora must be a list of \"FILE[:STRENGTH]\" strings", "lora", **at)
    verify = {**verify_defaults, **_verify(where, raw.get("verify", {}), index=index)}
    checks = gates.parse(raw["gate"]) if "gate" in raw else ()
    if isinstance(checks, str):
        raise where.error(checks, "gate", **at)
    options = _options(where, converter, {k: v for k, v in raw.items() if k not in OUTPUT_KEYS}, **at)
    wants = CALIBRATION_OPTION[converter]
    if dict(options).get(wants) == FROM_RECIPE and not has_calibrate:
        raise where.error(f'{wants} = "{FROM_RECIPE}" needs a [calibrate] table (the prompts to calibrate on)',
                          wants, **at)
    levels = raw.get("levels")
    if levels is not None:
        if converter != "to-gguf":
            raise where.error("levels is for to-gguf outputs", "levels", **at)
        if "level" in raw or "name" in raw:
            raise where.error("levels names one output per level: give neither level nor name with it", "levels",
                              **at)
        if not isinstance(levels, list) or not levels or not all(isinstance(x, str) for x in levels):
            raise where.error("levels must be a list of GGUF levels", "levels", **at)
        if "{level}" not in file_template:
            raise where.error("with levels, file must contain {level}", "file", **at)
        names = [_level(where, x, **at) for x in levels]
        return [Output(level, converter, _file(where, file_template.replace("{level}", level), converter, **at),
                       (*options, ("level", level)), tuple(loras), tuple(sorted(verify.items())),
                       where.line("levels", **at), checks) for level in names]
    if converter == "to-gguf":
        if "level" not in raw:
            raise where.error("a to-gguf output needs level (or levels)", None, **at)
        level = _level(where, raw["level"], key="level", **at)
        options = (*[(k, v) for k, v in options if k != "level"], ("level", level))
    name = raw.get("name", dict(options).get("level"))
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise where.error(f"output name {name!r}: give name = \"...\" (letters, digits, '.', '_', '+', '-')",
                          "name", **at)
    file = _file(where, file_template.replace("{level}", dict(options).get("level", "")), converter, **at)
    return [Output(name, converter, file, tuple(options), tuple(loras), tuple(sorted(verify.items())),
                   where.line("name" if "name" in raw else "converter", **at), checks)]


def converter_params(converter: str) -> dict[str, Param]:
    """The converter's options by recipe key (its long option without ``--``, '-' as '_' accepted too)."""
    return {p.name: p for p in REGISTRY[converter].params}


def _options(where, converter: str, raw: dict, **at) -> list:
    params = converter_params(converter)
    out = []
    for key, value in raw.items():
        option = key.replace("_", "-")
        p = params.get(option)
        if p is None:
            extra = "" if converter == "calibrate" else ", and name, file, lora, verify"
            raise where.error(f"{converter} has no option {key!r} (it takes {', '.join(sorted(params))}{extra})",
                              key, **at)
        if p.is_flag:
            if not isinstance(value, bool):
                raise where.error(f"{key} is a flag: true or false", key, **at)
            converted = value
        else:
            values = value if isinstance(value, list) and p.multiple else [value]
            if isinstance(value, list) and not p.multiple:
                raise where.error(f"{key} takes one value, not a list", key, **at)
            converted = []
            for v in values:
                if isinstance(v, (dict, list)) or isinstance(v, bool):
                    raise where.error(f"{key}: {v!r} is not a value {converter} --{option} takes", key, **at)
                if v == FROM_RECIPE and option == CALIBRATION_OPTION.get(converter):
                    converted.append(v)  # the recipe's own calibration, resolved when the jobs are made
                    continue
                try:
                    p.convert(v)
                except ValueError as exc:
                    raise where.error(f"{key}: {exc}", key, **at) from None
                if p.kind is Path:  # Ray tasks run elsewhere: no folder of ours to be relative to
                    v = str(Path(str(v)).expanduser().absolute())
                converted.append(v)
            converted = converted if p.multiple else converted[0]
        if (converter, option) in NOT_IN_RECIPES and converted == NOT_IN_RECIPES[converter, option]:
            raise where.error(f"{key} = {converted!r} is not available in recipes", key, **at)
        out.append((option, converted))
    return out


def _level(where, value, key="levels", **at) -> str:
    from qconvert.formats.gguf.policy import ALL, check_level

    try:
        level = check_level(str(value))
    except QConvertError as exc:
        raise where.error(str(exc), key, **at) from None
    if level == ALL:
        raise where.error("list the levels (levels = [...]) rather than all", key, **at)
    return level


def _file(where, name: str, converter: str, **at) -> str:
    if not FILE.fullmatch(name) or ".." in name:
        raise where.error(f"file {name!r}: a plain file name (letters, digits, '.', '_', '+', '-'), "
                          "written in the output folder", "file", **at)
    suffix = CONVERTERS[converter]
    if not name.endswith(suffix):
        raise where.error(f"file {name!r}: a {converter} output ends in {suffix}", "file", **at)
    return name


def _string(where, table: dict, key: str, name: str, required: bool = False) -> str | None:
    value = table.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise where.error(f"[{name}] {key} must be a non-empty string", key, table=name)
    return value


def _card(where, table: dict) -> dict:
    out = {}
    for key, value in table.items():
        if key in ("language", "tags"):
            if not isinstance(value, list) or not all(isinstance(x, str) and x for x in value):
                raise where.error(f"[card] {key} must be a list of strings", key, table="card")
        elif not isinstance(value, str) or not value:
            raise where.error(f"[card] {key} must be a non-empty string", key, table="card")
        if key == "pipeline_tag" and value not in ("text-to-image", "image-to-image"):
            raise where.error("[card] pipeline_tag: text-to-image or image-to-image", key, table="card")
        out[key] = value
    return out


def _hub(where, table: dict) -> dict:
    out = {}
    if "repo" in table:
        if not isinstance(table["repo"], str) or not REPO.fullmatch(table["repo"]):
            raise where.error("[hub] repo must be OWNER/NAME", "repo", table="hub")
        out["repo"] = table["repo"]
    if "private" in table:
        if not isinstance(table["private"], bool):
            raise where.error("[hub] private must be true or false", "private", table="hub")
        out["private"] = table["private"]
    return out


def _build(where, table: dict) -> dict:
    out = {}
    if "device" in table:
        device = table["device"]
        if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d{1,2})?", device):
            raise where.error("[build] device: cpu, cuda or cuda:N", "device", table="build")
        out["device"] = device
    if "cpus" in table:
        cpus = table["cpus"]
        if not isinstance(cpus, int) or isinstance(cpus, bool) or not 1 <= cpus <= 512:
            raise where.error("[build] cpus: a whole number from 1 to 512", "cpus", table="build")
        out["cpus"] = cpus
    return out


def _verify_value(key: str, kind: type, value):
    """(the value as a job uses it,) or what was wanted instead."""
    if kind is tuple:  # embeddings files: strings, made absolute as the command line would read them
        if isinstance(value, list) and 0 < len(value) <= MAX_VERIFY_EMBEDS and \
                all(isinstance(v, str) and v and "\0" not in v for v in value):
            return (tuple(str(Path(v).expanduser().absolute()) for v in value),)
        return f"a list of 1 to {MAX_VERIFY_EMBEDS} prompt embeddings files"
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if ok and kind in (int, float) and not (1 if key == "seeds" else 0) <= value <= 1e6:
        return "1 or more seeds per prompt" if key == "seeds" else f"a {kind.__name__} from 0 to 1000000"
    if key in VERIFY_CHOICES:
        return (value,) if ok and value in VERIFY_CHOICES[key] else " or ".join(VERIFY_CHOICES[key])
    return (value,) if ok else kind.__name__


def _verify(where, raw, *, table: str | None = None, index: int | None = None) -> dict:
    """Verify options: the recipe's [verify] table, or an output's ``verify = {...}`` overrides."""
    at = {"table": table} if table else {"index": index}

    def error(message, key):
        return where.error(message, key if table else "verify", **at)

    if not isinstance(raw, dict):
        raise error("verify must be a table of verify options", "verify")
    out = {}
    for key, value in raw.items():
        kind = VERIFY_OPTIONS.get(key)
        if kind is None:
            raise error(f"verify has no option {key!r} (choose {', '.join(sorted(VERIFY_OPTIONS))})", key)
        checked = _verify_value(key, kind, value)
        if isinstance(checked, str):
            raise error(f"verify {key} = {untrusted.shown(value, 80)}: want {checked}", key)
        out[key] = checked[0]
    return out


# ------------------------------------------------------- where in the file

class _Locator:
    """Line numbers for keys (tomllib gives none): the table's header, then the key's first line in it."""

    def __init__(self, path: Path, text: str):
        self.path = path
        self.lines = text.splitlines()

    def line(self, key: str | None, *, table: str | None = None, index: int | None = None) -> int:
        if table is None and index is None:  # a top-level key: the table of that name
            return (self._header(str(key), None) if key else None) or 1
        header = self._header(table, index)
        if header is None:
            return 1
        if key is None:
            return header
        pattern = re.compile(rf"\s*[\"']?{re.escape(str(key))}[\"']?\s*=")
        for n in range(header, len(self.lines)):  # the lines after the header, up to the next table
            if re.match(r"\s*\[", self.lines[n]):
                break
            if pattern.match(self.lines[n]):
                return n + 1
        return header

    def _header(self, table: str | None, index: int | None) -> int | None:
        if index is not None:
            count = -1
            for n, text in enumerate(self.lines):
                if re.match(r"\s*\[\[\s*output\s*\]\]", text):
                    count += 1
                    if count == index:
                        return n + 1
            return None
        if table is not None:
            for n, text in enumerate(self.lines):
                if re.match(rf"\s*\[\s*{re.escape(table)}\s*\]", text):
                    return n + 1
        return None

    def error(self, message: str, key: str | None, **at) -> RecipeError:
        return RecipeError(f"{self.path}:{self.line(key, **at)}: {message}")
