"""The model card (``README.md``) ``push`` publishes with a bundle: where it comes from, its licence, how to pull
and run it, its files, the export's verification table and, from a ``bench`` results.json, its measured speed.

Everything in it is read from the manifest (and the results file): nothing is claimed that the bundle or the
measurement does not record.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from facellm_edge.bundle import MANIFEST, Manifest
from facellm_edge.errors import InputError, UsageError
from facellm_edge.hub.pull import MMPROJ, select
from facellm_edge.hub.sources import is_hub_id
from facellm_edge.io import loads_json

log = logging.getLogger(__name__)

CARD = "README.md"
BENCH_SCHEMA = re.compile(r"^facellm-edge-bench/\d+$")


def verification_rows(v: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(check, precision, result) for each check the export recorded (``manifest.verification``)."""
    rows = []
    for prec, r in v.get("vision", {}).items():
        rows.append(("vision ONNX vs torch (batch 1, 3)", prec,
                     f"max |Δ| {r['max_abs_diff']:.2e}  rel {r['max_rel_diff']:.2e}  cosine {r['cosine_min']:.6f}"))
    if "mmproj" in v:
        r = v["mmproj"]
        rows.append((f"mmproj via libmtmd vs torch ({r['n_tokens']} tokens, {r['image']})", "f16",
                     f"max |Δ| {r['max_abs_diff']:.2e}  rel {r['max_rel_diff']:.2e}  "
                     f"worst token cosine {r['token_cosine_min']:.6f}"))
    for q, r in v.get("llm", {}).items():
        rows.append((f"GGUF vs transformers logits ({r['n_positions']} pos, {r['n_image_positions']} image)", q,
                     f"top-1 {r['top1_agreement']:.2%}  max |Δ| {r['max_abs_diff']:.2e}  "
                     f"rel {r['max_rel_diff']:.2e}"))
    if "tokenizer" in v:
        r = v["tokenizer"]
        rows.append(("tokenizer parity (llama.cpp vs HF ids)", "", f"{r['n_match']}/{r['n_texts']} texts identical"))
    return rows


def read_bench_results(path: Path) -> dict[str, Any]:
    """A ``facellm-edge bench`` results.json (any schema version of ours); InputError for anything else."""
    try:
        data = loads_json(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"cannot read the bench results {path}: {exc}") from exc
    if not isinstance(data, dict) or not BENCH_SCHEMA.match(str(data.get("schema", ""))):
        raise InputError(f"{path} is not a results.json written by `facellm-edge bench`")
    return data


def _median(cfg: dict[str, Any], key: str) -> float | None:
    from facellm_edge.bench.report import median

    try:
        return median(cfg, key)
    except (KeyError, TypeError, ValueError):
        return None


def speed_rows(results: dict[str, Any], manifest: Manifest) -> list[tuple[str, str, str, str, str]]:
    """(configuration, TTFT new face, TTFT follow-up, decode, peak RSS) of the measured runtime configurations whose
    files this bundle holds."""
    vision = {*manifest.vision, *([MMPROJ] if manifest.mmproj is not None else [])}
    rows = []
    for c in results.get("configs", []):
        if not isinstance(c, dict) or c.get("kind") not in ("edge", "peer"):
            continue
        if c.get("quant") not in manifest.llm or c.get("vision") not in vision:
            continue
        cold, warm, tok = (_median(c, k) for k in ("ttft_cold_ms", "ttft_warm_ms", "decode_tok_s"))
        rss = (c.get("memory") or {}).get("peak_rss_mb")
        rows.append((str(c.get("name", "")), _s(cold), _s(warm), "-" if tok is None else f"{tok:.1f} tok/s",
                     "-" if rss is None else f"{float(rss):,.0f} MB"))
    return rows


def _s(ms: float | None) -> str:
    return "-" if ms is None else f"{ms / 1000:.2f} s"


def licence_of(model: str | None) -> str:
    """The licence the registry records for the source checkpoint, else a pointer to its own card."""
    from facellm_edge.registry import get_spec

    if model:
        try:
            return get_spec(model).licence
        except UsageError:
            pass
    return f"the licence of the source checkpoint {model or '(not recorded)'} applies: see its model card"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    def cell(x: str) -> str:
        return x.replace("|", "\\|").replace("\n", " ")

    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cell(x) for x in r) + " |" for r in rows)]


def _front_matter(base: str | None, licence_link: str | None) -> list[str]:
    lines = ["---", "license: other", "license_name: source-checkpoint-licence"]
    if licence_link:
        lines.append(f"license_link: {licence_link}")
    if base:
        lines += ["base_model:", f"- {base}"]
    lines += ["library_name: facellm-edge", "pipeline_tag: image-text-to-text",
              "tags:", "- facellm-edge", "- gguf", "- onnx", "- face", "---"]
    return lines


def public_source(source: dict[str, Any]) -> dict[str, Any]:
    """What a published bundle says of where it came from: the hub id, revision and commit; a local checkpoint or
    adapter by its folder name only — never this machine's paths (``source.path``, ``/home/<user>/...``)."""
    out = {k: v for k, v in source.items() if k != "path"}
    for key in ("model", "adapter"):
        value = out.get(key)
        if isinstance(value, str) and not (key == "model" and is_hub_id(value)):
            out[key] = Path(value).name or value
    return out


def render_card(manifest: Manifest, repo_id: str, results: dict[str, Any] | None = None) -> str:
    """The model card of ``manifest``'s bundle published as ``repo_id``."""
    src = public_source(manifest.source)
    model = src.get("model") if isinstance(src.get("model"), str) else None
    base = model if model and is_hub_id(model) else None
    if model and base is None:
        model = f"a local checkpoint ({model})"
    at = src.get("commit") or src.get("revision")
    adapter = Path(str(src["adapter"])).name if src.get("adapter") else None
    origin = f"{model or 'a local checkpoint'}" + (f" at {at}" if at else "") + (f" + LoRA adapter {adapter}"
                                                                              if adapter else "")
    default = select(manifest, (), (), repo_id)
    others = [q for q in manifest.llm if q not in default.llm]
    lines = [*_front_matter(base, f"https://huggingface.co/{base}" if base else None), "", f"# {repo_id}", "",
             f"A facellm-edge bundle of **{origin}**: the vision tower "
             "(+ pixel shuffle + projector) as ONNX, the language model as GGUF for llama.cpp, and a manifest with "
             "every file's sha256, the prompt template and the token ids. Exported "
             f"{manifest.created} with facellm-edge {manifest.tools.get('facellm-edge', '')}".rstrip() + ".", "",
             "## Use it", "", "```bash", "pip install facellm-edge",
             f"facellm-edge pull {repo_id}" + f"    # {default.label()} (only these files are downloaded)"]
    if others or len(manifest.vision) > 1 or manifest.mmproj is not None:
        lines.append(f"facellm-edge pull {repo_id} --quant {','.join(others or default.llm)} --vision "
                     f"{','.join([*manifest.vision, *([MMPROJ] if manifest.mmproj else [])])}    # other files")
    lines += [f"facellm-edge ask photo.jpg \"How old does this person look?\" --bundle {repo_id}",
              f"facellm-edge run --camera 0 --bundle {repo_id}", "```", "",
              "`pull` checks every file against the sha256 in `manifest.json`; the runtime needs no torch.", "",
              "## Files", ""]
    files = [("manifest", "", MANIFEST, "", "")]
    for kind, table in (("vision (ONNX)", manifest.vision), ("llm (GGUF)", manifest.llm)):
        files += [(kind, k, e.path, f"{e.bytes:,}", e.sha256) for k, e in table.items()]
    if manifest.mmproj is not None:
        e = manifest.mmproj
        files.append(("vision (llama.cpp mmproj)", "f16", e.path, f"{e.bytes:,}", e.sha256))
    lines += [*_table(("kind", "variant", "file", "bytes", "sha256"), files), ""]
    lines += ["## Source and licence", "", f"- source checkpoint: {model or '(not recorded)'}"
              + (f", revision {src.get('revision')}" if src.get("revision") else "")
              + (f", commit {src.get('commit')}" if src.get("commit") else ""),
              *([f"- LoRA adapter merged before export: {adapter}"] if adapter else []),
              f"- licence: {licence_of(model)}",
              "- this bundle is a format conversion of that checkpoint: its licence and terms of use apply to it", ""]
    lines += ["## Verification", ""]
    rows = verification_rows(manifest.verification) if manifest.verification else []
    lines += [*_table(("check", "precision", "result"), rows), ""] if rows else [
        "This bundle was exported without verification (`--no-verify`): no comparison with the checkpoint is "
        "recorded.", ""]
    lines += _speed_lines(results, manifest)
    return "\n".join(lines).rstrip() + "\n"


def _speed_lines(results: dict[str, Any] | None, manifest: Manifest) -> list[str]:
    if results is None:
        return []
    rows = speed_rows(results, manifest)
    machine, settings = results.get("machine") or {}, results.get("settings") or {}
    where = (f"{machine.get('cpu_model', 'unknown CPU')}, {machine.get('usable_cores', '?')} cores, "
             f"{settings.get('threads', '?')} threads")
    lines = ["## Measured speed", "",
             f"`facellm-edge bench` ({results.get('schema')}, {results.get('created', '?')}): {where}; model "
             f"{settings.get('model', '?')}; {settings.get('decode_tokens', '?')} decoded tokens, medians of "
             f"{settings.get('runs', '?')} runs.", ""]
    if not rows:
        log.warning("the bench results measured none of this bundle's files: the card says so")
        return [*lines, "The results given measured none of this bundle's configurations.", ""]
    return [*lines, *_table(("configuration", "TTFT new face", "TTFT follow-up", "decode", "peak RSS"), rows), ""]

