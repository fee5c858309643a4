"""The ``qconvert`` group.  The converters' commands are made when first asked for (``Commands``)."""

from __future__ import annotations

import click

from qconvert import __version__
from qconvert.cli.options import debug_option


class Commands(click.Group):
    """``qconvert``'s commands.  The converters' commands are made when first asked for: their options come
    from the converters (``cli.convert``), whose modules import torch, which takes seconds; ``qconvert --help``
    and the other commands start without it."""

    listing = False

    def list_commands(self, ctx) -> list[str]:
        from qconvert.converters.catalog import ABOUT

        return sorted({*super().list_commands(ctx), *ABOUT})

    def get_command(self, ctx, name: str):
        from qconvert.converters.catalog import ABOUT

        found = super().get_command(ctx, name)
        if found is not None or name not in ABOUT:
            return found
        if self.listing:  # a line of ``qconvert --help``: the converter's own paragraph, nothing imported
            return click.Command(name, help=ABOUT[name])
        from qconvert.cli.convert import converter_command

        found = converter_command(name)
        self.add_command(found)
        return found

    def format_commands(self, ctx, formatter) -> None:
        self.listing = True
        try:
            super().format_commands(ctx, formatter)
        finally:
            self.listing = False


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="qconvert")
@debug_option
def cli() -> None:
    """Quantize Qwen-Image transformers into files that load everywhere."""
