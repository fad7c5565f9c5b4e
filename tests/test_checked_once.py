"""Images and questions are checked once, where they enter the runtime (``FaceLLM``'s public methods, the live loop's
``LiveConfig`` / ``LiveControl``, the server's routes); the pieces a user may call directly (a detector,
``answer_together`` / ``stream_together``, the generator's ``answer_many`` / ``stream_many``) still check what
they are handed."""

from __future__ import annotations

import numpy as np
import pytest

import facellm_edge.llm.generator as generator_module
import facellm_edge.runtime.detect as detect_module
import facellm_edge.runtime.detect.yunet as yunet_module
import facellm_edge.runtime.pipeline as pipeline_module
import facellm_edge.runtime.session as session_module
from facellm_edge.errors import InputError, UsageError
from facellm_edge.llm.sampling import GenerationConfig
from facellm_edge.runtime.session import answer_together, stream_together

MAX_TOKENS = 1  # live_model's answer length
QUESTION = "How old is this person?"
# every module that holds a name for the two checks (the live loop's and the server's entry points check through
# the generator's module, patched here too)
HOLDERS = {"check_question": (generator_module, session_module, pipeline_module),
           "check_image": (detect_module, yunet_module, pipeline_module)}


@pytest.fixture
def checks(monkeypatch) -> dict[str, int]:
    """Counts the calls of ``check_question`` and ``check_image``, whichever module calls them."""
    calls = dict.fromkeys(HOLDERS, 0)
    for name, modules in HOLDERS.items():
        real = getattr(modules[0], name)

        def counted(value, _name=name, _real=real):
            calls[_name] += 1
            return _real(value)

        for module in modules:
            monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.slow  # tiny_bundle
def test_ask_and_stream_check_the_image_and_the_question_once(live_model, t1_bgr, checks):
    answers = live_model.ask(t1_bgr, QUESTION)
    assert len(answers) == 6 and checks == {"check_question": 1, "check_image": 1}
    for a in answers:
        a.session.close()
    checks.update(check_question=0, check_image=0)
    assert {i for i, _ in live_model.stream(t1_bgr, QUESTION)} == set(range(6))
    assert checks == {"check_question": 1, "check_image": 1}
    for f in live_model.detect(t1_bgr):  # one more check: detect is an entry point
        assert f.embeds is None
    assert checks["check_image"] == 2


@pytest.mark.slow  # tiny_bundle
def test_live_loop_checks_each_frame_once_and_the_question_when_it_is_set(live_model, photos, checks):
    from facellm_edge.runtime.live.loop import LiveConfig, run_live
    from facellm_edge.runtime.live.sources import open_source

    config = LiveConfig(question=QUESTION, display=False)
    assert checks["check_question"] == 1  # the standing question, where it enters
    records: list[dict] = []
    stats = run_live(live_model, open_source(str(photos["t1"])), config, on_record=records.append)
    assert stats.frames == 1 and len(records) == 6
    # the frame by the detector's entry (FaceLLM.detect); the worker encodes the faces of that checked frame
    assert checks == {"check_question": 1, "check_image": 1}


@pytest.mark.slow  # tiny_bundle
@pytest.mark.parametrize("face", ["all", "largest"])
def test_server_job_checks_the_image_once(live_model, t1_bgr, png, checks, face):
    from facellm_edge.serve.answering import Replied, Task, faces_job
    from facellm_edge.serve.images import ImageBytes
    from facellm_edge.serve.sessions import SessionStore

    store = SessionStore(60.0, 16, lambda sessions: [s.close() for s in sessions])
    task = Task(ImageBytes(png(t1_bgr), "image"), QUESTION, face, GenerationConfig(max_tokens=1), index=False)
    replies = [e for e in faces_job(live_model, store, task) if isinstance(e, Replied)]
    assert len(replies) == (6 if face == "all" else 1)
    # the route checked the question; the job checks the decoded image once (FaceLLM.detect), not again to encode
    assert checks == {"check_question": 0, "check_image": 1}
    for r in replies:
        r.session.close()


@pytest.mark.slow  # tiny_bundle
def test_pieces_called_directly_still_check_what_they_are_handed(live_model, t1_bgr):
    sessions = live_model.open_faces(t1_bgr)[:2]
    gen = GenerationConfig(max_tokens=1)
    try:
        for blank in ("", "   ", None):
            with pytest.raises(UsageError, match="question is empty"):
                answer_together(sessions, blank, gen)
            with pytest.raises(UsageError, match="question is empty"):
                next(stream_together(sessions, blank, gen))
            with pytest.raises(UsageError, match="question is empty"):
                live_model.generator.answer_many([s.id for s in sessions], blank, gen)
            with pytest.raises(UsageError, match="question is empty"):
                next(live_model.generator.stream_many([s.id for s in sessions], blank, gen))
        assert [s.turns for s in sessions] == [0, 0]  # nothing was asked
        answers = answer_together(sessions, QUESTION, gen)
        assert [a.n_generated for a in answers] == [1, 1] and [s.turns for s in sessions] == [1, 1]
    finally:
        for s in sessions:
            s.close()
    tiny = np.zeros((4, 4, 3), np.uint8)
    for bad in (tiny, np.zeros((64, 64), np.uint8), np.zeros((64, 64, 3), np.float32)):
        with pytest.raises(InputError):
            live_model.detector.detect(bad)
        with pytest.raises(InputError):
            live_model.encode_faces(bad, [])
