"""What a converter is: a typed options object, one function that plans or builds, and its parameters.

Every converter (``to-gguf``, ``to-fp8``, ``to-comfy``, ``to-svdquant``, ``bake-lora``, ``calibrate``) is
a ``Converter``: ``run(source, options, output, ...)`` returns a ``Result`` (the ``--json`` object, the text
a person reads, the paths written or planned).  Its options are a frozen dataclass whose fields say, through
``option(...)``, everything the command line and a recipe need to know about them (long name, type, choices,
help).  The CLI builds its click options from those fields and recipes check their keys against them, so an
option is declared once, here, and a release runs exactly what the command line runs, as a function call.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from qconvert.core.errors import QConvertError


class UsageError(QConvertError):
    """Options that do not go together: the CLI shows it as a usage error (exit 2)."""


@dataclass(frozen=True)
class Param:
    """One option of a converter, as its command line and its recipes spell it."""

    attr: str  # the options object's field
    name: str  # the long option and the recipe key, without "--": "target-size"
    kind: object = str  # str, int, float, bool (a flag), Path, or a tuple of choices
    default: object = None
    help: str = ""
    multiple: bool = False
    metavar: str | None = None
    required: bool = False
    show_default: bool = True

    @property
    def is_flag(self) -> bool:
        return self.kind is bool

    def convert(self, value) -> object:
        """A value from a recipe (or any text) as this option takes it; ValueError with click's wording."""
        text = str(value)
        if isinstance(self.kind, tuple):
            if text not in self.kind:
                raise ValueError(f"{text!r} is not one of {', '.join(repr(c) for c in self.kind)}.")
            return text
        if self.kind is int:
            try:
                return int(text)
            except ValueError:
                raise ValueError(f"{text!r} is not a valid integer.") from None
        if self.kind is float:
            try:
                return float(text)
            except ValueError:
                raise ValueError(f"{text!r} is not a valid float.") from None
        if self.kind is Path:
            if not text:
                raise ValueError("an empty path")
            return Path(text)
        return text


def option(default=None, *, name: str | None = None, kind: object = None, help: str = "", choices=None,
           multiple: bool = False, metavar: str | None = None, required: bool = False, show_default: bool = True):
    """A field of a converter's options dataclass that is also a command-line option and a recipe key."""
    spec = {"name": name, "kind": tuple(choices) if choices else kind, "help": help, "multiple": multiple,
            "metavar": metavar, "required": required, "show_default": show_default}
    if multiple:
        return field(default=tuple(default or ()), metadata={"param": spec})
    return field(default=default, metadata={"param": spec})


def params(options_type) -> list[Param]:
    """The options dataclass's parameters, in field order."""
    out = []
    for f in dataclasses.fields(options_type):
        spec = f.metadata.get("param")
        if spec is None:
            continue
        kind = spec["kind"] or {bool: bool, int: int, float: float}.get(type(f.default), str)
        out.append(Param(f.name, spec["name"] or f.name.replace("_", "-"), kind, f.default, spec["help"],
                         spec["multiple"], spec["metavar"], spec["required"], spec["show_default"]))
    return out


def make_options(options_type, values: dict):
    """The options object from ``{attr: value}`` (missing ones take their defaults; lists become tuples)."""
    fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return options_type(**fixed)


@dataclass(frozen=True)
class Source:
    """Where a converter's weights come from: a checkpoint (path or Hub id) seen through its LoRAs."""

    path: str
    loras: tuple = ()  # "FILE[:STRENGTH]", ...
    ignore_unmatched: bool = False
    allow_extra: bool = False
    device: str = "cpu"

    def open(self):
        """The checkpoint, seen through any LoRAs: every converter gets --lora for free."""
        from qconvert.core.checkpoint import open_checkpoint
        from qconvert.core.lora import with_loras

        ckpt = open_checkpoint(self.path, allow_extra=self.allow_extra)
        if not self.loras:
            return ckpt
        return with_loras(ckpt, self.loras, ignore_unmatched=self.ignore_unmatched, device=self.device)


@dataclass
class Result:
    report: dict  # what --json prints
    text: str  # what a person reads: the plan (dry run) or what was written and how to load it
    paths: list = field(default_factory=list)  # the files written (or planned), in the order of the outputs


def silent(message: str) -> None:
    pass


@dataclass(frozen=True)
class Converter:
    """One command that writes a file: its options, its function, and what releases need to know of it."""

    name: str  # the command: "to-gguf"
    options: type  # the options dataclass
    run: Callable[..., Result]  # run(source, options, output, *, dry_run, quiet, echo) -> Result
    summary: str  # the command's help text (first line: what it makes)
    suffix: str | None = None  # a recipe output's file suffix; None: not a recipe output
    calibration: str | None = None  # the option that reads a calibration file ("recipe" in a recipe)
    not_in_recipes: tuple = ()  # ((option name, value), ...) a release cannot record (a folder, "all")

    @property
    def params(self) -> list[Param]:
        return params(self.options)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)
