"""Kiosk benchmark: how long a person who walks up to the camera waits for the answer, under each thread policy.

Every run is the real live loop (:func:`facellm_edge.runtime.live.loop.run_live`, headless, as ``run
--no-display``) with its VLM worker, on a camera stand-in (:class:`~facellm_edge.bench.live.PacedClip` at
:data:`CAMERA_FPS`: a loop that falls behind gets the newest frame, as from a camera): :data:`EMPTY_S` of an empty
scene (the worker idle, as a kiosk between visitors), then the photo's largest face arrives and stays until its answer
is complete; the run ends there. Measured per run: the answer's ``since_seen_ms`` (the person's first frame to the
first token / the whole answer), its stage timings, and the frame loop over the whole run (FPS, p50/p99 latency,
camera frames dropped) — the answer is made while those frames are processed.

One run per policy: llama.cpp threads (``--live-llama-threads``) x ONNX Runtime encoder threads (1, and every core)
x the detector (1 thread) on every frame or on every third (``run --detect-every``) at 640 px; on a small CPU one run
of the most threads at run's auto pace (every third frame, every sixth while the worker answers); and one run of the
most threads, every third frame, at 320 px (``run --detect-size 320``). The goal (issue 15, goal 4): first token
since seen <= the same frame answered alone (alternated with the visits) + :data:`GOAL_MARGIN_MS`, with the frame
loop at >= 25 FPS and p99 < 80 ms; the stage bench's cold TTFT (another process) is shown beside it.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from facellm_edge.bench.live import (PacedClip, Records, decode_rate, meets_loop_targets, person_crops, person_side,
                                     place, since_seen, warm_up)
from facellm_edge.bench.stages import summarize
from facellm_edge.errors import RuntimeStageError
from facellm_edge.runtime.detect import DEFAULT_INPUT_SIZE

if TYPE_CHECKING:
    from facellm_edge.runtime.pipeline import FaceLLM

log = logging.getLogger(__name__)

CAMERA_FPS = 30.0
EMPTY_S = 1.0  # the empty scene before the person arrives
EMPTY_FRAMES = int(round(EMPTY_S * CAMERA_FPS))  # the person's first frame is this one
GOAL_MARGIN_MS = 100.0  # issue 15, goal 4: first token since seen <= the same frame answered alone + this
ANSWER_TIMEOUT_S = 300.0


DETECT_EVERY = (1, 3)  # run's --detect-every: the detector on every frame, or on every third


SMALL_DETECT_SIZE = 320  # run --detect-size 320: the detector at half the default resolution


def policies(llama_threads: tuple[int, ...] | list[int], cores: int) -> list[tuple[int, int, int, int]]:
    """(llama.cpp threads, encoder threads, detect every, detector size) of each run: each llama.cpp policy with 1
    encoder thread and with every core, the detector on every frame and on every third at 640 px; then the most
    threads with the detector on every third frame at 320 px (``--detect-size 320``: sooner, but it misses small
    faces)."""
    from facellm_edge.runtime.live.tracker import resolve_detect_every

    runs = [(k, e, d, DEFAULT_INPUT_SIZE) for k in llama_threads for e in sorted({1, max(1, cores)})
            for d in DETECT_EVERY]
    most = (max(llama_threads), max(1, cores))
    if resolve_detect_every(0, cores, busy=True) != resolve_detect_every(0, cores):  # auto paces by the worker
        runs.append((*most, 0, DEFAULT_INPUT_SIZE))
    return runs + [(*most, DETECT_EVERY[-1], SMALL_DETECT_SIZE)]


def detection_label(d: int, cores: int) -> str:
    """How often a policy runs the detector, in words (0: run's auto pace on this machine)."""
    from facellm_edge.runtime.live.tracker import resolve_detect_every

    every = lambda n: "every frame" if n == 1 else f"every {n} frames"  # noqa: E731
    if d:
        return every(d)
    calm, busy = resolve_detect_every(0, cores), resolve_detect_every(0, cores, busy=True)
    return f"auto: {every(calm)}, {busy} while answering" if busy != calm else f"auto: {every(calm)}"


def kiosk_run(model: "FaceLLM", person: np.ndarray, question: str, width: int, height: int,
              detect_every: int = 1) -> dict[str, Any]:
    """One visitor: an empty scene, then ``person`` until the answer is complete."""
    from facellm_edge.runtime.live.loop import LiveConfig, run_live

    blank = np.zeros((height, width, 3), np.uint8)
    source = PacedClip(lambda i: blank if i < EMPTY_FRAMES else place(person, width, height, 0, i), CAMERA_FPS,
                       "an empty scene, then one person who stays")
    records = Records()

    def end_when_answered() -> None:
        if not records.wait_for(1, ANSWER_TIMEOUT_S):
            log.warning("kiosk: no answer within %.0f s; stopping the run", ANSWER_TIMEOUT_S)
        source.close()

    stopper = threading.Thread(target=end_when_answered, name="kiosk-stop", daemon=True)
    stopper.start()
    stats = run_live(model, source, LiveConfig(question=question, display=False, frame_latencies=100_000,
                                                     detect_every=detect_every),
                     on_record=records)
    source.close()
    stopper.join()
    recs = [r for _, r in records.items]
    if not recs:
        return {"answered": False, "fps": round(stats.fps, 2), "frame_ms": summarize(list(stats.frame_ms))}
    rec = recs[0]
    return {"answered": True, "fps": round(stats.fps, 2), "frames": stats.frames,
            "dropped_frames": source.dropped, "frame_ms": summarize(list(stats.frame_ms)),
            "since_seen_ms": {k: v["median"] for k, v in since_seen(recs).items()},
            "timings_ms": {k: round(v, 1) for k, v in rec["timings_ms"].items()}, "n_tokens": rec["n_tokens"],
            "decode_tok_s": decode_rate(recs)}


def alone_first_token(model: "FaceLLM", person: np.ndarray, question: str, width: int, height: int) -> float:
    """ms to the first token of the person's first frame answered with nothing else running (``FaceLLM.open_faces``
    then the session's stream: detect, align, encode, image prefill, first token): a visit's baseline. Its
    conversation is closed after the first token, so its KV cells do not stay in the cache the visit uses."""
    frame = place(person, width, height, 0, EMPTY_FRAMES)
    t0 = time.perf_counter()
    sessions = model.open_faces(frame)
    try:
        if not sessions:
            raise RuntimeStageError("kiosk: the detector found no face in the person's frame")
        stream = sessions[0].stream(question)
        try:
            next(stream)
        finally:
            stream.close()
        return round((time.perf_counter() - t0) * 1e3, 1)
    finally:
        for s in sessions:
            s.close()


def combine(visits: list[dict[str, Any]], alone: list[float] | None = None) -> dict[str, Any]:
    """One policy's visits (and the baselines answered alone between them): medians of the answers' times and
    rates, the frame loop's latencies pooled."""
    med = statistics.median
    ok = [v for v in visits if v["answered"]]
    pooled = summarize([x for v in visits for x in v["frame_ms"]["samples"]])
    out = {"answered": bool(ok) and len(ok) == len(visits), "visits": len(visits),
           "fps": round(med([v["fps"] for v in visits]), 2), "frame_ms": pooled}
    if alone:
        out |= {"alone_first_token_ms": round(med(alone), 1), "alone_samples": list(alone)}
    if not ok:
        return out
    rates = [v["decode_tok_s"] for v in ok if v["decode_tok_s"] is not None]
    return {**out, "frames": sum(v["frames"] for v in ok), "dropped_frames": sum(v["dropped_frames"] for v in ok),
            "since_seen_ms": {k: round(med([v["since_seen_ms"][k] for v in ok]), 1) for k in ("first_token", "answer")},
            "since_seen_samples": {k: [v["since_seen_ms"][k] for v in ok] for k in ("first_token", "answer")},
            "timings_ms": {k: round(med([v["timings_ms"][k] for v in ok if k in v["timings_ms"]]), 1)
                           for k in ok[0]["timings_ms"]},
            "n_tokens": ok[0]["n_tokens"], "decode_tok_s": round(med(rates), 2) if rates else None}


def bench_kiosk(p: dict[str, Any], photo: np.ndarray, cores: int) -> dict[str, Any]:
    """Per policy: load the model with the live thread policy, warm it up, ``p["runs"]`` visitors (default 1) one
    after another; medians."""
    from facellm_edge.bench.edge import largest_face, runtime_config
    from facellm_edge.runtime.pipeline import FaceLLM

    w, h = int(p["width"]), int(p["height"])
    runs = []
    person = None
    for k, e, d, size in policies(p["llama_threads"], cores):
        cfg = runtime_config(p, threads=1, llama_threads=k).for_live()
        cfg = replace(cfg, encoder=replace(cfg.encoder, n_threads=e), detector=replace(cfg.detector, input_size=size))
        with FaceLLM.load(p["bundle"], cfg) as model:
            if person is None:
                (person,) = person_crops(photo, [largest_face(model.detect(photo), p["image"]).box],
                                         person_side(w, h))
            warm_up(model, photo, p["question"], p["image"])
            alone, visits = [], []
            for _ in range(int(p.get("runs", 1))):  # alternated: each visit beside a baseline of the same minute
                alone.append(alone_first_token(model, person, p["question"], w, h))
                visits.append(kiosk_run(model, person, p["question"], w, h, d))
            run = combine(visits, alone)
        runs.append({"name": f"llama.cpp {k} + encoder {e} + detector 1 on {detection_label(d, cores)} at {size} px",
                     "llama_threads": k, "encoder_threads": e, "detect_every": d, "detect_size": size, **run})
    from facellm_edge.runtime.live.tracker import resolve_detect_every

    # run's defaults on this machine: llama.cpp and the encoder on every core, auto detection pace, 640 px (the
    # explicit stride auto equals where auto does not depend on the worker)
    default = next((r["name"] for d in (0, resolve_detect_every(0, cores)) for r in runs
                    if (r["llama_threads"], r["encoder_threads"], r["detect_every"], r["detect_size"])
                    == (max(p["llama_threads"]), cores, d, DEFAULT_INPUT_SIZE)), None)
    return {"camera_fps": CAMERA_FPS, "empty_s": EMPTY_S, "clip": f"the largest face of {Path(p['image']).name} arriving",
            "runs": runs, "best": best_policy(runs), "default": default}


def best_policy(runs: list[dict[str, Any]]) -> str | None:
    """The earliest first token among the runs whose frame loop met its targets (else among all answered)."""
    answered = [r for r in runs if r.get("answered")]
    good = [r for r in answered if meets_loop_targets(r)] or answered
    return min(good, key=lambda r: r["since_seen_ms"]["first_token"])["name"] if good else None


def kiosk_lines(kiosk: dict[str, Any] | None, cold_ttft_ms: float | None) -> list[str]:
    """The Markdown section: one row per policy; the goal against the same frame answered alone between the visits
    (results without that baseline: against the stage bench's cold TTFT, ``cold_ttft_ms``)."""
    if not kiosk:
        return []
    f0 = lambda v: "–" if v is None else f"{v:,.0f}"  # noqa: E731
    visits = max((r.get("visits", 1) for r in kiosk["runs"]), default=1)
    lines = ["", f"## Kiosk: one person walks up (camera stand-in at {kiosk['camera_fps']:.0f} FPS, "
             f"{kiosk['empty_s']:.0f} s of empty scene first; medians of {visits} visit{'s' if visits > 1 else ''} "
             "per policy)", "",
             "The real `run_live` (headless) and its VLM worker; the person stays until the answer is complete. "
             "Since seen: ms from the person's first frame. Frame loop over the whole run. Alone: the person's first "
             "frame answered with no loop running (`FaceLLM.open_faces` and the session's stream: detect, align, TTFT "
             "cold), before each visit in the same process.", "",
             "| policy | first token since seen | alone | answer since seen | encode | image prefill | ttft | "
             "decode tok/s | FPS | frame p50 / p99 ms | dropped frames |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in kiosk["runs"]:
        if not r.get("answered"):
            lines.append(f"| {r['name']} | no answer | {f0(r.get('alone_first_token_ms'))} | – | – | – | – | – | "
                         f"{r['fps']} | – | – |")
            continue
        s, t, fm = r["since_seen_ms"], r["timings_ms"], r["frame_ms"]
        lines.append(f"| {r['name']} | {f0(s['first_token'])} | {f0(r.get('alone_first_token_ms'))} | "
                     f"{f0(s['answer'])} | {f0(t.get('encode'))} | {f0(t.get('image_prefill'))} | {f0(t.get('ttft'))} | "
                     f"{r['decode_tok_s']} | {r['fps']} | {fm['median']:.1f} / {fm['p99']:.1f} | {r['dropped_frames']} |")
    for label, key in (("Run's defaults here", "default"), ("Best policy", "best")):
        r = next((r for r in kiosk["runs"] if r["name"] == kiosk.get(key) and r.get("answered")), None)
        if r is not None:
            lines.append(f"\n{label}: **{r['name']}** — {goal_sentence(r, cold_ttft_ms)}")
    return lines


def goal_sentence(run: dict[str, Any], cold_ttft_ms: float | None) -> str:
    """The goal for one answered policy: its first token since seen against its baseline."""
    first = run["since_seen_ms"]["first_token"]
    alone = run.get("alone_first_token_ms")
    base, what = (alone, "the same frame answered alone") if alone else (cold_ttft_ms, "cold TTFT")
    loop = f"frame loop {'met' if meets_loop_targets(run) else 'missed'} ≥ 25 FPS, p99 < 80 ms."
    if not base:
        return f"first token {first:,.0f} ms after the person's first frame; {loop}"
    text = (f"first token {first:,.0f} ms after the person's first frame = {what} {base:,.0f} ms + "
            f"{first - base:,.0f} ms ({first / base:.2f}×; goal ≤ {what} + {GOAL_MARGIN_MS:.0f} ms: "
            f"{'met' if first <= base + GOAL_MARGIN_MS else 'missed'})")
    if alone and cold_ttft_ms:
        text += f"; the stage bench's cold TTFT (another process): {cold_ttft_ms:,.0f} ms"
    return f"{text}; {loop}"
