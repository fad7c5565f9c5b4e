"""`data build` against a real local OpenAI-compatible HTTP server with scripted replies (retries, validation, resume,
crash recovery, kill -9), plus its bad-input errors."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import pytest

from facellm_edge.cli import main
from facellm_edge.data.labels import read_labels
from facellm_edge.errors import InputError

REPO = Path(__file__).resolve().parents[1]
GOOD = {"question": "How would you describe the light falling on this face?",
        "answer": "Soft daylight comes from the front left, the exposure is balanced and the focus is sharp."}


def _chat(content: str, prompt_tokens: int = 900, completion_tokens: int = 60) -> bytes:
    return json.dumps({"id": "x", "object": "chat.completion",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                    "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}}).encode()


class ScriptedServer:
    """OpenAI-compatible /v1/chat/completions: pops scripted (status, headers, body) replies, then serves GOOD."""

    def __init__(self, script=(), delay_s: float = 0.0, signal_after: int | None = None) -> None:
        self.script = list(script)
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.delay_s = delay_s
        self.signal_after = signal_after
        self.reached = threading.Event()
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with outer.lock:
                    outer.requests.append(json.loads(body))
                    outer.headers.append(dict(self.headers))
                    item = outer.script.pop(0) if outer.script else (200, {}, _chat(json.dumps(GOOD)))
                    n = len(outer.requests)
                if outer.signal_after is not None and n >= outer.signal_after:
                    outer.reached.set()  # request n arrived: its worker already wrote its previous record
                if self.path != "/v1/chat/completions":
                    item = (404, {}, b'{"error": "not found"}')
                if outer.delay_s:
                    time.sleep(outer.delay_s)
                status, headers, payload = item
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture()
def fairface(tmp_path, astronaut_bgr, t1_bgr) -> tuple[Path, Path]:
    """A tiny FairFace-like folder: two real face photos as JPEGs and a label CSV with an extra column."""
    images = tmp_path / "fairface"
    (images / "val").mkdir(parents=True)
    cv2.imwrite(str(images / "val" / "1.jpg"), astronaut_bgr)
    cv2.imwrite(str(images / "val" / "2.jpg"), t1_bgr)
    csv = tmp_path / "fairface_label_val.csv"
    csv.write_text("file,age,gender,race,service_test,eyewear\n"
                   "val/1.jpg,30-39,Female,White,True,none\n"
                   "val/2.jpg,20-29,Male,East Asian,False,glasses\n")
    return csv, images


def _args(csv, images, out, url, *extra):
    return ["data", "build", "--labels", str(csv), "--images", str(images), "--out", str(out), "--base-url", url,
            "--model", "test-model", "--families", "lighting_quality,pose", "--workers", "1", "--rpm", "0",
            "--backoff", "0.01", *extra]


def _records(path: Path) -> list[dict]:
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    return [json.loads(line) for line in raw.decode().splitlines()]


def test_build_retries_validates_and_resumes(fairface, tmp_path, monkeypatch, capsys):
    csv, images = fairface
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-123")
    leak = {"question": "Is this White woman well lit?", "answer": "Yes, the light is soft."}
    script = [
        (429, {"Retry-After": "0"}, b'{"error": "rate limited"}'),
        (500, {}, b'{"error": "boom"}'),
        (200, {}, _chat(json.dumps({"question": "Describe the pose.", "answer": "I'm sorry, I can't help with that."}))),
        (200, {}, _chat("{not json")),
        (200, {}, _chat(json.dumps(leak))),
    ]
    out = tmp_path / "qa.jsonl"
    with ScriptedServer(script) as server:
        rc = main(_args(csv, images, out, server.url, "--max-invalid", "4"))
        err = capsys.readouterr().err
        assert rc == 0, err
        # 4 tasks: 2 transient retries + 3 invalid replies + 4 good = 9 requests
        assert len(server.requests) == 9
        assert "4/4 records (4 new, 0 resumed)" in err and "2 retries" in err and "3 invalid" in err
        assert server.headers[0]["Authorization"] == "Bearer sk-test-123"
        req = server.requests[-1]
        assert req["model"] == "test-model" and req["response_format"] == {"type": "json_object"}
        image_part = req["messages"][1]["content"][1]["image_url"]["url"]
        assert image_part.startswith("data:image/jpeg;base64,")
        sent = base64.b64decode(image_part.split(",", 1)[1])
        assert sent in ((images / "val" / "1.jpg").read_bytes(), (images / "val" / "2.jpg").read_bytes())
        prompt = req["messages"][1]["content"][0]["text"]
        assert "Known labels" in prompt

        recs = _records(out)
        assert sorted(r["id"] for r in recs) == sorted(
            f"val/{i}.jpg#{f}" for i in (1, 2) for f in ("lighting_quality", "pose"))
        for r in recs:
            assert set(r) >= {"id", "image", "conversations", "family", "labels"}
            human, gpt = r["conversations"]
            assert human == {"from": "human", "value": "<image>\n" + GOOD["question"]}
            assert gpt == {"from": "gpt", "value": GOOD["answer"]}
            assert "service_test" not in r["labels"]
        assert recs[0]["labels"] in ({"age": "30-39", "gender": "Female", "race": "White", "eyewear": "none"},
                                     {"age": "20-29", "gender": "Male", "race": "East Asian", "eyewear": "glasses"})
        # what `facellm-edge train` reads: every record is accepted by its loader
        from facellm_edge.train.data import load_samples

        assert len(load_samples(out, images, skip_bad=False)) == 4

        # rerun: nothing left to do, no request sent
        n_before = len(server.requests)
        assert main(_args(csv, images, out, server.url)) == 0
        assert len(server.requests) == n_before
        assert "0 new, 4 resumed" in capsys.readouterr().err

        # a torn last line (crash mid-write) is truncated; a new family is added without duplicates
        with open(out, "ab") as f:
            f.write(b'{"id": "val/9.jpg#pose", "ima')
        args = _args(csv, images, out, server.url)
        args[args.index("--families") + 1] = "lighting_quality,pose,expression"
        assert main(args) == 0
        recs = _records(out)
        ids = [r["id"] for r in recs]
        assert len(ids) == len(set(ids)) == 6
        assert len(server.requests) == n_before + 2


def test_build_gives_up_on_repeated_invalid_replies(fairface, tmp_path, monkeypatch, capsys):
    csv, images = fairface
    monkeypatch.setenv("MY_KEY", "k")
    refusal = (200, {}, _chat(json.dumps({"question": "What?", "answer": "As an AI, I cannot analyse faces."})))
    out = tmp_path / "qa.jsonl"
    with ScriptedServer([refusal] * 2) as server:
        rc = main(_args(csv, images, out, server.url, "--api-key-env", "MY_KEY", "--max-invalid", "2", "--limit", "1"))
    err = capsys.readouterr().err
    assert rc == 6 and "1 item(s) got no valid reply" in err and "refusal" in err
    assert len(_records(out)) == 1  # the other family went through


def test_build_endpoint_unreachable_stops_with_progress_saved(fairface, tmp_path, monkeypatch, capsys):
    csv, images = fairface
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    out = tmp_path / "qa.jsonl"
    with ScriptedServer() as server:  # first a partial run that completes one image
        assert main(_args(csv, images, out, server.url, "--limit", "1")) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    capsys.readouterr()
    rc = main(_args(csv, images, out, dead, "--max-attempts", "3"))
    err = capsys.readouterr().err
    assert rc == 6, err
    assert "cannot reach" in err and "gave up after 3 attempts" in err and "progress saved" in err
    assert "2/4" in err and "rerun" in err
    assert len(_records(out)) == 2


def test_build_missing_key(fairface, tmp_path, monkeypatch, capsys):
    csv, images = fairface
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    rc = main(_args(csv, images, tmp_path / "qa.jsonl", "http://127.0.0.1:9/v1"))
    assert rc == 2
    assert "OPENAI_API_KEY" in capsys.readouterr().err
    assert not (tmp_path / "qa.jsonl").exists()


def test_build_missing_image(fairface, tmp_path, monkeypatch, capsys):
    csv, images = fairface
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    (images / "val" / "2.jpg").unlink()
    rc = main(_args(csv, images, tmp_path / "qa.jsonl", "http://127.0.0.1:9/v1"))
    assert rc == 3
    assert "val/2.jpg" in capsys.readouterr().err


@pytest.mark.parametrize("text, expected", [
    ("file,age,gender\nval/1.jpg,20-29,Male\n", "lacks column(s) race"),
    ("file,age,gender,race\nval/1.jpg,20-29,Male,White\nval/2.jpg,20-29,,White\n", "row 3: column 'gender' is empty"),
    ("file,age,gender,race\nval/1.jpg,twenty,Male,White\n", "row 2: column 'age'"),
    ("file,age,gender,race\nval/1.jpg,20-29,Male\n", "row 2 has fewer fields"),
    ("file,age,gender,race\nval/1.jpg,20-29,Male,White,extra\n", "row 2 has more fields"),
    ("file,age,gender,race\nval/1.jpg,20-29,Male,White\nval/1.jpg,3-9,Female,Black\n", "already appears in row 2"),
    # one image spelled two ways is one image (it gave two records of one id, and two paid requests)
    ("file,age,gender,race\nval/1.jpg,20-29,Male,White\n./val//1.jpg,3-9,Female,Black\n", "already appears in row 2"),
])
def test_malformed_label_csv(tmp_path, text, expected, monkeypatch, capsys):
    csv = tmp_path / "labels.csv"
    csv.write_text(text)
    with pytest.raises(InputError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        read_labels(csv)
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    assert main(["data", "build", "--labels", str(csv), "--images", str(tmp_path), "--out",
                 str(tmp_path / "o.jsonl")]) == 3
    assert expected in capsys.readouterr().err


def test_kill_9_mid_run_then_resume(fairface, tmp_path):
    """SIGKILL the builder while requests are in flight; the rerun completes with no duplicate and no loss."""
    csv, images = fairface
    out = tmp_path / "qa.jsonl"
    env = {**os.environ, "OPENAI_API_KEY": "k"}
    families = "demographics,facial_structure,skin_texture,expression,lighting_quality,pose,forensic,description"
    # 3 workers: requests 4, 5, 6 each come from a worker that has finished a task, so >= 3 records are on disk
    # when request 6 arrives; the kill then lands while 3 requests are in flight
    with ScriptedServer(delay_s=0.15, signal_after=6) as server:
        args = _args(csv, images, out, server.url, "--workers", "3")
        args[args.index("--families") + 1] = families
        proc = subprocess.Popen([sys.executable, "-m", "facellm_edge.cli", *args], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            assert server.reached.wait(timeout=60), proc.stderr.read().decode() if proc.poll() is not None else ""
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        partial = _records(out) if out.stat().st_size else []
        assert 3 <= len(partial) < 16
        done = len(server.requests)
        rc = subprocess.run([sys.executable, "-m", "facellm_edge.cli", *args], cwd=REPO, env=env,
                            capture_output=True, timeout=120)
        assert rc.returncode == 0, rc.stderr.decode()
    recs = _records(out)
    ids = [r["id"] for r in recs]
    assert len(ids) == len(set(ids)) == 16
    assert ids[: len(partial)] == [r["id"] for r in partial]  # resumed run appended, never rewrote
    assert len(server.requests) - done == 16 - len(partial)


def test_build_fatal_http_error_stops_without_retry(fairface, tmp_path, monkeypatch, capsys):
    csv, images = fairface
    monkeypatch.setenv("OPENAI_API_KEY", "wrong")
    out = tmp_path / "qa.jsonl"
    with ScriptedServer([(401, {}, b'{"error": "invalid api key"}')]) as server:
        rc = main(_args(csv, images, out, server.url))
        assert len(server.requests) == 1
    err = capsys.readouterr().err
    assert rc == 6 and "HTTP 401" in err and "invalid api key" in err and "progress saved" in err
