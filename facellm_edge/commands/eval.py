"""``facellm-edge eval``: ``eval run`` (answer a FaceXBench-style bench with a model and score it), ``eval score``
(re-score saved answers without a model) and ``eval compare`` (two runs side by side).

``eval --bench ...`` (options straight after ``eval``, the form from before ``eval`` had subcommands) stays an alias
of ``eval run --bench ...``: :class:`_EvalGroup` puts ``run`` in front of them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import typer
from typer.core import TyperGroup

from facellm_edge.commands.defaults import field_default
from facellm_edge.errors import UsageError
from facellm_edge.eval.backends import TransformersConfig
from facellm_edge.eval.scoring import ScoreConfig
from facellm_edge.eval.settings import EvalSettings
from facellm_edge.llm.system_prompt import DEFAULT as SYSTEM_DEFAULT, HELP as SYSTEM_HELP

log = logging.getLogger(__name__)


class _EvalGroup(TyperGroup):
    """``eval`` with an option first (not --help) runs ``eval run`` with those options."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0].startswith("-") and args[0] not in ctx.help_option_names:
            _refuse_misplaced_subcommand(self.commands, args)
            args = ["run", *args]
        return super().parse_args(ctx, args)


def _refuse_misplaced_subcommand(commands: dict[str, Any], args: list[str]) -> None:
    """``eval --bench B score ...``: a subcommand after eval's options (which belong to one subcommand)."""
    takes_value = {o for p in commands["run"].params if not getattr(p, "is_flag", True) for o in p.opts}
    i = 0
    while i < len(args):
        if args[i] in takes_value:
            i += 1  # skip the option's value
        elif args[i] in commands:
            raise UsageError(f"options of `eval` go after its subcommand: `eval {args[i]} ...`")
        i += 1


eval_app = typer.Typer(cls=_EvalGroup, no_args_is_help=True, help="`eval --bench ... --model ...` (options first) is "
                       "`eval run --bench ... --model ...`.")

_D = EvalSettings()  # the defaults of how questions are asked and answers read
_SCORE = ScoreConfig()
_RULES = typer.Option(_D.letter_rules, "--letter-rules", help="How the answer letter is read: facexbench "
                      "(FaceXBench's aggregate_results.py, comparable with published tables) or robust (explicit "
                      "statements first; refusals and ambiguity count as unanswered).")
_BOOTSTRAP = typer.Option(_SCORE.n_bootstrap, "--bootstrap", min=10, help="Bootstrap resamples for the 95% CIs.")
_SEED = typer.Option(_SCORE.seed, "--seed", help="Bootstrap seed.")
_FORCE = typer.Option(False, "--force", help="Replace an existing --out (only one `eval` wrote, holding nothing "
                      "else).")


@eval_app.command("run")
def run(
    bench: Path = typer.Option(..., "--bench", help="MCQ bench JSON, a FaceXBench task file, or a folder "
                                         "of FaceXBench task files (facexbench/benchmark)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Folder the bench's image paths are relative to "
                                          "(default: the bench file's folder)."),
    model: Optional[str] = typer.Option(None, "--model", help="InternVL/FaceLLM checkpoint folder or hub id."),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="Edge bundle folder (runtime backend)."),
    out: Path = typer.Option(Path("eval_results"), "--out", help="Output folder (results.json/.md/.png, "
                             "predictions.jsonl)."),
    force: bool = _FORCE,
    resume: bool = typer.Option(False, "--resume", help="Go on from the partial run in --out (one that was stopped: "
                                "its answers are kept) with the same options: answer only the questions it lacks."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N questions."),
    prepend_text: bool = typer.Option(_D.prepend_text, "--prepend-text", help="Put each task's prepend_text (its "
                                      "task description) into the prompt, like FaceXBench's --prepend_text. Off by "
                                      "default, as there and for FaceLLM's published numbers."),
    letter_rules: str = _RULES,
    system: Optional[str] = typer.Option(None, "--system", help=SYSTEM_HELP + " Default: none, as FaceLLM's "
                                         "authors evaluate (--bundle: the bundle's own, none unless exported with "
                                         "--system)."),
    max_new_tokens: int = typer.Option(_D.max_new_tokens, "--max-new-tokens", min=1, help="Answer length cap in "
                                       "tokens (FaceLLM's evaluation used 2048); answers that hit it are counted in "
                                       "the results."),
    llm_quant: Optional[str] = typer.Option(None, "--llm-quant", help="--bundle: which GGUF (default: preferred)."),
    vision_precision: Optional[str] = typer.Option(None, "--vision-precision", help="--bundle: which ONNX encoder, "
                                                   "fp32|int8 (default: preferred)."),
    dtype: str = typer.Option(field_default(TransformersConfig, "dtype"), "--dtype",
                              help="transformers weights dtype: float32|bfloat16|float16."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision for --model."),
    device: str = typer.Option(field_default(TransformersConfig, "device"), "--device",
                               help="torch device for --model (cpu, cuda, cuda:1, ...)."),
    n_bootstrap: int = _BOOTSTRAP,
    seed: int = _SEED,
) -> None:
    """Answer every question with --model (transformers) or --bundle (edge runtime) and score it (`eval --bench`
    is the same command)."""
    if (model is None) == (bundle is None):
        raise UsageError("eval needs exactly one of --model PATH_OR_ID (transformers) or --bundle DIR (edge runtime)")
    if bundle is None and (llm_quant or vision_precision):
        raise UsageError("--llm-quant and --vision-precision choose files of a --bundle; they do not apply to --model")
    if resume and force:
        raise UsageError("--resume goes on from the run in --out, --force replaces it: choose one")

    import time

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from facellm_edge.eval.backends import (
        BundleBackend, BundleConfig, TransformersBackend, TransformersConfig, check_supported,
    )
    from facellm_edge.eval.letters import get_rules
    from facellm_edge.eval.mcq import load_bench
    from facellm_edge.eval.predictions import predictions_jsonl
    from facellm_edge.eval.report import check_out, write_results
    from facellm_edge.eval.resume import (
        MODEL_KEYS, answered_before, check_same, in_bench_order, partial_meta, previous_run,
    )
    from facellm_edge.eval.runner import results_document, run_eval
    from facellm_edge.eval.scoring import ScoreConfig
    from facellm_edge.llm.system_prompt import resolve_system

    settings = EvalSettings(prepend_text=prepend_text, letter_rules=letter_rules, max_new_tokens=max_new_tokens)
    get_rules(settings.letter_rules)  # an unknown name fails before any work
    if system is not None:
        resolve_system(system)
    before = previous_run(out, settings.to_json()) if resume else None
    if not resume:
        check_out(out, force)
    items = load_bench(bench, images, prepend_text=settings.prepend_text)
    if limit:
        items = items[:limit]
    done = answered_before(out, items, settings.letter_rules) if before is not None else []
    kept = len(done)
    todo = [it for it in items if it.id not in {r.id for r in done}]
    if bundle is not None:
        backend = BundleBackend(BundleConfig(bundle=bundle, max_new_tokens=settings.max_new_tokens,
                                             llm_quant=llm_quant, vision_precision=vision_precision, system=system))
    else:
        backend = TransformersBackend(TransformersConfig(model=model, max_new_tokens=settings.max_new_tokens,
                                                         dtype=dtype, revision=revision, device=device,
                                                         system=system if system is not None else SYSTEM_DEFAULT))
    meta = {"bench": str(bench), "backend": backend.name, "model": backend.model, **settings.to_json(),
            "system": backend.system}
    try:  # a bundle whose template shows one image refuses multi-image questions before the first answer
        if before is not None:
            check_same(out, before, meta, MODEL_KEYS)
        check_supported(todo, backend.name, backend.max_images)
    except BaseException:
        backend.close()
        raise
    console = Console(stderr=True)
    score_config = ScoreConfig(n_bootstrap=n_bootstrap, seed=seed)
    wall_before = before.get("wall_s", 0.0) if before is not None else 0.0
    t0 = time.perf_counter()

    def document(extra: dict) -> tuple[dict, list]:
        results = in_bench_order(items, done)
        wall = time.perf_counter() - t0 + (wall_before if isinstance(wall_before, (int, float)) else 0.0)
        return results_document(results, {**meta, "wall_s": wall, **extra}, score_config), results

    try:
        with Progress(TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      TextColumn("{task.fields[acc]}"), console=console) as progress:
            task = progress.add_task("eval", total=len(items), completed=kept, acc="")
            state = {"n": 0, "ok": 0}

            def on_item(r) -> None:
                done.append(r)
                state["n"] += 1
                state["ok"] += r.correct
                progress.update(task, advance=1, acc=f"acc {state['ok'] / state['n']:.3f}")

            run_eval(todo, backend, on_item, letter_rules=settings.letter_rules)
    except BaseException as exc:
        backend.close()
        if len(done) > kept:  # keep what was answered; the error (or Ctrl-C) is still what the user sees
            _keep_partial(console, out, items, *document(partial_meta(len(done), len(items), exc)),
                          replace=force or before is not None)
        raise
    backend.close()
    doc, results = document({"resumed": kept} if before is not None else {})
    write_results(out, doc, force=force or before is not None, predictions=predictions_jsonl(items, results))
    _summary(console, out, doc)


def _keep_partial(console, out: Path, items, doc: dict, results, *, replace: bool) -> None:
    """Write the answers of a run that stopped; a failure here is logged, never put in place of the stop's own."""
    from facellm_edge.eval.predictions import predictions_jsonl
    from facellm_edge.eval.report import write_results

    try:
        write_results(out, doc, force=replace, predictions=predictions_jsonl(items, results))
    except Exception as exc:  # noqa: BLE001 - the stop's error is the one to report
        log.warning("could not keep the %d answers so far in %s: %s", len(results), out, exc)
        return
    console.print(f"{out}: kept {len(results)} of {len(items)} answers (partial run; `eval run --resume` with the "
                  "same options answers the rest)", soft_wrap=True)


def _summary(console, out: Path, doc: dict) -> None:
    o, cap = doc["summary"]["overall"], doc["summary"]["hit_max_new_tokens"]
    console.print(f"{out}: accuracy {o['accuracy']:.3f} (95% CI {o['ci_low']:.3f}-{o['ci_high']:.3f}) on {o['n']} "
                  f"questions, {o['unanswered']} unanswered", soft_wrap=True)
    if cap["count"]:
        console.print(f"{cap['count']} answer(s) hit the {doc['meta'].get('max_new_tokens', '')} token cap "
                      "(--max-new-tokens): their letter may be missing", soft_wrap=True)


@eval_app.command("score")
def score(
    bench: Path = typer.Option(..., "--bench", help="The bench the predictions were made on (file or folder)."),
    predictions: Path = typer.Option(..., "--predictions", help="predictions.jsonl of an earlier `eval` run."),
    letter_rules: str = _RULES,
    out: Path = typer.Option(Path("eval_scored"), "--out", help="Output folder (results.json/.md/.png, "
                             "predictions.jsonl with the letters read again)."),
    force: bool = _FORCE,
    n_bootstrap: int = _BOOTSTRAP,
    seed: int = _SEED,
) -> None:
    """Score saved answers again, without a model (e.g. with other --letter-rules); images are not needed."""
    from rich.console import Console

    from facellm_edge.eval.letters import get_rules
    from facellm_edge.eval.mcq import load_bench
    from facellm_edge.eval.predictions import read_predictions, rescore, rescored_jsonl
    from facellm_edge.eval.report import check_out, run_meta, write_results
    from facellm_edge.eval.runner import results_document
    from facellm_edge.eval.scoring import ScoreConfig

    get_rules(letter_rules)
    check_out(out, force)
    saved = read_predictions(predictions)
    items = load_bench(bench, check_images=False)
    results = rescore(items, saved, source=predictions, letter_rules=letter_rules)
    meta = {**run_meta(Path(predictions).parent), "bench": str(bench), "letter_rules": letter_rules,
            "rescored_from": str(predictions), "bench_questions": len(items)}
    doc = results_document(results, meta, ScoreConfig(n_bootstrap=n_bootstrap, seed=seed))
    write_results(out, doc, force=force, predictions=rescored_jsonl(saved, results))
    _summary(Console(stderr=True), out, doc)


@eval_app.command("compare")
def compare(
    a: Path = typer.Argument(..., help="results.json of run A (e.g. the transformers reference)."),
    b: Path = typer.Argument(..., help="results.json of run B (e.g. a quantised bundle)."),
    out: Path = typer.Option(Path("eval_compare"), "--out", help="Output folder (compare.json/.md/.png)."),
    force: bool = _FORCE,
) -> None:
    """Answer agreement between two runs and accuracy delta per category (quantisation drift)."""
    from rich.console import Console

    from facellm_edge.eval.compare import compare_results
    from facellm_edge.eval.report import COMPARE, check_out, load_results, write_compare

    check_out(out, force, COMPARE)
    _, ra = load_results(a)
    _, rb = load_results(b)
    cmp = compare_results(ra, rb, name_a=str(a), name_b=str(b))
    write_compare(out, cmp, force=force)
    o = cmp["overall"]
    Console(stderr=True).print(f"{out}: agreement {o['agreement']:.3f} on {o['n']} questions, accuracy delta "
                               f"{100 * o['delta']:+.1f} pp (B - A)", soft_wrap=True)

