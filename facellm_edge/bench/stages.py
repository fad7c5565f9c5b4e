"""Stage timers, memory measurement and isolated runs.

* :class:`StageTimer` collects wall-clock samples per stage (``time.perf_counter``) and summarises them as median,
  p90, min and max over the measured runs (warm-up runs are timed into a separate timer and discarded).
* :class:`RssSampler` samples the process RSS on a background thread (stopped by an event) so the report can show
  the resident memory after loading and while running.
* :func:`run_isolated` runs one benchmark configuration in a fresh Python subprocess, so its peak RSS
  (``VmHWM``) belongs to that configuration alone and no library state leaks between configurations;
  :func:`merge_rounds` pools the rounds of one configuration that the runner interleaved with the others'.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import statistics
import threading
import time
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator

from facellm_edge.errors import FaceLLMEdgeError, RuntimeStageError

log = logging.getLogger(__name__)


def percentile(samples: list[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0..100) of a non-empty list."""
    xs = sorted(samples)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(samples: list[float]) -> dict[str, Any]:
    """``{"median", "p90", "p99", "min", "max", "n", "samples"}`` of a list of numbers (ms, tok/s, ...)."""
    if not samples:
        raise ValueError("no samples to summarise")
    return {
        "median": round(statistics.median(samples), 3),
        "p90": round(percentile(samples, 90), 3),
        "p99": round(percentile(samples, 99), 3),
        "min": round(min(samples), 3),
        "max": round(max(samples), 3),
        "n": len(samples),
        "samples": [round(s, 3) for s in samples],
    }


class StageTimer:
    """Per-stage samples. ``with timer.time("vision"): ...`` or ``timer.add("decode_tok_s", rate)``."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = defaultdict(list)

    @contextlib.contextmanager
    def time(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.samples[stage].append((time.perf_counter() - t0) * 1000.0)

    def add(self, stage: str, value: float) -> None:
        self.samples[stage].append(float(value))

    def summary(self) -> dict[str, dict[str, Any]]:
        return {k: summarize(v) for k, v in self.samples.items() if v}


def repeat(fn: Callable[[StageTimer], None], runs: int, warmup: int) -> StageTimer:
    """Call ``fn(timer)`` ``warmup`` times into a throw-away timer, then ``runs`` times into the returned one."""
    scratch = StageTimer()
    for _ in range(warmup):
        fn(scratch)
    timer = StageTimer()
    for _ in range(runs):
        fn(timer)
    return timer


def merge_rounds(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration's result from its rounds (one fresh process each, see ``runner``): the stage samples of
    every round pooled and summarised again, the memory figures' maxima (each round's peak is a peak of the same
    configuration), the wall times summed, the load time's median; everything else from the first round."""
    if not parts:
        raise ValueError("no rounds to merge")
    merged = dict(parts[0])
    keys = [k for k in parts[0]["stages"] if all(k in p["stages"] for p in parts)]
    merged["stages"] = {k: summarize([x for p in parts for x in p["stages"][k]["samples"]]) for k in keys}
    merged["memory"] = {k: max(p["memory"][k] for p in parts) for k in parts[0]["memory"]
                        if all(isinstance(p["memory"].get(k), (int, float)) for p in parts)}
    merged["wall_s"] = round(sum(p.get("wall_s", 0.0) for p in parts), 2)
    if all("load_ms" in p for p in parts):
        merged["load_ms"] = round(statistics.median(p["load_ms"] for p in parts), 1)
    merged["rounds"] = len(parts)
    merged.pop("started", None)
    if all("started" in p for p in parts):
        merged["round_starts"] = [p["started"] for p in parts]  # epoch seconds: the interleaving, for the record
    return merged


def rss_reader() -> Callable[[], float]:
    """A function returning this process's current RSS in MB: psutil's when installed, else ``/proc/self/statm``'s
    resident pages (psutil is optional: `bench --bundle` runs on a device without it), else the peak so far
    (:func:`peak_rss_mb`: an upper bound, on a system with neither)."""
    try:
        import psutil
    except ImportError:
        statm = Path("/proc/self/statm")
        if not statm.is_file():
            log.info("no psutil and no /proc: current memory is reported as the peak so far")
            return peak_rss_mb
        page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20
        return lambda: int(statm.read_text().split()[1]) * page_mb
    proc = psutil.Process()
    return lambda: proc.memory_info().rss / 2**20


def rss_mb() -> float:
    return rss_reader()()


def peak_rss_mb() -> float:
    """Peak RSS of this process so far.

    Linux: ``VmHWM`` from ``/proc/self/status`` (the high-water mark of this process's own address space).
    ``ru_maxrss`` is not used there: the kernel carries it over ``fork`` + ``exec``, so a child started by a big
    parent would report the parent's peak. Elsewhere ``ru_maxrss`` (macOS: bytes).
    """
    import resource
    import sys

    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def gpu_memory_reader() -> Callable[[], float] | None:
    """A function returning the MB in use on GPU 0 (NVML, the driver's own count: CUDA context, allocator pools and
    TensorRT's workspace included, which a framework's own counter leaves out), or None where NVML is missing
    (``nvidia-ml-py`` not installed, no NVIDIA driver). Device-wide: the bench runs one configuration at a time, so
    what it reads above the figure before loading is that configuration's."""
    try:
        import pynvml
    except ImportError:
        log.info("nvidia-ml-py is not installed: GPU memory is not measured (pip install nvidia-ml-py)")
        return None
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    except pynvml.NVMLError as exc:
        log.info("NVML unavailable (%s): GPU memory is not measured", exc)
        return None
    return lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20


def gpu_peak(sampler: "RssSampler", start_mb: float | None) -> dict[str, float]:
    """``{"gpu_peak_mb": ...}``: the sampled peak of GPU memory in use above ``start_mb`` (read before loading), or
    nothing where GPU memory was not sampled."""
    if start_mb is None or sampler.gpu_peak_mb is None:
        return {}
    return {"gpu_peak_mb": round(sampler.gpu_peak_mb - start_mb, 1)}


class RssSampler:
    """Samples this process's RSS (and, given ``gpu``, GPU memory in use: :func:`gpu_memory_reader`) every
    ``interval_s`` on a daemon thread until :meth:`stop`."""

    def __init__(self, interval_s: float = 0.02, *, gpu: Callable[[], float] | None = None) -> None:
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self.gpu_peak_mb: float | None = None
        self._gpu = gpu
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def _loop(self) -> None:
        rss = rss_reader()
        while True:
            self.peak_mb = max(self.peak_mb, rss())
            if self._gpu is not None:
                self.gpu_peak_mb = max(self.gpu_peak_mb or 0.0, self._gpu())
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> float:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        return self.peak_mb


# -- isolated runs -------------------------------------------------------------------------------------------
# The child is ``python -m facellm_edge.bench.stages TARGET IN.json OUT.json``: a fresh interpreter (not a
# multiprocessing ``spawn``, which would re-import the caller's ``__main__``), so nothing the parent imported or
# allocated counts towards the configuration's peak RSS.


def _child_main(target: str, in_path: str, out_path: str) -> int:
    import json

    payload = json.loads(Path(in_path).read_text(encoding="utf-8"))
    logging.basicConfig(level=int(payload.pop("_log_level", logging.WARNING)),
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        module_name, fn_name = target.split(":")
        fn = getattr(importlib.import_module(module_name), fn_name)
        result = fn(payload)
        result["memory"] = {**result.get("memory", {}), "peak_rss_mb": round(peak_rss_mb(), 1)}
        msg: dict[str, Any] = {"status": "ok", "result": result}
    except FaceLLMEdgeError as exc:
        msg = {"status": "error", "type": type(exc).__name__, "message": str(exc)}
    except Exception as exc:  # report anything else with its traceback
        msg = {"status": "crash", "type": type(exc).__name__, "message": str(exc),
               "traceback": traceback.format_exc()}
    Path(out_path).write_text(json.dumps(msg), encoding="utf-8")
    return 0


def run_isolated(target: str, payload: dict[str, Any], *, timeout_s: float, label: str) -> dict[str, Any]:
    """Run ``module:function(payload) -> dict`` in a fresh interpreter; add its peak RSS to the result.

    A typed error raised in the child is re-raised here with the same type and message; a crash or a timeout
    becomes a :class:`RuntimeStageError` naming the configuration.
    """
    import json
    import subprocess
    import sys

    import facellm_edge.errors as errors
    from facellm_edge.io import temporary_directory

    with temporary_directory(prefix="facellm-bench-") as tmp:
        in_path, out_path = Path(tmp) / "in.json", Path(tmp) / "out.json"
        in_path.write_text(json.dumps({**payload, "_log_level": logging.getLogger().getEffectiveLevel()}),
                           encoding="utf-8")
        cmd = [sys.executable, "-m", "facellm_edge.bench.stages", target, str(in_path), str(out_path)]
        t0 = time.perf_counter()
        log.info("running %s in a fresh process", label)
        try:
            proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeStageError(f"benchmark configuration '{label}' did not finish within {timeout_s:.0f} s; "
                                    "lower --runs/--decode-tokens or drop configurations") from exc
        wall_s = time.perf_counter() - t0
        if not out_path.is_file():
            tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
            raise RuntimeStageError(f"benchmark configuration '{label}' crashed (exit code {proc.returncode}): "
                                    f"{tail[0]}")
        msg = json.loads(out_path.read_text(encoding="utf-8"))
    if msg["status"] == "ok":
        result = msg["result"]
        result["wall_s"] = round(wall_s, 2)
        return result
    if msg["status"] == "error":
        cls = getattr(errors, msg["type"], None)
        if isinstance(cls, type) and issubclass(cls, FaceLLMEdgeError) and cls is not errors.MissingExtraError:
            raise cls(f"{label}: {msg['message']}")
        raise RuntimeStageError(f"{label}: {msg['message']}")
    log.debug("traceback of %s:\n%s", label, msg.get("traceback", ""))
    first = (msg["message"].splitlines() or [""])[0]
    raise RuntimeStageError(f"benchmark configuration '{label}' failed: {msg['type']}: {first} "
                            "(run with --debug for the traceback)")


if __name__ == "__main__":
    import sys

    sys.exit(_child_main(*sys.argv[1:4]))
