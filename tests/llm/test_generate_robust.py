"""The generator as a component, on the same real small GGUF as test_generate.py: KV slots and their eviction,
errors, threads, an exported bundle's real prompt, llama.cpp's logging."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest

from facellm_edge.bundle import PromptSpec, TokenSpec
from facellm_edge.errors import BundleError, InputError, RuntimeStageError, UsageError
from facellm_edge.llm.engine import EngineConfig, LlamaEngine
from facellm_edge.llm.generator import Answer, Generator, schema_to_grammar
from facellm_edge.llm.sampling import GenerationConfig

from smollm2_chat import CFG, FOLLOWUP, N_IMG, Replay, followup_tokens, prompt_parts


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
    rows = embed_rows(ref.tokenize(" hello" * 64, special=False))  # 64 "image" tokens
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
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():  # the CPU build CI installs: layers asked on a GPU are refused
        with pytest.raises(UsageError, match="--gpu-layers 99 needs a GPU, and llama.cpp sees no GPU"):
            LlamaEngine(smollm2_gguf, EngineConfig(n_gpu_layers=99, max_slots=1))
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
        # the prefix is `first` with {image} expanded the InternVL way, token for token, up to the image's last row
        # (</img> and the text up to the question come with the first question)
        t = m.tokens
        image_text = t.image_start + t.image_context * t.num_image_tokens + t.image_end
        head = m.prompt.first.split(m.prompt.question_marker)[0].replace(m.prompt.image_marker, image_text)
        ref = LlamaEngine(gguf_path, cfg)
        try:
            expanded = ref.tokenize(head, special=True)
            last_row = len(expanded) - expanded[::-1].index(t.image_context_id)
            assert n == last_row and expanded.count(t.image_context_id) == t.num_image_tokens
            assert expanded[last_row] == t.image_end_id
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


# -- configs: every field checked when the config is made --------------------------------------------------------
@pytest.mark.parametrize("bad, why", [
    (dict(max_tokens=float("nan")), "max_tokens must be a whole number, got float nan"),
    (dict(max_tokens=float("inf")), "max_tokens must be a whole number, got float inf"),
    (dict(max_tokens=2.5), "max_tokens must be a whole number, got float 2.5"),
    (dict(max_tokens=True), "max_tokens must be a whole number, got bool True"),
    (dict(max_tokens="5"), "max_tokens must be a whole number, got str '5'"),
    (dict(temperature="0.5"), "temperature must be a number, got str '0.5'"),
    (dict(temperature=True), "temperature must be a number, got bool True"),
    (dict(top_p=None), "top_p must be a number, got NoneType None"),
    (dict(top_k=2.5), "top_k must be a whole number, got float 2.5"),
    (dict(top_k=2**31), "top_k 2147483648 must be in 0..2147483647"),
    (dict(repeat_penalty="1"), "repeat_penalty must be a number"),
    (dict(grammar=b"root ::= x"), "grammar must be GBNF text or None, got bytes"),
    (dict(grammar="root ::= \"\ud800\""), "grammar is not valid text"),
    (dict(stop_at_eos="no"), "stop_at_eos must be True or False, got str 'no'"),
])
def test_generation_config_refuses_wrong_types_when_made(bad, why):
    """Before: NaN/inf max_tokens generated until the context was full, 2.5 and True were taken, top_k=2.5 failed
    with ctypes.ArgumentError after the image prefill, strings with TypeError."""
    with pytest.raises(UsageError) as e:
        GenerationConfig(**bad)
    assert why in str(e.value) and "\n" not in str(e.value)


def test_per_call_overrides_are_checked_the_same_way():
    """``session.ask(q, max_tokens="3")`` raised TypeError (the override goes through ``with_overrides``)."""
    with pytest.raises(UsageError, match="^max_tokens must be a whole number, got str '3'$"):
        GenerationConfig().with_overrides(max_tokens="3")
    with pytest.raises(UsageError, match="^temperature nan must be a finite number"):
        GenerationConfig().with_overrides(temperature=float("nan"))
    with pytest.raises(UsageError, match="^max_tokens must be a whole number, got float nan$"):
        GenerationConfig().with_overrides(max_tokens=float("nan"))


def test_generation_config_takes_numpy_numbers_as_python_ones():
    gen = GenerationConfig(max_tokens=np.int64(5), temperature=np.float32(0.5), top_k=np.int32(3), top_p=1)
    assert (gen.max_tokens, gen.temperature, gen.top_k, gen.top_p) == (5, 0.5, 3, 1.0)
    assert (type(gen.max_tokens), type(gen.temperature), type(gen.top_k), type(gen.top_p)) == (int, float, int, float)
    assert GenerationConfig(temperature=1) == GenerationConfig(temperature=1.0)


@pytest.mark.parametrize("bad, why", [
    (dict(seed=1.5), "seed must be a whole number, got float 1.5"),
    (dict(seed=-1), "seed -1 must be in 0..4294967294 (llama.cpp takes 4294967295"),
    (dict(seed=2**32 - 1), "seed 4294967295 must be in 0..4294967294"),
    (dict(seed=2**70), "must be in 0..4294967294"),
    (dict(seed=True), "seed must be a whole number, got bool True"),
    (dict(max_slots=1000), "max_slots 1000 exceeds llama.cpp's limit of "),
    (dict(max_slots=2.0), "max_slots must be a whole number or None, got float 2.0"),
    (dict(n_ctx="4096"), "n_ctx must be a whole number, got str '4096'"),
    (dict(n_ctx=2**32 + 16), "context size 4294967312 is above llama.cpp's limit of 4294967295"),
    (dict(n_batch=float("inf")), "n_batch must be a whole number, got float inf"),
    (dict(n_threads=2.0), "n_threads must be a whole number or None, got float 2.0"),
    (dict(n_threads_batch=2**31), "n_threads_batch 2147483648 must be >= 1"),
    (dict(n_gpu_layers=float("nan")), "n_gpu_layers must be a whole number, got float nan"),
    (dict(flash_attn=1), "flash_attn must be True or False, got int 1"),
    (dict(mmap="yes"), "mmap must be True or False, got str 'yes'"),
    (dict(quant=4), "quant must be a quantisation name such as q4_k_m or None, got int 4"),
])
def test_engine_config_refuses_wrong_types_and_ranges_when_made(bad, why):
    """Before: seed=1.5 failed with ctypes.ArgumentError at the first sampled answer, -1 and 2**70 were wrapped or
    truncated by ctypes (-1 to llama.cpp's "random seed"), max_slots=1000 was refused only at load."""
    with pytest.raises(UsageError) as e:
        EngineConfig(**bad)
    assert why in str(e.value) and "\n" not in str(e.value)


def test_engine_config_limits_are_llama_cpps():
    import llama_cpp

    limit = llama_cpp.llama_max_parallel_sequences()
    assert EngineConfig(max_slots=limit, seed=2**32 - 2).slots == limit
    assert EngineConfig(seed=np.uint32(7)).seed == 7 and type(EngineConfig(seed=np.uint32(7)).seed) is int
    with pytest.raises(UsageError, match=f"max_slots {limit + 1} exceeds llama.cpp's limit of {limit}$"):
        EngineConfig(max_slots=limit + 1)


def test_a_question_that_is_not_text_is_refused_by_the_question_check():
    """Half a surrogate pair cannot be tokenised (UTF-8): refused where the question enters, not after the image
    prefill with a raw UnicodeEncodeError."""
    from facellm_edge.llm.generator import check_question

    with pytest.raises(UsageError) as e:
        check_question("a\ud800b")
    assert str(e.value) == ("the question is not valid text: it holds '\\ud800' at character 1, half of a surrogate "
                            "pair; send it as UTF-8")
    assert check_question("Wie alt? 😀 \u00e9") == "Wie alt? 😀 \u00e9"
