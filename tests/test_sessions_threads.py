"""Sessions under threads and misuse, on the tiny bundle (real detector, ONNX Runtime and llama.cpp): a one-shot
ask keeps the faces it opened until it has answered them, calls that hand out no session free their cells, and a
session refused a close stays usable."""

from __future__ import annotations

import threading

import pytest

from facellm_edge.errors import RuntimeStageError, UsageError
from facellm_edge.runtime.config import EncoderConfig, EngineConfig, GenerationConfig, RuntimeConfig
from facellm_edge.runtime.pipeline import FaceLLM

pytestmark = pytest.mark.slow  # tiny_bundle


def _load(tiny_bundle, yunet_model, **engine) -> FaceLLM:
    from facellm_edge.runtime.config import DetectorConfig

    return FaceLLM.load(tiny_bundle, RuntimeConfig(
        detector=DetectorConfig(model_path=yunet_model), encoder=EncoderConfig(precision="fp32"),
        engine=EngineConfig(quant="f32", **engine), generation=GenerationConfig(max_tokens=2)))


def test_a_prefill_on_another_thread_waits_for_the_faces_an_ask_has_opened(tiny_bundle, yunet_model, t1_bgr):
    """One KV slot. Thread A opens a face for an answer (pinned, as ask does); thread B's prefill needs that slot:
    it waits until A has answered, instead of evicting A's face between its prefill and its answer (ask from
    several threads then failed with "evicted" on sessions it had just opened)."""
    with _load(tiny_bundle, yunet_model, max_slots=1) as m:
        faces = m.encode_faces_checked(t1_bgr, m.detect(t1_bgr)[:2])
        (a,) = m.open_encoded([faces[0]], pin=True)
        opened: list = []
        b = threading.Thread(target=lambda: opened.append(m.open_encoded([faces[1]], pin=True)[0]))
        b.start()
        b.join(timeout=1.0)
        assert b.is_alive() and not opened  # waiting for A's slot
        assert a.ask("Age?").text is not None and a.turns == 1  # not evicted under A
        b.join(timeout=60)
        assert not b.is_alive() and opened[0].cached and not a.cached  # then B took the slot
        opened[0].close()
        # this thread's own pin cannot go while it waits: a usage error, not a deadlock
        (c,) = m.open_encoded([faces[0]], pin=True)
        with pytest.raises(UsageError, match="hold conversations opened for an answer that has not run yet"):
            m.open_encoded([faces[1]], pin=True)
        c.close()  # closing ends the pin too
        m.open_encoded([faces[1]], pin=True)[0].close()


def test_asks_from_four_threads_all_answer(tiny_bundle, yunet_model, t1_bgr):
    with _load(tiny_bundle, yunet_model, max_slots=2) as m:
        errors: list[BaseException] = []

        def asks() -> None:
            for _ in range(3):
                try:
                    assert len(m.ask(t1_bgr, "Age?")) == 6
                except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
                    errors.append(exc)

        threads = [threading.Thread(target=asks) for _ in range(4)]
        [t.start() for t in threads]
        [t.join(timeout=300) for t in threads]
        assert not errors, errors


def test_calls_that_hand_out_no_session_leave_no_cells(tiny_bundle, yunet_model, t1_bgr, astronaut_bgr):
    with _load(tiny_bundle, yunet_model, max_slots=8) as m:
        kept = m.open_faces(astronaut_bgr)[0]
        for _ in range(3):  # a stream yields text only: its sessions are closed when it ends or is dropped
            assert sum(1 for _ in m.stream(t1_bgr, "Age?")) > 0
            it = m.stream(t1_bgr, "Age?")
            next(it)
            it.close()
        assert m.generator.n_cached == 1 and kept.cached
        # an ask whose question does not fit after the image prefix: nothing reaches the caller, nothing is kept
        with pytest.raises(RuntimeStageError, match="only .* remain"):
            m.ask(t1_bgr, "why " * 4000)
        assert m.generator.n_cached == 1
        # more faces than the cache keeps: open_faces refuses before any is opened (the first would be evicted)
        with _load(tiny_bundle, yunet_model, max_slots=4) as small:
            with pytest.raises(UsageError, match="has 6 faces but the KV cache keeps 4 sessions"):
                small.open_faces(t1_bgr)
            assert small.generator.n_cached == 0


def test_a_session_closed_inside_its_own_stream_stays_open(tiny_bundle, yunet_model, astronaut_bgr):
    with _load(tiny_bundle, yunet_model) as m:
        (s,) = m.open_faces(astronaut_bgr)
        stream = s.stream("Age?")
        next(stream)
        with pytest.raises(UsageError, match="inside its own on_token callback or stream"):
            s.close()
        assert not s.closed  # the refused close marked it closed and kept its cells
        stream.close()
        assert s.cached
        s.close()
        assert s.closed and m.generator.n_cached == 0


def test_a_full_conversation_says_to_start_a_new_one(tiny_bundle, yunet_model, astronaut_bgr):
    with _load(tiny_bundle, yunet_model, n_ctx=300) as m:
        (s,) = m.open_faces(astronaut_bgr)
        s.ask("Age?", max_tokens=500)  # until the context is full
        with pytest.raises(RuntimeStageError, match="this conversation already holds .* ask in a new session"):
            s.ask("And the expression?")


SMALL_CONTEXT = """
import sys, cv2
from facellm_edge.errors import RuntimeStageError
from facellm_edge.runtime.config import DetectorConfig, EncoderConfig, EngineConfig, GenerationConfig, RuntimeConfig
from facellm_edge.runtime.pipeline import FaceLLM

bundle, yunet, photo = sys.argv[1:4]
image = cv2.imread(photo)
for slots in (None, 4):
    config = RuntimeConfig(detector=DetectorConfig(model_path=yunet), encoder=EncoderConfig(precision="fp32"),
                           engine=EngineConfig(quant="f32", n_ctx=300, max_slots=slots),
                           generation=GenerationConfig(max_tokens=2))
    with FaceLLM.load(bundle, config) as m:
        try:
            print(slots, m.generator.max_slots, len(m.ask(image, "Age?")))
        except RuntimeStageError as exc:
            print(slots, m.generator.max_slots, "error", exc)
"""


def test_a_small_context_answers_a_group_photo_and_never_aborts(tiny_bundle, yunet_model, tmp_path):
    """--ctx 300 on a 6-face photo (each face's image prompt ~262 tokens): llama.cpp caps n_batch at the context,
    and four faces' prompts in 512-row chunks aborted the process (GGML_ASSERT n_tokens_all <= n_batch, a core
    dump). Now the auto slot count holds only the prompts that fit (one here: every face answered, one after
    another), and an explicit max_slots of 4 is a clean one-line error (the prompts do not fit), not an abort.
    In a child process, since the failure this guards against kills the process."""
    import subprocess
    import sys
    from pathlib import Path

    import insightface

    photo = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
    proc = subprocess.run([sys.executable, "-c", SMALL_CONTEXT, str(tiny_bundle), str(yunet_model), str(photo)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    auto, explicit = proc.stdout.strip().splitlines()[-2:]
    assert auto == "None 1 6"  # six faces, answered one at a time
    assert explicit.startswith("4 4 error") and "no free KV cells" in explicit
