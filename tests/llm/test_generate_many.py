"""Several faces at once, on the same real small GGUF as test_generate.py: their rows share each llama_decode call,
every decoding step samples one token per face, and each face's answer is the one it gets decoded alone."""

from __future__ import annotations

import numpy as np
import pytest

from facellm_edge.errors import UsageError
from facellm_edge.llm.engine import LlamaEngine
from facellm_edge.llm.generator import Answer, MissingSlot
from facellm_edge.llm.sampling import GenerationConfig

from smollm2_chat import CFG, N_IMG, Replay, followup_tokens, prompt_parts


# -- several faces at once (one llama_decode per step for all of them) ------------------------------------------
@pytest.fixture(scope="module")
def three_images(ref, embed_rows):
    texts = (" a photo of a smiling man with short hair", " an old woman wearing round glasses and a big hat today",
             " a small child laughing in the bright summer sun on the beach")
    ids = [ref.tokenize(t, special=False)[: 2 * N_IMG] for t in texts]
    assert all(len(i) == 2 * N_IMG for i in ids)
    return [embed_rows(i) for i in ids]


def near_greedy(ref: LlamaEngine, replay: Replay, segment: list[int], answer: Answer, tie: float = 0.5) -> None:
    """Every token of ``answer`` is greedy for its own conversation decoded alone from scratch (``replay``, fed the
    answer's tokens), up to ``tie`` in logits: llama.cpp's floats depend on how rows are grouped into calls (~0.2),
    so at a near-tie a batched answer may take the other token; anything else is a wrong sequence or position."""
    replay._feed(([replay.pending] if replay.pending is not None else []) + segment, logits=True)
    replay.pending = None
    ids = list(answer.token_ids)
    for n, t in enumerate(ids):
        logits = ref.logits_last()
        assert logits[t] >= logits.max() - tie, (t, int(np.argmax(logits)), float(logits.max() - logits[t]))
        if n + 1 < len(ids) or answer.stop_reason == "eos":
            replay._feed([t], logits=True)
    if answer.stop_reason == "eos":
        logits = ref.logits_last()
        assert max(logits[e] for e in replay.eos) >= logits.max() - tie
    else:  # cut by length: the last token is pending, decoded with the next question
        assert answer.stop_reason == "length"
        replay.pending = ids[-1]


@pytest.mark.slow  # ~4 s: three faces decoded together and one by one
def test_batched_faces_answer_as_one_by_one(gen, ref, specs, three_images, monkeypatch):
    """prefill_many + answer_many: every face's rows share the llama_decode calls (far fewer calls), the stream
    interleaves the faces, and each face's answer and follow-up are what decoding that conversation alone gives."""
    question, follow = "Describe this person.", "How old?"
    calls = []
    real = gen._engine._decode
    monkeypatch.setattr(gen._engine, "_decode", lambda batch, n: (calls.append(n), real(batch, n)))
    keys = ["b0", "b1", "b2"]
    lengths = gen.prefill_many([(k, [e]) for k, e in zip(keys, three_images)])
    # three phases (prefix tokens | images | template), each one llama_decode of n_batch rows or fewer for all faces
    assert sum(calls) == sum(lengths) and len(calls) <= 3 + sum(lengths) // CFG.n_batch < 3 * len(keys)
    calls.clear()
    run = gen.stream_many(keys, question, GenerationConfig(max_tokens=12))
    order, texts = [], ["", "", ""]
    try:
        while True:
            i, piece = next(run)
            order.append(i)
            texts[i] += piece
    except StopIteration as stop:
        answers = stop.value
    assert texts == [a.text for a in answers] and all(a.n_generated for a in answers)
    assert order[:3] == [0, 1, 2]  # one token per face per step, not face after face
    assert len(calls) <= 12 and sum(calls) > len(calls)  # ≤ 1 question call + 11 steps, several faces per call
    followed = gen.answer_many(keys, follow, GenerationConfig(max_tokens=6))  # pending tokens carried per face
    for k, e in enumerate(three_images):
        replay = Replay(ref, specs[0], e)
        near_greedy(ref, replay, prompt_parts(ref, question)[2], answers[k])
        near_greedy(ref, replay, followup_tokens(ref, follow), followed[k])
        assert followed[k].n_prefilled == len(followup_tokens(ref, follow)) + (answers[k].stop_reason == "length")
    assert all(a.timings["ttft"] >= a.timings["question_prefill"] > 0 for a in answers)
    for k in keys:
        gen.drop(k)


def test_batched_faces_bad_calls(gen, three_images):
    with pytest.raises(UsageError, match="max_slots"):
        gen.prefill_many([(f"x{k}", [three_images[0]]) for k in range(CFG.max_slots + 1)])
    with pytest.raises(UsageError, match="different keys"):
        gen.prefill_many([("x", [three_images[0]]), ("x", [three_images[1]])])
    gen.prefill_image("y", three_images[0])
    with pytest.raises(UsageError, match="different face keys"):
        gen.answer_many(["y", "y"], "Who?")
    with pytest.raises(MissingSlot):
        gen.answer_many(["y", "never"], "Who?")
    assert gen.ask("y", "Who?", GenerationConfig(max_tokens=2)).n_generated == 2  # still usable
    gen.drop("y")


def test_packed_decode_logits_match_one_sequence_at_a_time(smollm2_gguf, ref, three_images):
    """decode_packed: each sequence's logits equal those of decoding it alone (up to llama.cpp's batch-grouping float
    differences), whatever the packing: embeddings and tokens, chunks of n_batch, every last row in the final call."""
    eng = LlamaEngine(smollm2_gguf, CFG)
    try:
        q = ref.tokenize("Describe this person please, in detail.", special=False)
        alone = []
        for k, e in enumerate(three_images):
            eng.clear()
            eng.decode_embeddings(e, 0, 0, logits_last=False)
            eng.decode_tokens(q, 0, len(e), logits_last=True)
            alone.append(eng.logits_last())
        eng.clear()
        assert eng.decode_packed([(e, k, 0) for k, e in enumerate(three_images)], logits_last=False) == []
        rows = eng.decode_packed([(q[: 5 + k], k, len(e)) for k, e in enumerate(three_images)], logits_last=True)
        assert rows == [len(q[:5]) + len(q[:6]) + len(q[:7]) - 3 + k for k in range(3)]  # all in one final call
        eng.clear()
        for k, e in enumerate(three_images):
            eng.decode_embeddings(e, k, 0, logits_last=False)
        many = eng.decode_packed([(q, k, len(e)) for k, e in enumerate(three_images)], logits_last=True)
        for k, row in enumerate(many):
            got = eng.logits_last(row)
            assert int(np.argmax(got)) == int(np.argmax(alone[k]))
            assert np.abs(got - alone[k]).max() < 0.5, k
        calls = []
        real = eng._decode
        eng._decode = lambda batch, n: (calls.append(n), real(batch, n))
        eng.clear()
        big = [(list(range(100, 150)), k, 0) for k in range(3)]  # 150 rows, n_batch 64: two full calls, then the rest
        assert eng.decode_packed(big, logits_last=True) == [19, 20, 21] and calls == [64, 64, 22]
    finally:
        eng.close()


def test_a_cut_face_stops_and_the_others_go_on(gen, ref, three_images):
    """stream_many's ``cut``: a face the caller stops (a stop string) ends at once with its last token pending, as a
    closed one-face stream leaves it; the other faces decode to max_tokens."""
    keys = ["c0", "c1", "c2"]
    gen.prefill_many([(k, [e]) for k, e in zip(keys, three_images)])
    cut: set[int] = set()
    run = gen.stream_many(keys, "Describe this person.", GenerationConfig(max_tokens=6, stop_at_eos=False), cut)
    got = {0: 0, 1: 0, 2: 0}
    try:
        while True:
            i, _ = next(run)
            got[i] += 1
            if i == 1:
                cut.add(1)  # stop face 1 on its first piece
    except StopIteration as stop:
        answers = stop.value
    assert [a.stop_reason for a in answers] == ["length", "stop", "length"]
    assert answers[1].n_generated == 1 and got[1] == 1 and answers[0].n_generated == answers[2].n_generated == 6
    follow = gen.answer_many(keys, "How old?", GenerationConfig(max_tokens=2))
    turn = followup_tokens(ref, "How old?")
    assert [a.n_prefilled for a in follow] == [1 + len(turn)] * 3  # each face's last token was still pending
    for k in keys:
        gen.drop(k)
