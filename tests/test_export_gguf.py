"""LLM -> GGUF export, llama.cpp quantisation, and verification against transformers (tiny real-architecture models)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from facellm_edge.errors import ExportError, OutputError, UsageError


def _load(ckpt: Path):
    import transformers

    model = transformers.InternVLForConditionalGeneration.from_pretrained(ckpt).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt)
    return model, tokenizer


def _field(reader, key: str):
    f = reader.get_field(key)
    assert f is not None, f"missing GGUF key {key}"
    return f.contents()


@pytest.fixture(scope="module")
def tied(tiny_checkpoint):
    return _load(tiny_checkpoint)


@pytest.fixture(scope="module")
def tied_f32(tied, tmp_path_factory) -> Path:
    from facellm_edge.export.gguf_llm import write_llm_gguf

    model, tokenizer = tied
    out = tmp_path_factory.mktemp("gguf") / "llm-f32.gguf"
    report = write_llm_gguf(model, tokenizer, out, ftype="f32")
    assert report.tied_embeddings and report.path == str(out)
    return out


@pytest.mark.slow  # writes the f32 GGUF (tied_f32)
def test_f32_logits_match_transformers_with_image_embeddings(tied, tied_f32):
    from facellm_edge.export.verify_llm import LogitProbe, compare_logits

    model, tokenizer = tied
    probe = LogitProbe(n_image_tokens=24, seed=3)
    res = compare_logits(model, tokenizer, tied_f32, probe)
    assert res["n_image_positions"] == 24
    assert res["n_positions"] > 24
    assert res["top1_agreement"] == 1.0
    assert res["max_rel_diff"] < 1e-3, res


@pytest.mark.slow  # more than 3 s
def test_export_gate_passes_a_correct_gguf_and_stops_a_wrong_one(tied, tied_f32, tmp_path):
    """A conversion bug (here: layer 0's attention output projection written with its sign flipped) must fail the
    export's f32 gate; the correct file must pass it."""
    import copy

    import torch

    from facellm_edge.export.gguf_llm import write_llm_gguf
    from facellm_edge.export.exporter import check_f32_logits
    from facellm_edge.export.verify_llm import LogitProbe, compare_logits

    model, tokenizer = tied
    probe = LogitProbe(n_image_tokens=24, seed=3)
    check_f32_logits(compare_logits(model, tokenizer, tied_f32, probe))
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.model.language_model.layers[0].self_attn.o_proj.weight.neg_()
    wrong = tmp_path / "wrong-f32.gguf"
    write_llm_gguf(broken, tokenizer, wrong, ftype="f32")
    report = compare_logits(model, tokenizer, wrong, probe)
    with pytest.raises(ExportError, match="GGUF f32 logits differ from transformers"):
        check_f32_logits(report)


# bf16 keeps 8 mantissa bits and the tiny random model's top-1 margins are ~1e-3 of the logit scale: measured
# top-1 1.0 on the default probe, 0.964 on a 64-image-token probe. f16: 1.0 on both.
@pytest.mark.parametrize("ftype,min_top1", [("f16", 0.99), ("bf16", 0.95)])
@pytest.mark.slow  # about 3 s each
def test_half_precision_gguf(tied, tmp_path, ftype, min_top1):
    from facellm_edge.export.gguf_llm import write_llm_gguf
    from facellm_edge.export.quantize import read_tensor_infos
    from facellm_edge.export.verify_llm import compare_logits

    model, tokenizer = tied
    out = tmp_path / f"llm-{ftype}.gguf"
    write_llm_gguf(model, tokenizer, out, ftype=ftype)
    for t in read_tensor_infos(out):
        expected = ftype.upper() if len(t.shape) == 2 else "F32"  # norms/biases stay f32
        assert t.type == expected, t.name
    res = compare_logits(model, tokenizer, out)
    assert res["top1_agreement"] >= min_top1, res
    assert not list(tmp_path.glob(".*tmp*")), "temp file left behind"


@pytest.mark.slow  # more than 10 s: the whole vocabulary
def test_gguf_metadata_and_vocab(tied, tied_f32):
    import gguf

    model, tokenizer = tied
    text = model.config.text_config
    reader = gguf.GGUFReader(str(tied_f32))
    assert _field(reader, "general.architecture") == "qwen2"
    assert _field(reader, "qwen2.block_count") == text.num_hidden_layers
    assert _field(reader, "qwen2.embedding_length") == text.hidden_size
    assert _field(reader, "qwen2.attention.head_count_kv") == text.num_key_value_heads
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "qwen2"
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == model.model.language_model.embed_tokens.weight.shape[0]
    img_id = tokenizer.convert_tokens_to_ids(tokenizer.context_image_token)
    assert tokens[img_id] == tokenizer.context_image_token
    assert types[img_id] == gguf.TokenType.CONTROL
    assert types[tokenizer.convert_tokens_to_ids("Hello")] == gguf.TokenType.NORMAL
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert _field(reader, "tokenizer.ggml.padding_token_id") == tokenizer.pad_token_id
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False
    assert _field(reader, "tokenizer.chat_template") == tokenizer.chat_template
    assert len(_field(reader, "tokenizer.ggml.merges")) > 100_000
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names  # tied: llama.cpp reuses token_embd
    # ggml's C reader (used for the quant reports) sees exactly what gguf-py sees
    from facellm_edge.export.quantize import read_tensor_infos

    assert [(t.name, t.type, t.shape, t.n_bytes) for t in read_tensor_infos(tied_f32)] == [
        (t.name, t.tensor_type.name, tuple(int(x) for x in t.shape), int(t.n_bytes)) for t in reader.tensors]


@pytest.mark.slow  # writes the f32 GGUF (tied_f32)
def test_tokenizer_parity(tied, tied_f32):
    from facellm_edge.export.verify_llm import default_parity_probes, tokenizer_parity

    model, tokenizer = tied
    rows = model.model.language_model.embed_tokens.weight.shape[0]
    probes = default_parity_probes(tokenizer, rows)
    assert any(tokenizer.context_image_token in p for p in probes)
    # <video> sits one past the embedding's rows (as in InternVL3-hf): not in the GGUF, so not probed
    assert tokenizer.convert_tokens_to_ids("<video>") == rows and not any("<video>" in p for p in probes)
    res = tokenizer_parity(tokenizer, tied_f32, probes)
    assert res["n_texts"] == len(probes)
    assert res["percent"] == 100.0, res["first_mismatch"]


@pytest.mark.slow  # builds tiny_checkpoint_untied
def test_untied_output_head(tiny_checkpoint_untied, tmp_path):
    from facellm_edge.export.gguf_llm import write_llm_gguf
    from facellm_edge.export.quantize import read_tensor_infos
    from facellm_edge.export.verify_llm import compare_logits

    model, tokenizer = _load(tiny_checkpoint_untied)
    report = write_llm_gguf(model, tokenizer, tmp_path / "untied.gguf")
    assert not report.tied_embeddings
    assert "output.weight" in {t.name for t in read_tensor_infos(report.path)}
    assert compare_logits(model, tokenizer, report.path)["top1_agreement"] == 1.0


@pytest.mark.slow  # builds tiny_checkpoint_gqa
def test_gqa_variant(tiny_checkpoint_gqa, tmp_path):
    from facellm_edge.export.gguf_llm import write_llm_gguf
    from facellm_edge.export.quantize import read_tensor_infos
    from facellm_edge.export.verify_llm import compare_logits

    model, tokenizer = _load(tiny_checkpoint_gqa)
    text = model.config.text_config
    report = write_llm_gguf(model, tokenizer, tmp_path / "gqa.gguf")
    shapes = {t.name: t.shape for t in read_tensor_infos(report.path)}
    head_dim = text.hidden_size // text.num_attention_heads
    assert text.num_key_value_heads == 1 and text.num_hidden_layers == 3
    assert shapes["blk.2.attn_k.weight"] == (text.hidden_size, text.num_key_value_heads * head_dim)
    assert shapes["blk.2.attn_q.weight"] == (text.hidden_size, text.hidden_size)
    assert compare_logits(model, tokenizer, report.path)["top1_agreement"] == 1.0


@pytest.mark.slow  # more than 3 s
def test_embedding_rows_beyond_tokenizer_are_padded(tiny_checkpoint, tmp_path):
    """Qwen2.5 pads its embedding to 151936 rows; the extra rows become [PAD{i}] unused tokens."""
    import llama_cpp

    from facellm_edge.export.gguf_llm import write_llm_gguf
    from facellm_edge.export.verify_llm import compare_logits, open_engine

    model, tokenizer = _load(tiny_checkpoint)
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=128)
    rows = model.model.language_model.embed_tokens.weight.shape[0]
    assert rows > len(tokenizer)
    report = write_llm_gguf(model, tokenizer, tmp_path / "padded.gguf")
    engine = open_engine(report.path, 16)
    try:
        assert engine.n_vocab == rows
        assert llama_cpp.llama_vocab_get_text(engine.vocab, rows - 1) == f"[PAD{rows - 1}]".encode()
        assert llama_cpp.llama_vocab_get_attr(engine.vocab, rows - 1) & llama_cpp.LLAMA_TOKEN_ATTR_UNUSED
    finally:
        engine.close()
    assert compare_logits(model, tokenizer, report.path)["top1_agreement"] == 1.0


def _greedy(engine, ids: list[int], n_new: int) -> list[int]:
    """Greedy continuation by numpy argmax over llama.cpp's logits."""
    engine.decode_tokens(ids, seq=0, pos0=0, logits_last=True)
    out: list[int] = []
    for _ in range(n_new):
        out.append(int(np.argmax(engine.logits_last())))
        engine.decode_tokens(out[-1:], seq=0, pos0=len(ids) + len(out) - 1, logits_last=True)
    return out


@pytest.mark.slow  # writes the f32 GGUF (tied_f32)
def test_quantize_q4_k_m_and_q8_0(tied, tied_f32, tmp_path):
    from facellm_edge.export.quantize import QUANTS, quantize_gguf, read_tensor_infos
    from facellm_edge.export.verify_llm import open_engine

    _, tokenizer = tied
    src = read_tensor_infos(tied_f32)
    # k-quants need rows divisible by 256: with the tiny model's widths (64/128) every 2-D tensor must fall back.
    not_k_friendly = {t.name for t in src if len(t.shape) == 2 and t.shape[0] % 256}
    assert not_k_friendly
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False,
                                           add_generation_prompt=True)
    for quant in ("q4_k_m", "q8_0"):
        report = quantize_gguf(tied_f32, tmp_path / f"llm-{quant}.gguf", quant, n_threads=2)
        assert Path(report.path).is_file() and report.file_bytes < tied_f32.stat().st_size
        assert sum(report.type_histogram.values()) == len(src)
        assert 0 < report.bits_per_weight_2d < 32
        if quant == "q8_0":
            assert report.fallbacks == () and report.type_histogram["Q8_0"] > 0
        else:
            assert {f["name"] for f in report.fallbacks} == not_k_friendly
            assert all(f["type"] not in QUANTS[quant].types for f in report.fallbacks)
        engine = open_engine(report.path, 64)
        try:
            ids = engine.tokenize(prompt, special=True)
            assert ids == tokenizer(prompt, add_special_tokens=False)["input_ids"]
            out = _greedy(engine, ids, 4)
        finally:
            engine.close()
        assert len(out) == 4 and all(0 <= t < engine.n_vocab for t in out)
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.slow  # writes the f32 GGUF (tied_f32)
def test_q4_0_pure_puts_the_tied_head_in_q4_0_too(tied_f32, tmp_path):
    from facellm_edge.export.quantize import quantize_gguf, read_tensor_infos

    types = {}
    for quant in ("q4_0", "q4_0_pure"):
        report = quantize_gguf(tied_f32, tmp_path / f"{quant}.gguf", quant, n_threads=2)
        types[quant] = {t.name: t.type for t in read_tensor_infos(report.path) if len(t.shape) == 2}
        # q4_0's head wants Q6_K, which a width of 64 cannot hold (llama.cpp falls back to Q8_0); pure has no head rule
        assert [f["name"] for f in report.fallbacks] == (["token_embd.weight"] if quant == "q4_0" else [])
    # llama.cpp's q4_0 keeps the output head (the tied embedding) at higher precision; --pure does not
    assert types["q4_0"]["token_embd.weight"] != "Q4_0"
    assert set(types["q4_0_pure"].values()) == {"Q4_0"}
    assert {k: v for k, v in types["q4_0"].items() if k != "token_embd.weight"} == \
           {k: v for k, v in types["q4_0_pure"].items() if k != "token_embd.weight"}


def test_unknown_quant_message():
    from facellm_edge.export.quantize import validate_quants

    with pytest.raises(UsageError) as exc:
        validate_quants("q4_km,q8_0")
    assert str(exc.value) == ("unknown quant 'q4_km'; choose from f32, f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m, "
                              "q4_0, iq4_nl, q4_0_pure")
    assert validate_quants(" Q4_K_M, q8_0,q4_k_m ") == ("q4_k_m", "q8_0")


def test_unmapped_tensor_raises(tiny_checkpoint, tmp_path):
    import torch

    from facellm_edge.export.gguf_llm import write_llm_gguf

    model, tokenizer = _load(tiny_checkpoint)
    model.model.language_model.layers[0].self_attn.extra_scale = torch.nn.Parameter(torch.ones(4))
    out = tmp_path / "bad.gguf"
    with pytest.raises(ExportError, match=r"model\.language_model\.layers\.0\.self_attn\.extra_scale"):
        write_llm_gguf(model, tokenizer, out)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_bad_arguments(tied, tmp_path):
    from facellm_edge.export.gguf_llm import write_llm_gguf

    model, tokenizer = tied
    with pytest.raises(UsageError, match="unknown GGUF ftype 'q4_0'"):
        write_llm_gguf(model, tokenizer, tmp_path / "x.gguf", ftype="q4_0")
    with pytest.raises(OutputError, match="does not exist"):
        write_llm_gguf(model, tokenizer, tmp_path / "missing" / "x.gguf")
    with pytest.raises(ExportError, match="InternVLForConditionalGeneration"):
        write_llm_gguf(model.model.language_model, tokenizer, tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())


def test_quantising_onto_a_full_disk_is_an_output_error(tied_f32, tmp_path):
    """A real write failure while llama.cpp quantises (the file-size limit makes its writes fail with EFBIG, as a full
    disk fails them): an OutputError (exit 4) saying it could not write, not 'failed to quantise ... the source must
    be an f32 GGUF' (exit 5, the audit's finding), and no file or temporary left."""
    import subprocess
    import sys

    dst = tmp_path / "out" / "q8_0.gguf"
    dst.parent.mkdir()
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, resource.RLIM_INFINITY))\n"
        "from facellm_edge.export.quantize import quantize_gguf\n"
        "try:\n"
        f"    quantize_gguf({str(tied_f32)!r}, {str(dst)!r}, 'q8_0')\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, getattr(exc, 'exit_code', None), exc, sep='|')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    kind, exit_code, message = proc.stdout.strip().splitlines()[-1].split("|", 2)
    assert (kind, exit_code) == ("OutputError", "4") and message.startswith(f"cannot write {dst}"), proc.stdout
    assert not list(dst.parent.iterdir())
