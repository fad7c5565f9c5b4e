"""`facellm-edge export` and `facellm-edge inspect`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from facellm_edge.commands.defaults import field_default
from facellm_edge.export.exporter import ExportConfig
from facellm_edge.llm.system_prompt import HELP as SYSTEM_HELP


def _default(name: str) -> Any:
    return field_default(ExportConfig, name)


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def export_cmd(
    model: str = typer.Argument(..., help="Checkpoint: local directory or Hugging Face id (e.g. Idiap/FaceLLM-1B)."),
    out: Path = typer.Option(..., "--out", "-o", help="Bundle directory to create."),
    quant: str = typer.Option(
        ",".join(_default("quants")), "--quant", "-q",
        help="LLM precisions, comma-separated: f32,f16,bf16,q8_0,q6_k,q5_k_m,q4_k_m,q4_0,iq4_nl,q4_0_pure (every "
             "tensor q4_0, the output head too)."),
    vision: str = typer.Option(
        ",".join(_default("vision")), "--vision",
        help="Vision targets, comma-separated: fp32,int8 (ONNX graphs) and mmproj (llama.cpp clip/mtmd InternVL "
             "projector GGUF, f16, for llama-mtmd-cli / llama-server / ollama)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="PEFT LoRA adapter to merge before export."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    verify: bool = typer.Option(_default("verify"), "--verify/--no-verify",
                                help="Check ONNX/GGUF outputs against transformers."),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle at --out (only a bundle "
                               "facellm-edge wrote, holding nothing else)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Threads for quantisation (default: all "
                                          "cores)."),
    system: str = typer.Option(_default("system"), "--system", help=SYSTEM_HELP + " Stored in the bundle as its "
                               "default; ask/run --system overrides it."),
) -> None:
    from rich.console import Console

    from facellm_edge.export.exporter import StepEvent, export_bundle, parse_list

    console = Console(stderr=True)
    cfg = ExportConfig(model=model, out=out, quants=parse_list(quant, "quant"), vision=parse_list(vision, "vision"),
                       adapter=adapter, revision=revision, verify=verify, force=force, threads=threads, system=system)

    def on_step(ev: StepEvent) -> None:
        size = f"  {fmt_bytes(ev.bytes)}" if ev.bytes else ""
        detail = f"  {ev.detail}" if ev.detail else ""
        console.print(f"[green]✓[/] {ev.name:<24} {ev.seconds:7.1f} s{size}{detail}")

    with console.status("exporting…"):
        result = export_bundle(cfg, on_step=on_step)
    m = result.manifest
    if m.verification:
        console.print(verification_table(m.verification))
    total = sum(e.bytes for e in [*m.vision.values(), *m.llm.values(), *([m.mmproj] if m.mmproj else [])])
    console.print(f"bundle written to [bold]{result.out}[/] ({fmt_bytes(total)}) in {result.seconds:.1f} s")
    import shlex

    typer.echo("next:\n  facellm-edge run --camera 0 --bundle "
               f"{shlex.quote(str(result.out))} --question \"Describe this person's face.\"")


def verification_table(v: dict[str, Any]):
    from rich.table import Table

    from facellm_edge.hub.card import verification_rows

    t = Table(title="verification")
    for col in ("check", "precision", "result"):
        t.add_column(col)
    for row in verification_rows(v):
        t.add_row(*row)
    return t


def inspect_cmd(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    json_out: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    from rich.console import Console
    from rich.table import Table

    from facellm_edge.bundle import load_bundle

    b = load_bundle(bundle, check_hashes=True)  # raises BundleError naming damaged files
    m = b.manifest
    if json_out:
        typer.echo(m.to_json(), nl=False)
        return
    console = Console()
    console.print(f"[bold]{bundle}[/]  schema v{m.schema_version}, created {m.created}")
    console.print(f"source: {m.source.get('model')} (revision {m.source.get('revision') or '-'})"
                  + (f" + adapter {m.source['adapter']}" if m.source.get("adapter") else ""))
    a = m.arch
    console.print(f"vision: hidden {a.vision_hidden} × {a.vision_layers} layers, {m.image.size} px tiles, "
                  f"{m.tokens.num_image_tokens} tokens/tile; LLM: hidden {a.llm_hidden} × {a.llm_layers} layers, "
                  f"{a.llm_heads}/{a.llm_kv_heads} heads, vocab {a.vocab_size}")
    t = Table()
    for col in ("kind", "precision", "file", "size", "sha256"):
        t.add_column(col)
    for kind, table in (("vision", m.vision), ("llm", m.llm)):
        for prec, e in table.items():
            bpw = e.extra.get("bits_per_weight")
            label = f"{prec}" + (f" ({bpw:.2f} b/w)" if isinstance(bpw, (int, float)) else "")
            t.add_row(kind, label, e.path, fmt_bytes(e.bytes), e.sha256[:12] + "…")
    if m.mmproj is not None:
        e = m.mmproj
        label = f"mmproj {e.extra.get('ftype', '')}".strip()
        t.add_row("vision (llama.cpp)", label, e.path, fmt_bytes(e.bytes), e.sha256[:12] + "…")
    console.print(t)
    if m.verification:
        console.print(verification_table(m.verification))
    console.print("[green]all file hashes match[/]")

