"""The converter commands, made from the converter registry: each converter's options dataclass becomes
its click options, so the command line, recipes and releases share one definition."""

from __future__ import annotations

from pathlib import Path

import click

from qconvert.cli.options import converter_options, echo, emit_json
from qconvert.converters.base import Converter, Param, Source, UsageError, make_options, silent
from qconvert.converters.registry import CONVERTERS


def click_option(p: Param):
    """``p`` as a click option (the dataclass field's name is the callback's keyword)."""
    if p.is_flag:
        return click.option(f"--{p.name}", p.attr, is_flag=True, help=p.help)
    if isinstance(p.kind, tuple):
        kind = click.Choice(list(p.kind))
    elif p.kind is Path:
        kind = click.Path(path_type=Path)
    else:
        kind = p.kind
    return click.option(f"--{p.name}", p.attr, type=kind, default=p.default, multiple=p.multiple,
                        required=p.required, metavar=p.metavar, help=p.help,
                        show_default=p.show_default and p.default is not None and not p.multiple)


def command(conv: Converter) -> click.Command:
    def callback(source, output, dry_run, as_json, device, loras, ignore_unmatched, allow_extra, quiet, **values):
        src = Source(source, tuple(loras), ignore_unmatched, allow_extra, device)
        try:
            result = conv.run(src, make_options(conv.options, values), output, dry_run=dry_run,
                              quiet=quiet or as_json, echo=silent if quiet or as_json else echo)
        except UsageError as exc:  # options that do not go together: click's usage error, exit 2
            raise click.UsageError(str(exc)) from None
        if as_json:
            emit_json(result.report)
        elif dry_run or not quiet:
            echo(result.text)

    callback = converter_options(callback)  # after the converter's own options, as --help lists them
    for p in reversed(conv.params):
        callback = click_option(p)(callback)
    callback = click.argument("source")(callback)
    return click.command(conv.name, help=conv.summary)(callback)


def converter_command(name: str) -> click.Command:
    return command(CONVERTERS[name])
