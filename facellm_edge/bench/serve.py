"""``facellm-edge bench --serve``: what serving costs beside the in-process API, and how the server behaves under load.

One run, one bundle, one fresh process (``stages.run_isolated``: its peak RSS is the server's, its clients
included): the real app (:func:`facellm_edge.serve.app.create_app`) on uvicorn on 127.0.0.1 in a thread; clients
are threads speaking HTTP with the standard library, asking for OpenAI streaming chat completions about the photo's
largest face. Phases: **overhead** (in process vs through the server, interleaved pairs, TTFT = first piece of
text / first content chunk), **load** (1, 4, 16 clients: requests/s, latency p50/p99, statuses), **live** (the
model reloaded with ``serve --source``'s thread policy, the live service on :class:`~facellm_edge.bench.live.PacedClip`, a camera stand-in:
frame-loop FPS alone, then while clients are served). What each number is: ``benchmarks/README.md`` ("serve").

Length (~420 lines): the three phases share the server, the clients and the result layout; split, each would need
the others' helpers. ``serving()`` is the part that could move (to ``serve/app.py``) if another user appears.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator
from urllib.parse import urlsplit

import numpy as np

from facellm_edge.bench.config import DEFAULT_QUESTION
from facellm_edge.bench.edge import PEER
from facellm_edge.bench.live import PacedClip
from facellm_edge.bench.stages import run_isolated, rss_mb, summarize
from facellm_edge.errors import InputError, RuntimeStageError, UsageError, require
from facellm_edge.io import OutputKind, atomic_directory, check_replaceable, temporary_directory

if TYPE_CHECKING:
    from fastapi import FastAPI

    from facellm_edge.runtime.pipeline import FaceLLM

__all__ = ["SCHEMA", "ServeBenchConfig", "chat_stream", "run_serve_bench", "serving"]

log = logging.getLogger(__name__)

SCHEMA = "facellm-edge-bench-serve/1"
SERVE_BENCH = OutputKind("serve bench results")  # --force replaces only folders with this kind's marker
GOAL_OVERHEAD = 1.05  # server / in-process, TTFT and end-to-end (issue 12)
SETTLE_TIMEOUT_S = 300.0  # live: the longest wait for the first people's answers before measuring
VIDEO_BYTES = 64 * 2**20  # --video: decoded frames kept for the camera stand-in
MIME = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}


@dataclass(frozen=True)
class ServeBenchConfig:
    bundle: Path | None = None  # an existing bundle ...
    synthetic: str | None = None  # ... or a random-weight registry model built and exported for the run
    tokenizer: Path | None = None  # Qwen2 tokenizer dir for --synthetic (None: the hub's)
    out: Path | None = None  # None: benchmarks/results/<timestamp>-<machine>-serve
    force: bool = False
    quant: str | None = None  # None: the bundle's preferred (--synthetic: q4_0)
    vision: str | None = None  # None: the bundle's preferred (--synthetic: int8)
    image: Path | None = None  # None: insightface's t1.jpg
    video: Path | None = None  # live frames; None: the photo's largest face, panned
    question: str = DEFAULT_QUESTION
    runs: int = 3
    warmup: int = 1
    decode_tokens: int = 32
    concurrency: tuple[int, ...] = (1, 4, 16)
    requests_per_client: int = 2
    max_queue: int | None = None  # None: the largest concurrency level (no 503 by design)
    live: bool = True
    live_clients: int = 4
    live_window_s: float = 10.0  # the frame loop alone is measured this long
    camera_fps: float = 30.0
    threads: int | None = None  # None: physical cores (the live phase: serve --source's policy: the detector 1)
    detector_model: Path | None = None
    request_timeout_s: float = 1800.0
    timeout_s: float = 3600.0  # the whole measurement

    def __post_init__(self) -> None:
        if (self.bundle is None) == (self.synthetic is None):
            raise UsageError("pass exactly one of --bundle DIR or --synthetic NAME")
        for name in ("quant", "vision"):
            value = getattr(self, name)
            if value is not None and ("," in value or not value.strip() or value == PEER):
                raise UsageError(f"--serve measures one {name} the runtime loads (not {PEER}); got '{value}'")
        counts = {"--runs": self.runs, "--decode-tokens": self.decode_tokens, "--threads": self.threads or 1,
                  "requests per client": self.requests_per_client, "live clients": self.live_clients,
                  "every concurrency level": min(self.concurrency, default=0)}
        for what, value in counts.items():
            if value < 1:
                raise UsageError(f"{what} must be >= 1, got {value}")
        if self.warmup < 0 or (self.max_queue is not None and self.max_queue < 0):
            raise UsageError("--warmup and max_queue must be >= 0")
        if not (self.live_window_s > 0 and self.camera_fps > 0 and self.request_timeout_s > 0):
            raise UsageError("the live window, the camera FPS and the request timeout must be > 0")


# -- the server in a thread, and an HTTP client ---------------------------------------------------------------

@contextmanager
def serving(app: "FastAPI", start_timeout_s: float = 30.0) -> Iterator[str]:
    """``with serving(app) as base_url:`` ``app`` served by uvicorn on 127.0.0.1 (a free port) in a thread, stopped
    (its lifespan run to the end) after the block."""
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeStageError(f"the server did not start within {start_timeout_s:.0f} s")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        if thread.is_alive():
            raise RuntimeStageError("the server did not stop within 30 s")


@dataclass(frozen=True)
class Reply:
    status: int  # 0: no HTTP answer (connection failed)
    total_ms: float
    ttft_ms: float | None = None
    tokens: int = 0  # usage.completion_tokens
    error: str = ""


def chat_body(image: bytes, mime: str, question: str, max_tokens: int) -> bytes:
    """A streaming chat completion about the largest face of ``image``, usage included."""
    url = f"data:{mime};base64," + base64.b64encode(image).decode("ascii")
    return json.dumps({"model": "facellm-edge", "stream": True, "stream_options": {"include_usage": True},
                       "max_tokens": max_tokens, "messages": [{"role": "user", "content": [
                           {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}]
                       }).encode()


def chat_stream(base_url: str, body: bytes, timeout_s: float) -> Reply:
    """POST ``body`` to ``/v1/chat/completions`` and read the event stream to its end, timed as a client sees it."""
    where = urlsplit(base_url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=timeout_s)
    t0 = time.perf_counter()
    ms = lambda: (time.perf_counter() - t0) * 1000.0  # noqa: E731
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            text = resp.read().decode("utf-8", "replace")
            return Reply(resp.status, ms(), error=text[:200])
        ttft, tokens = None, 0
        for line in resp:
            if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                continue
            event = json.loads(line[5:])
            if "error" in event:
                return Reply(500, ms(), ttft, error=str(event["error"].get("message", ""))[:200])
            if ttft is None and any(c["delta"].get("content") for c in event.get("choices", ())):
                ttft = ms()
            tokens = (event.get("usage") or {}).get("completion_tokens", tokens)
        return Reply(200, ms(), ttft, tokens)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        return Reply(0, ms(), error=f"{type(exc).__name__}: {exc}"[:200])
    finally:
        conn.close()


def clients(base_url: str, body: bytes, n: int, per_client: int, timeout_s: float) -> dict[str, Any]:
    """``n`` clients started together, each sending ``per_client`` requests in turn: statuses, requests/s, latency."""
    replies: list[Reply] = []
    t0: list[float] = []
    start = threading.Barrier(n, action=lambda: t0.append(time.perf_counter()))

    def client() -> None:
        start.wait()
        for _ in range(per_client):
            replies.append(chat_stream(base_url, body, timeout_s))

    threads = [threading.Thread(target=client, name=f"client-{i}", daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s * per_client)
    wall = time.perf_counter() - t0[0]
    ok = [r for r in replies if r.status == 200]
    for r in replies:
        if r.status not in (200, 503):
            log.warning("a request got %s: %s", r.status or "no answer", r.error)
    return {"clients": n, "requests": n * per_client, "served": len(ok),
            "statuses": {str(k): v for k, v in sorted(Counter(r.status for r in replies).items())},
            "wall_s": round(wall, 3), "requests_per_s": round(len(ok) / wall, 3) if wall > 0 else None,
            "latency_ms": summarize([r.total_ms for r in ok]) if ok else None,
            "ttft_ms": summarize([r.ttft_ms for r in ok if r.ttft_ms is not None]) if ok else None}


# -- the measurement (in the fresh process) ----------------------------------------------------------------------

def _in_process(model: "FaceLLM", image: np.ndarray, question: str, gen, name: str) -> tuple[float, float, int]:
    """(TTFT ms, end-to-end ms, tokens) of what the server does for one request, called in process."""
    from facellm_edge.bench.edge import largest_face

    t0 = time.perf_counter()
    face = largest_face(model.detect(image), name)
    model.encode_faces(image, [face])
    ttft = None
    with model.open_face(face) as session:
        pieces = session.stream(question, generation=gen)
        while True:
            try:
                piece = next(pieces)
            except StopIteration as stop:
                end, n = time.perf_counter(), stop.value.n_generated
                break
            if piece and ttft is None:
                ttft = time.perf_counter()
    return ((ttft or end) - t0) * 1000.0, (end - t0) * 1000.0, n


def _overhead(model: "FaceLLM", base: str, body: bytes, image: np.ndarray, p: dict[str, Any]) -> dict[str, Any]:
    from facellm_edge.llm.sampling import GenerationConfig

    n = int(p["decode_tokens"])
    gen = GenerationConfig(max_tokens=n, stop_at_eos=False)
    samples: dict[str, list[float]] = {k: [] for k in ("in_ttft", "in_e2e", "srv_ttft", "srv_e2e")}
    for i in range(int(p["warmup"]) + int(p["runs"])):
        ttft, e2e, tokens = _in_process(model, image, p["question"], gen, p["image"])
        r = chat_stream(base, body, float(p["request_timeout_s"]))
        if r.status != 200:
            raise RuntimeStageError(f"the server answered {r.status or 'nothing'}: {r.error}")
        if (tokens, r.tokens) != (n, n):
            raise RuntimeStageError(f"{tokens} tokens in process, {r.tokens} through the server instead of {n}; "
                                    "lower --decode-tokens")
        if i >= int(p["warmup"]):
            new = (ttft, e2e, r.ttft_ms if r.ttft_ms is not None else r.total_ms, r.total_ms)
            for key, value in zip(samples, new):
                samples[key].append(value)
    s = {k: summarize(v) for k, v in samples.items()}
    ratio = {m: round(s[f"srv_{k}"]["median"] / s[f"in_{k}"]["median"], 4)
             for m, k in (("ttft", "ttft"), ("end_to_end", "e2e"))}
    return {"in_process": {"ttft_ms": s["in_ttft"], "end_to_end_ms": s["in_e2e"]},
            "server": {"ttft_ms": s["srv_ttft"], "end_to_end_ms": s["srv_e2e"]},
            "ratio": ratio, "goal": GOAL_OVERHEAD, "met": {k: v <= GOAL_OVERHEAD for k, v in ratio.items()}}


def _camera(model: "FaceLLM", photo: np.ndarray, p: dict[str, Any]) -> tuple[Callable[[int], np.ndarray], str]:
    """What the camera stand-in shows: the video's frames looped, or the photo's largest face panned (640x480)."""
    from facellm_edge.bench.config import LiveBenchConfig
    from facellm_edge.bench.edge import largest_face
    from facellm_edge.bench.live import person_crops, person_side, place, video_frames

    if p["video"]:  # its first frames, as many as VIDEO_BYTES holds (they count in the peak RSS)
        n = max(1, min(300, VIDEO_BYTES // video_frames(p["video"], 1)[0].nbytes))
        frames = video_frames(p["video"], n)
        return (lambda i: frames[i % n]), f"{Path(p['video']).name} (at most its first {n} frames), looped"
    w, h = LiveBenchConfig().width, LiveBenchConfig().height
    (person,) = person_crops(photo, [largest_face(model.detect(photo), p["image"]).box], person_side(w, h))
    return (lambda i: place(person, w, h, 0, i)), f"the largest face of {Path(p['image']).name}, panned, {w}x{h}"


def _live(p: dict[str, Any], photo: np.ndarray, body: bytes) -> dict[str, Any]:
    from facellm_edge.bench.edge import runtime_config
    from facellm_edge.runtime.live.loop import LiveConfig
    from facellm_edge.runtime.pipeline import FaceLLM
    from facellm_edge.serve.app import create_app
    from facellm_edge.serve.config import ServeConfig
    from facellm_edge.serve.live import LiveService
    from facellm_edge.serve.metrics import Metrics

    timeout = float(p["request_timeout_s"])
    cfg = ServeConfig(max_queue=int(p["live_clients"]), request_timeout_s=timeout, question=p["question"],
                      max_body_bytes=max(20_000_000, 2 * len(body)))
    threads = int(p["threads"])
    runtime = runtime_config(p, threads=threads)
    runtime = replace(runtime, detector=replace(runtime.detector, n_threads=None)).for_live()  # serve --source's
    with FaceLLM.load(p["bundle"], runtime) as model:
        draw, shows = _camera(model, photo, p)
        live = LiveService(model, cfg, Metrics(), PacedClip(draw, float(p["camera_fps"]), shows))
        with serving(create_app(model, cfg, live)) as base:
            deadline = time.monotonic() + SETTLE_TIMEOUT_S
            while not any(t["done"] for t in live.feed.tracks()):  # someone answered: the loop is warm
                if time.monotonic() > deadline or live.error is not None:
                    raise RuntimeStageError(f"the live loop did not answer its first people within "
                                            f"{SETTLE_TIMEOUT_S:.0f} s ({live.error or 'still answering'})")
                time.sleep(0.05)

            def window(work: Callable[[], Any]) -> tuple[dict[str, Any], Any]:
                before, t0 = live.status(), time.perf_counter()
                out = work()
                after, dt = live.status(), time.perf_counter() - t0
                frames = after["frames"] - before["frames"]
                return {"seconds": round(dt, 3), "frames": frames, "fps": round(frames / dt, 2),
                        "dropped_frames": after["dropped_frames"] - before["dropped_frames"]}, out

            alone, _ = window(lambda: time.sleep(float(p["live_window_s"])))
            busy, load = window(lambda: clients(base, body, int(p["live_clients"]), int(p["requests_per_client"]),
                                                timeout))
            if not live.ready:
                raise RuntimeStageError(f"the live loop stopped: {live.error}")
    return {"source": shows, "camera_fps": float(p["camera_fps"]), "threads": "serve --source's policy: detector 1, "
            f"ONNX Runtime and llama.cpp {threads}; detector on every {LiveConfig(question='-').stride} frame(s)", "alone": alone, "serving": {**busy, "load": load}}


def measure(p: dict[str, Any]) -> dict[str, Any]:
    """Entry point of the fresh process: overhead and load on one model, then the live phase on a reloaded one."""
    import cv2

    from facellm_edge.bench.edge import read_bgr, runtime_config
    from facellm_edge.runtime.pipeline import FaceLLM
    from facellm_edge.serve.app import create_app
    from facellm_edge.serve.config import ServeConfig

    photo = read_bgr(p["image"])
    data, mime = Path(p["image"]).read_bytes(), MIME.get(Path(p["image"]).suffix.lower())
    if mime is None:  # another format: sent as PNG (lossless: the server decodes the same pixels)
        data, mime = cv2.imencode(".png", photo)[1].tobytes(), "image/png"
    body = chat_body(data, mime, p["question"], int(p["decode_tokens"]))
    timeout, levels = float(p["request_timeout_s"]), [int(c) for c in p["concurrency"]]
    queue = max(levels) if p["max_queue"] is None else int(p["max_queue"])
    cfg = ServeConfig(max_queue=queue, request_timeout_s=timeout, max_body_bytes=max(20_000_000, 2 * len(body)))
    with FaceLLM.load(p["bundle"], runtime_config(p, threads=int(p["threads"]))) as model:
        model.detector  # loaded now, as serve does, not inside the first request
        loaded = {"vision": model.encoder.precision, "quant": model.bundle.llm_file(model.config.engine.quant)[0],
                  "rss_loaded_mb": round(rss_mb(), 1)}
        with serving(create_app(model, cfg)) as base:
            overhead = _overhead(model, base, body, photo, p)
            load = [clients(base, body, c, int(p["requests_per_client"]), timeout) for c in levels]
    live = _live(p, photo, body) if p["live"] else None
    return {"loaded": loaded, "max_queue": queue, "request_bytes": len(body), "overhead": overhead, "load": load,
            "live": live}


# -- orchestration and results -----------------------------------------------------------------------------------

def run_serve_bench(cfg: ServeBenchConfig, progress: Callable[[str], None] = lambda _msg: None) -> Path:
    """Run the serve benchmark; returns the output folder (results.json and results.md, written atomically)."""
    from facellm_edge.bench.config import BenchConfig
    from facellm_edge.bench.runner import _validate_early, default_image, default_out, synthetic_bundle, tokenizer_dir
    from facellm_edge.bench.system import machine_info, physical_cores, versions
    from facellm_edge.bundle import load_bundle

    for module in ("fastapi", "uvicorn", "prometheus_client"):
        require(module, "serve")
    info = None if cfg.out is not None else machine_info()  # it imports torch, when installed: not just to refuse
    out = cfg.out if info is None else Path(f"{default_out(Path('benchmarks/results'), info)}-serve")
    check_replaceable(out, force=cfg.force, kind=SERVE_BENCH)  # before any work
    quant, vision = cfg.quant, cfg.vision
    if cfg.synthetic is not None:
        quant, vision = quant or "q4_0", vision or "int8"  # the committed results' fastest pair
        _validate_early(BenchConfig(synthetic=cfg.synthetic, quants=(quant,), vision=(vision,)))  # before the build
    image = Path(cfg.image) if cfg.image is not None else default_image()
    for what, path in (("image", image), ("video", cfg.video)):
        if path is not None and not Path(path).is_file():
            raise InputError(f"{what} not found: {path}")
    info = info or machine_info()  # the load average at the start
    threads = cfg.threads or physical_cores()
    with temporary_directory(prefix="facellm-bench-serve-") as tmp:
        if cfg.synthetic is not None:
            progress(f"building a random-weight '{cfg.synthetic}' checkpoint and exporting it ({vision} + {quant})")
            _, bundle_dir, _ = synthetic_bundle(cfg.synthetic, tokenizer_dir(cfg.tokenizer), Path(tmp), (quant,),
                                                (vision,), threads, cfg.timeout_s, verify=False)
            model = f"synthetic {cfg.synthetic} (random weights)"
        else:
            bundle_dir = load_bundle(cfg.bundle).root  # every sha256 checked once, here
            model = f"bundle {bundle_dir.name}"
        payload = json.loads(json.dumps({**asdict(cfg), "bundle": bundle_dir, "image": image, "threads": threads,
                                         "quant": quant, "vision": vision, "out": None}, default=str))
        progress(f"serving {model}: overhead, {', '.join(map(str, cfg.concurrency))} clients"
                 + (", the live loop" if cfg.live else ""))
        measured = run_isolated("facellm_edge.bench.serve:measure", payload, timeout_s=cfg.timeout_s,
                                label="serve")
    # the results name files, never their folders (no path to a user's photos)
    settings = {**{k: v for k, v in payload.items() if k not in ("out", "force", "tokenizer")}, "model": model,
                **{k: Path(payload[k]).name for k in ("bundle", "image", "video", "detector_model") if payload[k]}}
    results = {"schema": SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "settings": {**settings, "max_queue": measured.pop("max_queue")}, "machine": info,
               "versions": versions(), **measured}
    with atomic_directory(Path(out), force=cfg.force, kind=SERVE_BENCH) as tmp_out:
        (tmp_out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        (tmp_out / "results.md").write_text(to_markdown(results), encoding="utf-8")
    return Path(out)


def _ms(s: dict[str, Any] | None, key: str = "median") -> str:
    return "–" if s is None else f"{s[key]:,.0f} ms" if s[key] >= 100 else f"{s[key]:.1f} ms"


def to_markdown(r: dict[str, Any]) -> str:
    s, o, m = r["settings"], r["overhead"], r["machine"]
    lines = [f"# facellm-edge serve benchmark: {s['model']}", "",
             f"{r['loaded']['vision']} vision + {r['loaded']['quant']} LLM, {s['threads']} threads, "
             f"{s['decode_tokens']} tokens per answer, {m['cpu_model']} ({m['usable_cores']} cores usable), "
             f"peak RSS {r['memory']['peak_rss_mb']:,.0f} MB.", "",
             f"## Serve overhead (medians of {s['runs']}, interleaved)", "",
             "| path | TTFT | end-to-end |", "|---|---|---|",
             f"| in process (`FaceSession.stream`) | {_ms(o['in_process']['ttft_ms'])} | "
             f"{_ms(o['in_process']['end_to_end_ms'])} |",
             f"| server (OpenAI streaming over HTTP) | {_ms(o['server']['ttft_ms'])} | "
             f"{_ms(o['server']['end_to_end_ms'])} |"]
    lines.append("| server / in process (goal ≤ {:.2f}) | {:.3f}× ({}) | {:.3f}× ({}) |".format(
        o["goal"], o["ratio"]["ttft"], "met" if o["met"]["ttft"] else "missed", o["ratio"]["end_to_end"],
        "met" if o["met"]["end_to_end"] else "missed"))
    lines += ["", f"## Concurrent clients ({s['requests_per_client']} requests each, queue {s['max_queue']})", "",
              "| clients | served / sent | statuses | requests/s | latency p50 | latency p99 | TTFT p50 |",
              "|---|---|---|---|---|---|---|"]
    for x in r["load"] + ([{**r["live"]["serving"]["load"], "live": True}] if r["live"] else []):
        lines.append(f"| {x['clients']}{' (live loop running)' if x.get('live') else ''} | {x['served']} / "
                     f"{x['requests']} | {', '.join(f'{k}: {v}' for k, v in x['statuses'].items())} | "
                     f"{x['requests_per_s']} | {_ms(x['latency_ms'])} | {_ms(x['latency_ms'], 'p99')} | "
                     f"{_ms(x['ttft_ms'])} |")
    if r["live"]:
        lv = r["live"]
        lines += ["", f"## Frame loop ({lv['source']}; camera {lv['camera_fps']:g} FPS; {lv['threads']})", "",
                  "| phase | FPS | dropped frames | seconds |", "|---|---|---|---|",
                  f"| alone | {lv['alone']['fps']} | {lv['alone']['dropped_frames']} | {lv['alone']['seconds']} |",
                  f"| serving {lv['serving']['load']['clients']} clients | {lv['serving']['fps']} | "
                  f"{lv['serving']['dropped_frames']} | {lv['serving']['seconds']} |"]
    return "\n".join(lines) + "\n"
