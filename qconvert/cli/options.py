"""What every command shares: output helpers and the common options."""

from __future__ import annotations

import json
from pathlib import Path

import click


def echo(text: str = "") -> None:
    """Print a result line; paths that are not UTF-8 come out as \\xNN, never as an encoding error."""
    from qconvert.core.untrusted import unicode_text

    click.echo(unicode_text(str(text)))


def emit_json(obj) -> None:
    echo(json.dumps(obj, indent=2, default=str))


def debug_option(f):
    # Accepted on every command as well as before it; main() reads it from argv
    # so that even errors raised while parsing honour it.
    return click.option("--debug", is_flag=True, expose_value=False, help="Show tracebacks.")(f)


def quiet_option(f):
    return click.option("--quiet", "-q", is_flag=True, help="No progress bars or chatter.")(f)


def converter_options(f):
    """The options every converter shares (DESIGN.md): -o, --dry-run, --json, --device, --lora, ..."""
    for opt in reversed([
        click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
                     help="Output file (or folder, for several files)."),
        click.option("--dry-run", is_flag=True, help="Plan only: print types and exact sizes, write nothing."),
        click.option("--json", "as_json", is_flag=True, help="Print the plan/result as one JSON object on stdout."),
        click.option("--device", default="cpu", show_default=True, help="Where to compute: cpu, cuda, cuda:1 ..."),
        click.option("--lora", "loras", multiple=True, metavar="FILE[:STRENGTH]",
                     help="Merge a LoRA before converting (repeatable)."),
        click.option("--ignore-unmatched", is_flag=True, help="Warn instead of failing on LoRA keys that match no weight."),
        click.option("--allow-extra", is_flag=True, help="Carry tensors outside the model through unchanged."),
        quiet_option,
        debug_option,
    ]):
        f = opt(f)
    return f


def open_source(source: str, *, loras=(), ignore_unmatched: bool = False, allow_extra: bool = False,
                device: str | None = None):
    """The checkpoint, seen through any LoRAs (``converters.base.Source``)."""
    from qconvert.converters.base import Source

    return Source(source, tuple(loras), ignore_unmatched, allow_extra, device).open()
