"""The package's shape, enforced: layers that import only downwards, no import circles, small modules,
and one registry that every consumer of a format or converter reads (docs/ARCHITECTURE.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "qconvert"
MAX_LINES = 600


def test_import_linter_contracts_hold():
    """import-linter's contracts (.importlinter): layers, sibling independence, no cycles; nothing ignored."""
    pytest.importorskip("importlinter", reason="import-linter is a test dependency (sh install.sh --test)")
    from importlinter.cli import lint_imports

    config = ROOT / ".importlinter"
    assert "ignore_imports" not in config.read_text()
    assert lint_imports(config_filename=str(config), no_cache=True) == 0


def test_every_module_is_short_enough_to_read_in_one_sitting():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_comfy_formats_are_read_from_the_registry_only():
    """Every consumer takes a ComfyUI format's facts from its registry entry: CLI choices, mix candidates,
    the loader's decoders, the writer's stored tensors and verify's native activations."""
    from qconvert.codecs.comfyui import registry
    from qconvert.converters.base import params
    from qconvert.converters.comfy import ComfyCommandOptions
    from qconvert.formats.comfyui import writer
    from qconvert.running import mix

    choices = next(p for p in params(ComfyCommandOptions) if p.name == "format").kind
    assert set(choices) == {"fp8", "mix"} | {f.name for f in registry.FORMATS.values() if f.in_to_comfy}
    assert set(mix.CANDIDATES) == {"bf16"} | {f.name for f in registry.FORMATS.values() if f.mix_candidate}
    for f in registry.FORMATS.values():
        entries = writer.layer_entries("L", (64, 512), f.name)
        assert entries[1:] == [(f"L.{s}", d, tuple(shape)) for s, d, shape in f.stored((64, 512))]


def test_recipes_and_the_cli_share_each_converters_options():
    """A recipe key is a converter's option as its command line spells it, from one definition."""
    import click

    from qconvert.cli import cli
    from qconvert.converters.catalog import ABOUT
    from qconvert.converters.registry import CONVERTERS
    from qconvert.releases.recipes import converter_params

    assert set(ABOUT) == set(CONVERTERS)
    for name, conv in CONVERTERS.items():
        command = cli.get_command(click.Context(cli), name)
        assert command.help.startswith(ABOUT[name])
        longs = {o[2:] for p in command.params for o in getattr(p, "opts", ()) if o.startswith("--")}
        assert set(converter_params(name)) <= longs
        assert set(converter_params(name)) == {p.name for p in conv.params}
