"""``facellm-edge data``: build FairFaceGPT-style QA data with an LLM, or import the published dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from facellm_edge.commands.defaults import field_default
from facellm_edge.data.backends import LlamaConfig, OpenAIConfig
from facellm_edge.data.build import BuildConfig
from facellm_edge.errors import UsageError

data_app = typer.Typer(no_args_is_help=True)

_BUILD, _OPENAI = BuildConfig(), OpenAIConfig()  # the defaults of the options below


@data_app.command("build")
def build(
    labels: Path = typer.Option(..., "--labels", help="FairFace label CSV (file,age,gender,race[,...])."),
    images: Path = typer.Option(..., "--images", help="Folder the CSV's 'file' paths are relative to."),
    out: Path = typer.Option(..., "--out", help="Output JSONL (appended to; rerun to resume)."),
    backend: str = typer.Option("openai", "--backend", help="openai (any OpenAI-compatible endpoint) or llama."),
    model: str = typer.Option(_OPENAI.model, "--model", help="Model name sent to the OpenAI-compatible endpoint."),
    base_url: str = typer.Option(_OPENAI.base_url, "--base-url", help="OpenAI-compatible API base URL."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env",
                                    help="Environment variable holding the API key (keys are never flags)."),
    gguf: Optional[Path] = typer.Option(None, "--gguf", help="Local chat GGUF for --backend llama."),
    threads: Optional[int] = typer.Option(field_default(LlamaConfig, "n_threads"), "--threads", min=1,
                                          help="llama.cpp threads (--backend llama)."),
    families: Optional[str] = typer.Option(None, "--families", help="Comma-separated prompt families (default all)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Use only the first N images of the CSV."),
    workers: int = typer.Option(_BUILD.workers, "--workers", help="Concurrent requests."),
    rpm: float = typer.Option(_BUILD.rpm, "--rpm", help="Max requests per minute (0 = unlimited)."),
    max_attempts: int = typer.Option(_BUILD.max_attempts, "--max-attempts",
                                     help="Tries per request on 429/5xx/connection errors."),
    backoff: float = typer.Option(_BUILD.backoff_base_s, "--backoff",
                                  help="First retry delay in seconds (doubles each retry)."),
    max_invalid: int = typer.Option(_BUILD.max_invalid, "--max-invalid",
                                    help="Tries per item when replies fail validation."),
    max_tokens: int = typer.Option(_OPENAI.max_tokens, "--max-tokens", help="Max tokens per reply (both backends)."),
    temperature: float = typer.Option(_OPENAI.temperature, "--temperature", help="Sampling temperature (both "
                                      "backends)."),
    timeout: float = typer.Option(_OPENAI.timeout_s, "--timeout", help="HTTP timeout per request (s)."),
    json_mode: bool = typer.Option(_OPENAI.json_mode, "--json-mode/--no-json-mode",
                                   help="Send response_format=json_object (turn off for endpoints that reject it)."),
    price_in: float = typer.Option(0.0, "--price-in", help="USD per 1M prompt tokens (for the cost estimate)."),
    price_out: float = typer.Option(0.0, "--price-out", help="USD per 1M completion tokens."),
) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from facellm_edge.data.build import BuildStats, JsonlStore, build_dataset
    from facellm_edge.data.labels import check_images, read_labels
    from facellm_edge.data.prompts import FAMILIES, FAMILY_NAMES, get_family
    from facellm_edge.errors import RuntimeStageError

    config = BuildConfig(workers=workers, rpm=rpm, max_attempts=max_attempts, backoff_base_s=backoff,
                         backoff_max_s=max(_BUILD.backoff_max_s, backoff), max_invalid=max_invalid)
    if families:
        names = [n.strip() for n in families.split(",") if n.strip()]
        unknown = [n for n in names if n not in FAMILY_NAMES]
        if unknown:
            raise UsageError(f"unknown prompt family {unknown[0]!r}; choose from {', '.join(FAMILY_NAMES)}")
        fams = tuple(get_family(n) for n in names)
    else:
        fams = FAMILIES
    rows = read_labels(labels)
    if limit:
        rows = rows[:limit]
    check_images(rows, images)
    JsonlStore(out).recover()  # refuse a file it did not write (or repair its own torn line) before any model loads

    if backend == "openai":
        from facellm_edge.data.backends import OpenAIBackend, api_key_from_env

        if gguf is not None:
            raise UsageError("--gguf is for --backend llama")
        llm = OpenAIBackend(OpenAIConfig(base_url=base_url, model=model, timeout_s=timeout, max_tokens=max_tokens,
                                         temperature=temperature, json_mode=json_mode), api_key_from_env(api_key_env))
    elif backend == "llama":
        from facellm_edge.data.backends import LlamaBackend

        if gguf is None:
            raise UsageError("--backend llama needs --gguf MODEL.gguf")
        llm = LlamaBackend(LlamaConfig(gguf=gguf, max_tokens=max_tokens, temperature=temperature, n_threads=threads))
    else:
        raise UsageError(f"unknown --backend {backend!r}; choose openai or llama")

    console = Console(stderr=True)

    def cost(s: BuildStats) -> float:
        return (s.prompt_tokens * price_in + s.completion_tokens * price_out) / 1e6

    with Progress(TextColumn("[bold]data build"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  TextColumn("{task.fields[info]}"), console=console, transient=False) as progress:
        task = progress.add_task("build", total=len(rows) * len(fams), info="")

        def on_update(s: BuildStats) -> None:
            progress.update(task, completed=s.skipped + s.written + s.failed,
                            info=f"new {s.written} failed {s.failed} retries {s.retries} invalid {s.invalid} "
                                 f"tokens {s.prompt_tokens}+{s.completion_tokens} ${cost(s):.4f}")

        stats = build_dataset(rows, fams, images, out, llm, config, on_update)
    console.print(
        f"{out}: {stats.skipped + stats.written}/{stats.total} records ({stats.written} new, {stats.skipped} "
        f"resumed), {stats.failed} failed, {stats.requests} requests, {stats.retries} retries, {stats.invalid} "
        f"invalid replies, tokens {stats.prompt_tokens} in + {stats.completion_tokens} out, "
        f"est. cost ${cost(stats):.4f}", soft_wrap=True,
    )
    if stats.failed:
        for line in stats.failures[:10]:
            console.print(f"  failed {line}", soft_wrap=True)
        raise RuntimeStageError(f"{stats.failed} item(s) got no valid reply; rerun the same command to retry them")


@data_app.command("import-fairfacegpt")
def import_fairfacegpt_cmd(
    dataset_json: Path = typer.Argument(..., help="The published FairFaceGPT dataset.json, or a dataset in another "
                                        "layout LLaMA-Factory reads (JSON or JSONL; see docs/data.md)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image root; when given, every image must exist."),
    out: Path = typer.Option(..., "--out", help="Output ShareGPT JSONL."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out."),
) -> None:
    """Validate and normalise the published FairFaceGPT dataset (or one in the LLaMA-Factory layouts) into ShareGPT
    JSONL; a record's system prompt is kept as its 'system'."""
    from rich.console import Console

    from facellm_edge.data.fairfacegpt import import_fairfacegpt

    n = import_fairfacegpt(dataset_json, images, out, force=force)
    Console(stderr=True).print(f"{out}: {n} records", soft_wrap=True)

