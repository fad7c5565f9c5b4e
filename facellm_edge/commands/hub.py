"""`facellm-edge pull`, `list`, `rm` and `push`: bundles as models you pull (facellm_edge.hub)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def _names(value: Optional[str], option: str) -> tuple[str, ...]:
    from facellm_edge.errors import UsageError

    if value is None:
        return ()
    names = tuple(v.strip() for v in value.split(","))
    if not all(names):
        raise UsageError(f"{option} {value!r}: an empty name in the list")
    return names


def _size(n: int) -> str:
    from facellm_edge.commands.export import fmt_bytes

    return fmt_bytes(n)


def pull_cmd(
    source: str = typer.Argument(..., help="Hub repo id (owner/name), https://huggingface.co/OWNER/NAME (or .../tree/REV), "
                                 "a local bundle folder or a file:// URL of one."),
    quant: Optional[str] = typer.Option(None, "--quant", "-q", help="LLM quants to fetch, comma-separated, or all "
                                        "(default: the one the runtime prefers: q4_0, else q4_k_m, q8_0, ...)."),
    vision: Optional[str] = typer.Option(None, "--vision", help="Vision encoders to fetch, comma-separated: int8, "
                                         "fp32 (ONNX) and/or mmproj (llama.cpp), or all (default: int8, else fp32)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub branch, tag or commit (default: main)."),
    alias: Optional[str] = typer.Option(None, "--as", help="A short name to pass to --bundle as well."),
) -> None:
    """Then `ask`/`run`/`serve --bundle NAME` use it offline. Pulling another --quant adds it to the same bundle."""
    from facellm_edge.hub import PullConfig, pull

    b = pull(PullConfig(source=source, quants=_names(quant, "--quant"), vision=_names(vision, "--vision"),
                        revision=revision, alias=alias))
    typer.echo(f"pulled {b.name}@{(b.revision or '')[:12]}: llm {','.join(b.quants)}, vision "
               f"{','.join(b.vision) or '-'} ({_size(b.bytes)}, every sha256 checked)\n  {b.root}\n"
               f"use it: facellm-edge ask photo.jpg \"How old does this person look?\" --bundle {b.alias or b.name}")


def list_cmd(
    json_out: bool = typer.Option(False, "--json", help="One JSON object per bundle, one per line."),
) -> None:
    from facellm_edge.hub import bundles_dir, cached_bundles
    from facellm_edge.hub.cache import interrupted_downloads

    found = cached_bundles()
    for repo, size in interrupted_downloads().items():  # on stderr: the table (or JSON lines) stays as it is
        typer.echo(f"unfinished download of {repo} ({_size(size)}, a pull that failed or was stopped): "
                   f"`facellm-edge rm {repo}` removes it", err=True)
    if json_out:
        for b in found:
            typer.echo(json.dumps(b.as_dict()))
        return
    if not found:
        typer.echo(f"no bundles in {bundles_dir()} (get one with `facellm-edge pull OWNER/NAME`)")
        return
    rows = [("NAME", "ALIAS", "REVISION", "FILES", "SIZE", "LLM", "VISION", "SOURCE")]
    for b in found:
        if b.problem:
            rows.append((b.name, "-", "-", "-", "-", "-", "-", f"unreadable: {b.problem}"))
            continue
        rows.append((b.name, b.alias or "-", (b.revision or "-")[:12], str(b.files), _size(b.bytes),
                     ",".join(b.quants) or "-", ",".join(b.vision) or "-", b.source))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])


def rm_cmd(
    names: list[str] = typer.Argument(..., help="Cached bundles to remove: repo id, alias or folder name."),
) -> None:
    """The runnable bundle and its downloads go (or what a failed pull of OWNER/NAME left); nothing is removed when
    one name is not in the cache."""
    from facellm_edge.hub import find_cached, remove_cached
    from facellm_edge.hub.cache import interrupted_download, remove_interrupted
    from facellm_edge.errors import InputError

    found = {n: find_cached(n) for n in names}
    partial = [n for n, b in found.items() if b is None and interrupted_download(n) is not None]
    unknown = [n for n, b in found.items() if b is None and n not in partial]
    if unknown:  # nothing is removed when one name is wrong
        raise InputError(f"no bundle named {unknown[0]} in the cache (see `facellm-edge list`); rm removes cached "
                         "bundles only, never a folder of yours")
    bundles = {n: b for n, b in found.items() if b is not None}
    once = {b.root: n for n, b in reversed(bundles.items())}  # a bundle named twice (its id and its alias) goes once
    for n in dict.fromkeys(once[b.root] for b in bundles.values()):
        b = remove_cached(n)
        typer.echo(f"removed {b.name} ({_size(b.bytes)})")
    for n in dict.fromkeys(partial):
        typer.echo(f"removed the unfinished download of {n} ({_size(remove_interrupted(n))})")


def push_cmd(
    bundle: Path = typer.Argument(..., help="Bundle folder (from `facellm-edge export`)."),
    repo: str = typer.Argument(..., help="Hub repo OWNER/NAME (created if needed)."),
    results: Optional[Path] = typer.Option(None, "--results", help="A `facellm-edge bench --bundle` results.json: "
                                           "its measured speed goes into the model card."),
    private: bool = typer.Option(False, "--private", help="Create the repo private."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to commit to (default: main)."),
    message: Optional[str] = typer.Option(None, "--message", "-m", help="Commit message."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the bundle, print the model card and the files "
                                 "that would be uploaded; upload nothing."),
) -> None:
    """Every hash is checked first; only the manifest, its files and the card go up. Needs `hf auth login`."""
    from facellm_edge.hub.push import PushConfig, push, upload_plan

    cfg = PushConfig(bundle=bundle, repo=repo, results=results, private=private, revision=revision,
                     message=message)
    if dry_run:
        plan = upload_plan(cfg)
        typer.echo(plan.card)
        typer.echo(f"would upload to {repo} ({_size(plan.bytes())}):")
        for rel in plan.paths():
            typer.echo(f"  {rel}")
        return
    plan, url = push(cfg)
    typer.echo(f"pushed {len(plan.files)} files ({_size(plan.bytes())}) to {repo}: {url}\n"
               f"on the device: facellm-edge pull {repo}")
