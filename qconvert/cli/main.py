"""The ``qconvert`` command line: parse, call, report.  No conversion logic lives here."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from qconvert.cli import model as cli_model  # noqa: F401 - these two register their commands
from qconvert.cli import release as cli_release  # noqa: F401
from qconvert.cli.group import cli
from qconvert.cli.options import debug_option, echo, emit_json, quiet_option
from qconvert.core.errors import QConvertError


@cli.command("make-tiny")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--layers", default=3, show_default=True, help="Transformer blocks.")
@click.option("--heads", default=2, show_default=True, help="Attention heads.")
@click.option("--head-dim", default=128, show_default=True, help="Head dimension (multiple of 16).")
@click.option("--text-dim", default=256, show_default=True, help="Text-encoder hidden size (joint_attention_dim).")
@click.option("--seed", default=0, show_default=True, help="Weights seed.")
@click.option("--variant", type=click.Choice(["qwen-image", "edit", "edit-2511", "layered"]), default="qwen-image",
              show_default=True, help="edit: Edit / Edit-2509 (Qwen-Image's config; the pipeline class says Edit).")
@click.option("--single-file", is_flag=True, help="Write one ComfyUI-style .safetensors instead of a diffusers folder.")
@click.option("--full-size", is_flag=True, help="The real 60-layer, 20.4B-parameter layout (needs --sparse).")
@click.option("--sparse", is_flag=True, help="With --full-size: true headers, data left as file holes.")
@click.option("--vae", is_flag=True, help="Add a tiny vae/ (diffusers' AutoencoderKLQwenImage; needs diffusers), "
              "so verify decodes pixels.")
@quiet_option
@debug_option
def make_tiny_cmd(out, layers, heads, head_dim, text_dim, seed, variant, single_file, full_size, sparse, vae, quiet):
    """Write a test model: tiny and trained-looking, or full-size and sparse.

    \b
    qconvert make-tiny ./tiny-qwen
    qconvert make-tiny ./tiny-qwen --vae
    qconvert make-tiny ./qwen-full --full-size --sparse
    """
    from qconvert.core import tiny

    if vae and (single_file or full_size):
        raise click.UsageError("--vae adds a vae/ to a tiny diffusers repo; drop --single-file/--full-size")
    if full_size != sparse:
        raise click.UsageError("--full-size and --sparse go together (41 GB of real data is not a test model)")
    if full_size:
        if single_file:
            raise click.UsageError("--full-size writes the diffusers layout; drop --single-file")
        path = tiny.make_full_size_sparse(out, variant=variant)
    elif single_file:
        path = tiny.make_tiny_single_file(out, layers=layers, heads=heads, head_dim=head_dim, text_dim=text_dim,
                                          seed=seed, variant=variant)
    else:
        path = tiny.make_tiny(out, layers=layers, heads=heads, head_dim=head_dim, text_dim=text_dim, seed=seed,
                              variant=variant)
        if vae:
            tiny.add_tiny_vae(path, seed=seed)
    if not quiet:
        echo(f"wrote {path}")


@cli.command("inspect")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@debug_option
def inspect_cmd(path, as_json):
    """What a checkpoint or output contains (diffusers folder, .safetensors, .gguf).

    \b
    qconvert inspect ./tiny-qwen
    qconvert inspect qwen-image-Q4_K_M.gguf --json
    """
    from qconvert.formats.inspection import format_summary, inspect_path

    summary = inspect_path(path)
    if as_json:
        emit_json(summary)
    else:
        echo(format_summary(summary))


@cli.command("demo")
@click.option("--out", type=click.Path(path_type=Path), default=Path("qconvert-demo"), show_default=True,
              help="Folder for the tiny model and every output.")
@click.option("--no-reports", is_flag=True, help="Skip the verify report of each file (about half the time; the "
              "release still verifies its own files).")
@quiet_option
@debug_option
def demo_cmd(out, no_reports, quiet):
    """Make a tiny model and run every conversion on it, saying how to load each file."""
    from qconvert.releases.demo import run_demo

    run_demo(out, quiet=quiet, echo=echo, reports=not no_reports)


# The converters' commands are made from the converter registry when asked for (cli/convert.py, through
# group.Commands); sample and verify live in cli/model.py, recipe and publish in cli/release.py (importing
# them registered them on ``cli``).


def _printable(exc: BaseException) -> str:
    """An error message fit for one terminal line: names from a hostile file may hold
    control characters, lone surrogates or megabytes of text."""
    from qconvert.core.untrusted import shown

    return shown(str(exc), 2000)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        rv = cli.main(args=argv, prog_name="qconvert", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:  # usage errors: click's message, exit 2
        exc.show()
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        if debug:
            raise
        click.echo("error: interrupted; no output was left half-written", err=True)
        sys.exit(130)
    except QConvertError as exc:
        if debug:
            raise
        click.echo(f"error: {_printable(exc)}", err=True)
        sys.exit(1)
    except Exception as exc:  # a bug: say so in one line, keep the traceback for --debug
        if debug:
            raise
        click.echo(f"error: internal error ({type(exc).__name__}: {_printable(exc)}); rerun with --debug and "
                   "report it", err=True)
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)
