"""``qconvert recipe run`` and ``qconvert publish``: whole releases (registered on ``cli`` by cli.py)."""

from __future__ import annotations

from pathlib import Path

import click

from qconvert.cli.group import cli
from qconvert.cli.options import debug_option, echo, emit_json, quiet_option


@cli.group("recipe")
def recipe_group() -> None:
    """Whole releases from recipes (recipes/*.toml): build, verify, record, resume."""


@recipe_group.command("run")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--source", default=None, help="The source to build from (path or Hub id) instead of the recipe's.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="The release folder (files, reports/, manifest.json).  [default: ./RECIPE-NAME]")
@click.option("--only", default=None, metavar="NAME[,NAME]", help="Build only these outputs.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: one output after another here.  ray: each output a Ray task, sized by its plan.")
@click.option("--address", default=None, help="Ray: the cluster (HOST:PORT, ray://HOST:PORT or auto); "
              "without it a local Ray starts.")
@click.option("--dry-run", is_flag=True, help="Plan only: what would be built or kept, exact sizes.")
@click.option("--reproduce", is_flag=True, help="Build the recorded outputs (or --only some) again in a scratch "
              "folder and compare sha256 with the manifest, which records the result; exit 1 if any differs.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan/result as one JSON object on stdout.")
@quiet_option
@debug_option
def recipe_run_cmd(recipe, source, out, only, executor, address, dry_run, reproduce, as_json, quiet):
    """Build every output of RECIPE, verify each, and record it in OUT/manifest.json.

    A re-run keeps outputs whose manifest entry still matches the recipe, the source and the file on disk
    (size and sha256) and rebuilds the rest, saying why.  GGUF levels that share options read the source once.

    \b
    qconvert recipe run recipes/qwen-image-gguf.toml --out release/ --dry-run
    qconvert recipe run recipes/qwen-image-gguf.toml --source ./Qwen-Image --out release/
    qconvert recipe run recipes/nunchaku-qwen-image.toml --executor ray --address head-node:6379
    """
    from qconvert.core.errors import QConvertError
    from qconvert.releases import gates, recipes, release

    if address and executor != "ray":
        raise click.UsageError("--address is for --executor ray")
    if reproduce and (dry_run or executor != "local"):
        raise click.UsageError("--reproduce rebuilds here, one output after another: drop --dry-run and --executor")
    r = recipes.load(recipe)
    out = out or Path(r.name)
    say = (lambda m: None) if (quiet or as_json) else (lambda m: click.echo(m, err=True))
    plan = release.make_plan(r, source=source, out=out, only=only, say=say, quiet=quiet or as_json)
    if dry_run:
        if as_json:
            emit_json(release.summary(plan, None))
        else:
            echo("\n".join(release.format_plan(plan)))
            echo("dry run: nothing written")
        return
    if reproduce:
        record = release.reproduce(plan, quiet=quiet or as_json, say=say)
        if as_json:
            emit_json(release.summary(plan, record))
        elif not quiet:
            echo(f"{len(plan.kept)} output(s) rebuilt to the bytes {out}/manifest.json records (reproduced = true)")
        return
    if not (quiet or as_json):
        echo("\n".join(release.format_plan(plan)))
    record = release.run(plan, kind=executor, address=address, quiet=quiet or as_json, say=say)
    failed = gates.failed(record)
    if as_json:
        emit_json({**release.summary(plan, record), "failed_gates": failed})
    elif not quiet:
        echo(f"wrote {out}/manifest.json ({len(record['outputs'])} outputs); "
             + ("publish with: " if not failed else "publish refuses it until its gates pass (or --force): ")
             + f"qconvert publish {out} --repo OWNER/NAME")
    if failed:
        raise QConvertError(f"{out}: {len(failed)} gate(s) failed, recorded in manifest.json: {failed[0]}"
                            + (f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""))


@cli.command("publish")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--repo", default=None, metavar="OWNER/NAME", help="The Hub model repo [default: the recipe's [hub] repo].")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to main.")
@click.option("--dry-run", is_flag=True, help="Print the model card and the upload; touch no network, write nothing.")
@click.option("--require-reproduced", is_flag=True, help="Refuse unless every output was rebuilt to the same bytes "
              "(recipe run --reproduce).")
@click.option("--force", is_flag=True, help="Publish although a gate failed or an output has no verify report; the "
              "card says so.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan/result as one JSON object on stdout.")
@quiet_option
@debug_option
def publish_cmd(folder, repo, private, create_pr, dry_run, require_reproduced, force, as_json, quiet):
    """Write FOLDER/README.md (the model card) from FOLDER/manifest.json and upload the release to the Hub.

    The token comes from HF_TOKEN or `hf auth login`; it is never printed or written.  Re-running resumes
    an interrupted upload.

    \b
    qconvert publish release/ --repo you/Qwen-Image-GGUF --dry-run
    qconvert publish release/ --repo you/Qwen-Image-GGUF --private
    """
    from qconvert.core.errors import QConvertError
    from qconvert.releases import gates, hub, manifest
    from qconvert.releases.recipes import REPO

    say = (lambda m: None) if (quiet or as_json) else (lambda m: click.echo(m, err=True))
    m = manifest.read(folder, say=say, required=True)
    if not m["outputs"]:
        raise QConvertError(f"{folder}/manifest.json lists no outputs; nothing to publish")
    unproven = [name for name, e in m["outputs"].items() if e.get("reproduced") is not True]
    if require_reproduced and unproven:
        raise QConvertError(f"{folder}: {', '.join(unproven)} not rebuilt to the same bytes (--require-reproduced); "
                            "run qconvert recipe run RECIPE --out FOLDER --reproduce first")
    problems = gates.publish_problems(m)
    if problems and not force:
        raise QConvertError(f"{folder}: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1
                                                          else "") + "; publish refuses it (--force publishes, and "
                            "the card says so)")
    repo = repo or m.get("hub", {}).get("repo")
    if not repo:
        raise click.UsageError("give --repo OWNER/NAME (the recipe has no [hub] repo)")
    if not REPO.fullmatch(repo):
        raise click.UsageError(f"--repo {repo}: write OWNER/NAME")
    private = private or bool(m.get("hub", {}).get("private", False))
    card = hub.render_card(m, repo, forced=problems)
    ops = hub.operations(folder, m)
    if dry_run:
        if as_json:
            emit_json({"repo": repo, "private": private, "create_pr": create_pr, "card": card,
                       "operations": [{"path": p, "bytes": b if b >= 0 else len(card.encode())} for p, b in ops]})
            return
        echo(card)
        echo(f"--- would create {repo} ({'private' if private else 'public'}, if absent) and "
             f"{'open a pull request with' if create_pr else 'commit'}:")
        for path, size in ops:
            echo(f"  upload {path}  ({(size if size >= 0 else len(card.encode())):,} bytes)")
        echo("dry run: no network, nothing written")
        return
    token = hub.get_token()  # before anything is written: a missing token leaves the folder as it was
    hub.check_files(folder, m, say)
    hub.write_card(folder, card)
    url = hub.upload(folder, m, repo, private=private, create_pr=create_pr, token=token)
    if as_json:
        emit_json({"repo": repo, "url": url, "files": [p for p, _ in ops]})
    elif not quiet:
        echo(f"published {len(ops)} files to https://huggingface.co/{repo}" + (f" ({url})" if url else ""))
