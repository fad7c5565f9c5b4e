"""Ctrl-C (SIGINT) and SIGTERM (systemd, ``docker stop``): one line, exit 130 / 143, cleanups run, temporary files
go, finished results stay — also when the signal lands inside llama.cpp's model load."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import pytest

from facellm_edge.cli import main

STOP = {"SIGINT": (130, "interrupted"), "SIGTERM": (143, "terminated")}


def _env(tmp_path: Path) -> dict[str, str]:
    """Own system temp dir (so leftovers can be counted) and cache; offline."""
    sys_tmp = tmp_path / "sys_tmp"
    sys_tmp.mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(sys_tmp), "XDG_CACHE_HOME": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}


def _ours_in(sys_tmp: Path) -> list[str]:
    return [p.name for p in sys_tmp.iterdir() if p.name.startswith(("facellm", "tmp"))]


def _hidden(d: Path) -> list[str]:
    return [p.name for p in d.iterdir() if p.name.startswith(".")]


def _clean_stop(stderr: str, line: str) -> None:
    assert stderr.strip().splitlines()[-1] == line, stderr[-3000:]
    assert "Traceback" not in stderr and "Exception ignored" not in stderr and "unexpected" not in stderr


# -- the handler itself -------------------------------------------------------------------------------------
def test_first_signal_interrupts_second_lets_cleanup_finish_third_forces():
    from facellm_edge.cli import _StopSignals

    int_before, term_before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    cleaned = []
    with _StopSignals() as stop:
        with pytest.raises(KeyboardInterrupt):
            try:
                signal.raise_signal(signal.SIGTERM)  # raise_signal runs the Python handler before it returns
            finally:
                signal.raise_signal(signal.SIGINT)  # impatient second press: must not cut the cleanup short
                cleaned.append(True)
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # a third one stops at once
    assert cleaned == [True] and stop.signum == signal.SIGTERM  # the first signal decides the exit code
    assert signal.getsignal(signal.SIGINT) is int_before and signal.getsignal(signal.SIGTERM) is term_before


def test_main_restores_handlers_and_keeps_ignored_signals_ignored(capsys):
    from facellm_edge.cli import _StopSignals

    int_before = signal.getsignal(signal.SIGINT)
    term_before = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # e.g. started under nohup
    try:
        with _StopSignals():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGINT) is not int_before
        assert main(["--version"]) == 0 and "facellm-edge" in capsys.readouterr().out
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN and signal.getsignal(signal.SIGINT) is int_before
    finally:
        signal.signal(signal.SIGTERM, term_before)


# -- a signal inside llama.cpp's model load ---------------------------------------------------------------
# A real signal sent from within the load: a logging handler on llama.cpp's log routing sends it when llama.cpp
# reports its first (vocabulary) line, i.e. while llama_model_load_from_file runs. Before the fix the
# KeyboardInterrupt was raised inside the ctypes log callback ("Exception ignored …") and the load carried on.
_SIGNAL_IN_LOAD = """
import logging, os, signal, sys
class SendOnFirstRecord(logging.Handler):
    fired = False
    def emit(self, record):
        if not SendOnFirstRecord.fired:
            SendOnFirstRecord.fired = True
            os.kill(os.getpid(), signal.{sig})
hook = logging.getLogger("facellm_edge.llama_cpp")
hook.setLevel(logging.DEBUG)
hook.propagate = False
hook.addHandler(SendOnFirstRecord())
"""


@pytest.mark.slow  # tiny_bundle
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_during_llama_load_stops_ask(sig, tiny_bundle, yunet_model, astronaut_bgr, tmp_path):
    photo = tmp_path / "p.png"
    cv2.imwrite(str(photo), astronaut_bgr)
    code = _SIGNAL_IN_LOAD.format(sig=sig) + textwrap.dedent(f"""
        from facellm_edge.cli import main
        rc = main(["ask", {str(photo)!r}, "Age?", "--bundle", {str(tiny_bundle)!r}, "--detector-model",
                   {str(yunet_model)!r}, "--max-tokens", "2"])
        print("fired", SendOnFirstRecord.fired)
        sys.exit(rc)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=_env(tmp_path),
                       cwd=tmp_path)
    code_, line = STOP[sig]
    assert r.returncode == code_, r.stderr[-3000:]
    _clean_stop(r.stderr, line)
    assert r.stderr.count("\n") == 1  # just the one line
    assert r.stdout == "fired True\n"  # the signal came during the load, and no answer was made after it


@pytest.mark.slow  # tiny_bundle
def test_sigint_during_llama_load_python_api(tiny_bundle, tmp_path):
    """Without the CLI (Python's own KeyboardInterrupt handler): the engine raises KeyboardInterrupt, frees what it
    loaded, restores the handler, and the next load works."""
    gguf = tiny_bundle / "llm" / "q8_0.gguf"
    code = _SIGNAL_IN_LOAD.format(sig="SIGINT") + textwrap.dedent(f"""
        from facellm_edge.llm.engine import EngineConfig, LlamaEngine
        try:
            LlamaEngine({str(gguf)!r}, EngineConfig(n_ctx=256))
        except KeyboardInterrupt:
            print("KeyboardInterrupt", SendOnFirstRecord.fired)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        engine = LlamaEngine({str(gguf)!r}, EngineConfig(n_ctx=256))
        print("reloaded", engine.n_vocab > 0)
        engine.close()
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=_env(tmp_path),
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout == "KeyboardInterrupt True\nreloaded True\n"
    assert "Exception ignored" not in r.stderr


# -- export and run stop cleanly ----------------------------------------------------------------------------
def _wait_for(proc: subprocess.Popen, stream, pattern: str, timeout: float = 300) -> list[str]:
    """Read ``stream`` line by line until a line contains ``pattern``; the lines read."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            pytest.fail(f"the process ended (rc {proc.wait()}) before '{pattern}':\n" + "".join(lines)[-3000:])
        lines.append(line)
        if pattern in line:
            return lines
    pytest.fail(f"no '{pattern}' within {timeout} s")


@pytest.mark.slow  # exports
@pytest.mark.parametrize("sigs", ["SIGINT", "SIGTERM", "SIGINT SIGINT"])
def test_signal_mid_export_leaves_nothing(sigs, tiny_checkpoint, tmp_path):
    """Also an impatient double Ctrl-C: the second press must not cut the cleanup of the first short."""
    work = tmp_path / "work"
    work.mkdir()
    out = work / "bundle"
    proc = subprocess.Popen([sys.executable, "-m", "facellm_edge.cli", "export", str(tiny_checkpoint), "--out",
                             str(out), "--quant", "f32,q8_0", "--no-verify"], cwd=tmp_path, env=_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = _wait_for(proc, proc.stderr, "load checkpoint")  # a step is done: the bundle is half-written
        for sig in sigs.split():
            proc.send_signal(getattr(signal, sig))
        _, rest = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    code, line = STOP[sigs.split()[0]]
    stderr = "".join(seen) + rest
    assert proc.returncode == code, stderr[-3000:]
    _clean_stop(stderr, line)
    # stopped at once, not at the end: no step after the one under way when the signal came reports done
    assert sum("✓" in ln for ln in rest.splitlines()) <= 1, stderr[-3000:]
    assert list(work.iterdir()) == []  # no bundle, no hidden temp dir
    assert _ours_in(tmp_path / "sys_tmp") == []  # no facellm-tok-* or other temp dir in the system temp dir


@pytest.mark.slow  # tiny_bundle
def test_sigterm_mid_run_keeps_results_and_removes_temps(long_video, tiny_bundle, yunet_model, tmp_path):
    """`docker stop` on `run`: exit 143 with one line, the annotated video so far is kept, no hidden temp file."""
    work = tmp_path / "work"
    work.mkdir()
    video_out = work / "annotated.mp4"
    proc = subprocess.Popen([sys.executable, "-m", "facellm_edge.cli", "run", "--source", str(long_video),
                             "--question", "Age?", "--no-display", "--output", str(video_out), "--bundle",
                             str(tiny_bundle), "--detector-model", str(yunet_model), "--max-tokens", "2",
                             "--threads", "1"],
                            cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = _wait_for(proc, proc.stdout, '"track_id"')  # the first answer streamed: the run is under way
        proc.send_signal(signal.SIGTERM)
        rest, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 143, stderr[-3000:]
    _clean_stop(stderr, "terminated")
    assert stderr.count("\n") == 1
    records = [json.loads(line) for line in "".join(first).splitlines() + rest.splitlines()]
    assert records and all(r["question"] == "Age?" for r in records)
    assert _hidden(work) == [] and [p.name for p in work.iterdir()] == ["annotated.mp4"]
    cap = cv2.VideoCapture(str(video_out))
    frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    ok, _ = cap.read()
    cap.release()
    assert ok and 0 < frames < 1200  # the frames up to the stop, in a playable file (long_video has 1,200)
    assert _ours_in(tmp_path / "sys_tmp") == []
