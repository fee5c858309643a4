"""The ``qconvert`` command line (click only): options -> options object -> converter -> print."""

from qconvert.cli.main import _printable, cli, main
from qconvert.cli.options import open_source

__all__ = ["cli", "main", "open_source", "_printable"]
