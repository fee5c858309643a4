"""LoRA merging: a view over a source whose ``load`` returns the merged weights.

``with_loras(source, ["lightning.safetensors:1.0", ...])`` reads and checks
every LoRA header up front and maps each key onto a model tensor; a key that
maps nowhere, a shape that does not fit or an adapter we cannot merge is an
error before any conversion starts.  The view then has the source's interface
(``names``, ``shapes``, ``load`` ...), so every converter gets ``--lora`` for
free, and ``load(name)`` reads only that tensor and the factors aimed at it:

    W' = W + Σ strength · (alpha / rank) · (up @ down)      (float32, rounded once)

with ``alpha/rank = 1`` when a LoRA has no ``.alpha`` (the rule ComfyUI and
diffusers agree on, ``fp8-lora-sampler.md`` §7.5).  Full differences
(``.diff``/``.diff_b``) add ``strength · diff``.

Key styles seen for Qwen-Image (§7.2-7.4) all reduce to ``PREFIX + module +
SUFFIX``.  Instead of re-inserting dots into kohya's flattened names with a
list of protected n-grams (which breaks on any name the list forgets), the
table of aliases is built from the model's real module names, so every
flattened name maps back exactly.

``qconvert.converters.bake`` writes the merged model as safetensors in the source's
dtype (BF16 for the official weights) and layout (``qconvert bake-lora``).
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from qconvert.core import untrusted
from qconvert.core.checkpoint import FLOAT_DTYPES, TensorReader, read_safetensors_header, refuse_pickle
from qconvert.core.errors import CheckpointError, QConvertError
from qconvert.core.io import file_sha256
from qconvert.core.models import qwen_image as qi
from qconvert.core.pipeline import parse_device

# Key prefixes that come before a dotted module name ("transformer_blocks.0.attn.to_q"):
# bare (lightx2v, DiffSynth), diffusers, ComfyUI / ai-toolkit, PEFT's save_pretrained.
DOTTED_PREFIXES = ("", "transformer.", "diffusion_model.", "base_model.model.")
# Key prefixes that come before a flattened one ("transformer_blocks_0_attn_to_q"):
# kohya / musubi-tuner, SimpleTuner's LyCORIS.
FLAT_PREFIXES = ("lora_unet_", "lycoris_")

# Every suffix runtimes accept (ComfyUI ``weight_adapter/lora.py`` and ``lora.py``),
# and which part of a LoRA it holds.  "up" is B (out × rank), "down" is A (rank × in).
SUFFIXES = (
    (".lora_up.weight", "up"), (".lora_down.weight", "down"),
    (".lora_B.weight", "up"), (".lora_A.weight", "down"),
    (".lora_B.default.weight", "up"), (".lora_A.default.weight", "down"),
    (".lora.up.weight", "up"), (".lora.down.weight", "down"),
    ("_lora.up.weight", "up"), ("_lora.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"), (".lora_linear_layer.down.weight", "down"),
    (".lora_B", "up"), (".lora_A", "down"),
    (".alpha", "alpha"),
    (".diff", "diff"), (".w_norm", "diff"),
    (".diff_b", "diff_b"), (".b_norm", "diff_b"),
)
# Adapters whose merge is not W + up@down; merging just their up/down would be wrong.
UNSUPPORTED = (
    ("dora_scale", "DoRA"), ("lora_magnitude_vector", "DoRA"), ("lora_mid", "LoCon/Tucker"),
    ("hada_", "LoHa"), ("lokr_", "LoKr"), ("oft_", "OFT"), (".reshape_weight", "reshape"),
    (".set_weight", "set-weight"),
)
TEXT_ENCODER_PREFIXES = ("lora_te", "lycoris_te", "text_encoder", "te.", "te_")

_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


# ------------------------------------------------------------------ specs

@dataclass(frozen=True)
class LoraSpec:
    path: Path
    strength: float = 1.0


def parse_spec(spec) -> LoraSpec:
    """``FILE[:STRENGTH]`` or ``(path, strength)``.

    Paths may contain ':', so the text after the last ':' is a strength only
    when it reads as a number (and the whole text is not an existing file).
    """
    if isinstance(spec, LoraSpec):
        return LoraSpec(Path(spec.path), _strength(spec.strength, spec))
    if isinstance(spec, (tuple, list)):
        if len(spec) != 2:
            raise QConvertError(f"LoRA {spec!r}: give (path, strength)")
        return LoraSpec(Path(spec[0]), _strength(spec[1], spec))
    text = str(spec)
    head, sep, tail = text.rpartition(":")
    if sep and head and _FLOAT.match(tail.strip()) and not Path(text).is_file():
        return LoraSpec(Path(head), _strength(tail, text))
    return LoraSpec(Path(text), 1.0)


def _strength(value, spec) -> float:
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise QConvertError(f"LoRA {spec}: strength {value!r} is not a number (use FILE:0.8)") from None
    if not math.isfinite(s):
        raise QConvertError(f"LoRA {spec}: strength must be a finite number, not {value!r}")
    return s


# ------------------------------------------------------------- key mapping

@dataclass(frozen=True)
class Patch:
    """One LoRA's change to one model tensor."""

    target: str  # model tensor name
    keys: tuple  # (up, down) for a low-rank pair, (diff,) for a full difference
    scale: float = 1.0  # alpha / rank (1 for a full difference)
    rank: int = 0  # 0 for a full difference

    @property
    def is_low_rank(self) -> bool:
        return len(self.keys) == 2


def module_table(names: Iterable[str]) -> dict[str, dict[str, str]]:
    """Model module → {"weight": name, "bias": name}, asking the model map."""
    modules: dict[str, dict[str, str]] = {}
    for name in names:
        if not qi.is_known(name):
            continue  # tensors outside the model (--allow-extra) take no LoRA
        info = qi.describe(name)
        if info.role is qi.Role.MARKER:
            continue
        slot = "bias" if info.role is qi.Role.BIAS else "weight"
        modules.setdefault(info.module, {})[slot] = name
    return modules


def alias_table(modules: Iterable[str]) -> dict[str, str]:
    """Every LoRA key stem that names a module, in every style, → that module."""
    aliases: dict[str, str] = {}
    for module in modules:
        flat = module.replace(".", "_")
        for alias in [p + module for p in DOTTED_PREFIXES] + [p + flat for p in FLAT_PREFIXES]:
            other = aliases.setdefault(alias, module)
            if other != module:  # would make kohya names ambiguous; the model map has none
                raise AssertionError(f"LoRA key {alias} would name both {other} and {module}")
    return aliases


def split_key(key: str) -> tuple[str, str] | None:
    """``(stem, part)`` for a LoRA key, or None when its suffix is none we know."""
    for suffix, part in SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], part
    return None


def unsupported_kind(key: str) -> str | None:
    return next((kind for marker, kind in UNSUPPORTED if marker in key), None)


@dataclass
class Resolution:
    """What one LoRA file's keys mean for this model."""

    patches: list = field(default_factory=list)  # Patch, alpha still unread (scale from rank only)
    alphas: dict = field(default_factory=dict)  # target weight name → its alpha key
    unmatched: list = field(default_factory=list)  # keys naming nothing in the model
    errors: list = field(default_factory=list)  # always fatal: shapes, malformed pairs, unsupported adapters


def resolve(tensors: dict, model_shapes: dict, modules: dict, aliases: dict) -> Resolution:
    """Map one LoRA's header (key → TensorMeta) onto the model.  Reads no data."""
    res = Resolution()
    groups: dict[str, dict[str, str]] = {}
    for key in tensors:
        kind = unsupported_kind(key)
        if kind:
            res.errors.append(f"{key} is a {kind} tensor; only plain LoRA (up/down, A/B) and .diff can be merged")
            continue
        split = split_key(key)
        module = aliases.get(split[0]) if split else None
        if module is None:
            res.unmatched.append(key)
            continue
        part = split[1]
        group = groups.setdefault(module, {})
        if part in group:
            res.errors.append(f"{group[part]} and {key} both give {module} its {part}")
            continue
        group[part] = key
    for module, group in groups.items():
        res.errors.extend(_check_group(module, group, tensors, model_shapes, modules[module], res))
    return res


def _check_group(module, group, tensors, model_shapes, slots, res) -> list[str]:
    problems = []
    for part, key in group.items():
        dtype = tensors[key].dtype
        if part != "alpha" and dtype not in FLOAT_DTYPES:
            problems.append(f"{key} is {dtype}; LoRA tensors must be F32/BF16/F16")
        if part == "alpha" and tensors[key].numel != 1:
            problems.append(f"{key} has shape {list(tensors[key].shape)}; an alpha is one number")
    up, down = group.get("up"), group.get("down")
    weight = slots.get("weight")
    if (up is None) != (down is None):
        have, missing = ("up", "down") if up else ("down", "up")
        problems.append(f"{group[have]} has no matching {missing} factor")
    elif up is not None:
        u, d = tensors[up].shape, tensors[down].shape
        if len(u) != 2 or len(d) != 2 or u[1] != d[0] or d[0] == 0:
            problems.append(f"{module}: up {list(u)} and down {list(d)} are not a rank-r pair")
        elif d[0] > min(u[0], d[1]):
            # Past full rank a LoRA only multiplies the merge's work (out x rank x in).
            problems.append(f"{module}: rank {d[0]:,} exceeds the layer's full rank {min(u[0], d[1]):,}")
        elif weight is None or (u[0], d[1]) != tuple(model_shapes[weight]):
            want = list(model_shapes[weight]) if weight else "no weight"
            problems.append(f"{module}: LoRA makes [{u[0]}, {d[1]}] but the model has {want} "
                            "(a LoRA for another model?)")
        else:
            res.patches.append(Patch(weight, (up, down), 1.0, d[0]))
            if "alpha" in group:
                res.alphas[weight] = group["alpha"]
    if "alpha" in group and up is None:
        problems.append(f"{group['alpha']} has no lora_up/lora_down pair to scale")
    for part, slot in (("diff", "weight"), ("diff_b", "bias")):
        if part not in group:
            continue
        target, shape = slots.get(slot), tensors[group[part]].shape
        if target is None or tuple(shape) != tuple(model_shapes[target]):
            want = list(model_shapes[target]) if target else f"no {slot}"
            problems.append(f"{group[part]} has shape {list(shape)} but {module} has {want}")
        else:
            res.patches.append(Patch(target, (group[part],)))
    return problems


# ------------------------------------------------------------- LoRA files

class LoraFile:
    """One validated LoRA file: its patches, and lazy access to its tensors."""

    def __init__(self, spec: LoraSpec, header, resolution: Resolution):
        self.path = spec.path
        self.strength = spec.strength
        self.header = header
        self.ignored = resolution.unmatched
        self._reader = TensorReader()
        self._sha256: str | None = None
        self.patches = [self._with_alpha(p, resolution.alphas) for p in resolution.patches]

    def _with_alpha(self, patch: Patch, alphas: dict) -> Patch:
        key = alphas.get(patch.target) if patch.is_low_rank else None
        if key is None:
            return patch
        alpha = float(self.tensor(key).double().item())
        if not math.isfinite(alpha):
            raise CheckpointError(f"{self.path}: {key} is {alpha}; the LoRA file is damaged")
        return Patch(patch.target, patch.keys, alpha / patch.rank, patch.rank)

    def tensor(self, key: str) -> torch.Tensor:
        # qconvert's own positioned reads of the header it validated, not a
        # second parser (safetensors' mmap) that might judge the file differently.
        return self._reader.read(self.header.tensors[key])

    def delta(self, patch: Patch, device: torch.device) -> torch.Tensor:
        """strength · (alpha/rank) · up @ down (or strength · diff), float32 on ``device``."""
        factor = self.strength * patch.scale
        if patch.is_low_rank:
            up, down = (self.tensor(k).to(device=device, dtype=torch.float32) for k in patch.keys)
            return factor * (up @ down)
        return factor * self.tensor(patch.keys[0]).to(device=device, dtype=torch.float32)

    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return self._sha256

    def record(self, *, with_hash: bool = True) -> dict:
        """What output metadata says about this LoRA."""
        return {"file": untrusted.path_text(self.path.name), "sha256": self.sha256() if with_hash else "0" * 64,
                "strength": self.strength}

    def summary(self) -> dict:
        low_rank = [p for p in self.patches if p.is_low_rank]
        return {
            "file": str(self.path),
            "strength": self.strength,
            "keys": len(self.header.tensors),
            "ignored_keys": len(self.ignored),
            "ranks": sorted({p.rank for p in low_rank}),
            "alpha_over_rank": sorted({p.scale for p in low_rank}),
            "full_differences": len(self.patches) - len(low_rank),
            "tensors": sorted({p.target for p in self.patches}),
        }

    def close(self) -> None:
        self._reader.close()


def read_lora(spec: LoraSpec, model_shapes: dict, modules: dict,
              aliases: dict) -> tuple[LoraSpec, object, Resolution]:
    """Validate one LoRA's header and map its keys.  Reads no tensor data."""
    path = spec.path.expanduser()
    if not path.is_file():
        where = "no such file" if not path.exists() else "not a file"
        raise QConvertError(f"LoRA {path}: {where} (give FILE or FILE:STRENGTH, e.g. lightning.safetensors:1.0)")
    refuse_pickle(path)
    header = read_safetensors_header(path)
    return LoraSpec(path, spec.strength), header, resolve(header.tensors, model_shapes, modules, aliases)


def _check_all(files: list[tuple[LoraSpec, object, Resolution]], ignore_unmatched: bool,
               warn: Callable[[str], None]) -> None:
    """One error for everything wrong in every LoRA; warnings for what --ignore-unmatched allows."""
    fatal = []
    for spec, header, res in files:
        name = spec.path.name
        if res.errors:
            more = f" (and {len(res.errors) - 3} more)" if len(res.errors) > 3 else ""
            fatal.append(f"LoRA {name}: {'; '.join(res.errors[:3])}{more}")
        if res.unmatched and not ignore_unmatched:
            fatal.append(f"LoRA {name}: {_unmatched_text(res.unmatched)}; pass --ignore-unmatched to skip them")
        elif not res.errors and not res.patches:
            fatal.append(f"LoRA {name}: none of its {len(header.tensors)} keys match a weight of this model "
                         "(is it a LoRA for another model?)")
    if fatal:
        raise QConvertError("; ".join(fatal) + ". Nothing was written")
    for spec, _, res in files:
        if res.unmatched:
            warn(f"LoRA {spec.path.name}: ignoring {_unmatched_text(res.unmatched)}")


def _unmatched_text(keys: list[str]) -> str:
    shown = ", ".join(keys[:3]) + (f" (and {len(keys) - 3} more)" if len(keys) > 3 else "")
    te = sum(k.startswith(TEXT_ENCODER_PREFIXES) for k in keys)
    why = (f"; {te} of them are text-encoder keys (qconvert merges into the transformer only)" if te else "")
    return f"{len(keys)} key(s) match no Qwen-Image transformer weight: {shown}{why}"


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# ------------------------------------------------------------- the view

class LoraView:
    """A source with LoRAs merged on load.  Same interface as ``checkpoint.Checkpoint``."""

    def __init__(self, source, loras: list[LoraFile], device: torch.device):
        self.source = source
        self.loras = loras
        self.device = device
        self._patches: dict[str, list[tuple[LoraFile, Patch]]] = {}
        for lora in loras:
            for patch in lora.patches:
                self._patches.setdefault(patch.target, []).append((lora, patch))

    # --- what the source knows, unchanged
    config = property(lambda self: self.source.config)
    tensors = property(lambda self: self.source.tensors)
    metadata = property(lambda self: self.source.metadata)
    extra = property(lambda self: self.source.extra)
    path = property(lambda self: self.source.path)
    layout = property(lambda self: self.source.layout)
    variant = property(lambda self: self.source.variant)
    edits = property(lambda self: self.source.edits)
    config_source = property(lambda self: self.source.config_source)
    parameter_count = property(lambda self: self.source.parameter_count)
    nbytes = property(lambda self: self.source.nbytes)

    def names(self) -> list[str]:
        return self.source.names()

    def shapes(self) -> dict[str, tuple]:
        return self.source.shapes()

    def files(self) -> list[Path]:
        return self.source.files()

    def fingerprint(self) -> str:
        return self.source.fingerprint()

    @property
    def name(self) -> str:
        """The source's name plus each LoRA's, so outputs with and without LoRAs do not collide."""
        base = self.source.name
        tags = []
        for lora in self.loras:
            tag = re.sub(r"[^A-Za-z0-9.]+", "-", lora.path.stem).strip("-").lower() or "lora"
            tag = tag[len(base) + 1:] if tag.startswith(base + "-") else tag
            tags.append(tag if lora.strength == 1 else f"{tag}-x{lora.strength:g}")
        return "-".join([base, *tags])

    def patched_names(self) -> list[str]:
        """Tensors that at least one LoRA with non-zero strength changes."""
        return sorted(n for n, ps in self._patches.items() if any(lora.strength for lora, _ in ps))

    def patches_for(self, name: str) -> list[tuple[LoraFile, Patch]]:
        """The (LoRA, patch) pairs that change tensor ``name`` (strength 0 excluded)."""
        return [(lora, p) for lora, p in self._patches.get(name, ()) if lora.strength != 0]

    def load(self, name: str) -> torch.Tensor:
        """The source tensor with every LoRA aimed at it added in float32, rounded once to its dtype."""
        base = self.source.load(name)
        patches = self.patches_for(name)
        if not patches:
            return base  # untouched (strength 0 included): bit-identical to the source
        merged = base.to(device=self.device, dtype=torch.float32, copy=True)  # never alias the source's tensor
        for lora, patch in patches:
            merged += lora.delta(patch, self.device)
        return merged.to(base.dtype).cpu()

    def provenance(self, *, dry_run: bool = False) -> dict:
        """The source's, plus each LoRA's file, sha256 and strength; a dry run
        reads no LoRA data, so its hashes are equal-length zero placeholders."""
        info = dict(self.source.provenance(dry_run=dry_run))
        info["loras"] = [*info.get("loras", []), *(lora.record(with_hash=not dry_run) for lora in self.loras)]
        return info

    def close(self) -> None:
        for lora in self.loras:
            lora.close()
        self.source.close()

    def __enter__(self) -> "LoraView":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def with_loras(source, specs, *, ignore_unmatched: bool = False, device=None,
               warn: Callable[[str], None] = _warn) -> LoraView:
    """``source`` seen through LoRAs (``FILE[:STRENGTH]`` strings or ``(path, strength)`` pairs).

    Every header is read and every key mapped here, before any conversion:
    unmatched keys are an error (a warning with ``ignore_unmatched``), and
    shape mismatches, broken pairs and unsupported adapters always are.
    """
    if isinstance(specs, (str, Path, LoraSpec)):
        specs = [specs]
    specs = [parse_spec(s) for s in specs]
    dev = parse_device(device)
    if not specs:
        raise QConvertError("no LoRA given (use --lora FILE[:STRENGTH])")
    shapes = source.shapes()
    modules = module_table(source.names())
    aliases = alias_table(modules)
    checked = [read_lora(spec, shapes, modules, aliases) for spec in specs]
    _check_all(checked, ignore_unmatched, warn)
    # Alphas (a few bytes each) are read only once every file has proved sound.
    return LoraView(source, [LoraFile(*c) for c in checked], dev)
