"""llama.cpp mmproj export (clip.cpp projector ``internvl``) and its libmtmd peer encoder.

The export is checked against torch token by token: every image token's embedding from libmtmd must match
``model.get_image_features`` on the same 448x448 pixels (a real photo crop), so token order, pixel shuffle and the
position table are all covered, not only a global cosine.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from facellm_edge.bundle import load_bundle
from facellm_edge.io import sha256_file
from facellm_edge.cli import main
from facellm_edge.errors import BundleError, ExportError, RuntimeStageError


@pytest.fixture(scope="module")
def mmproj_bundle(tmp_path_factory, tiny_checkpoint) -> Path:
    """One verified CLI export with the mmproj beside an int8 ONNX graph (f32 LLM: the peer's text model)."""
    out = tmp_path_factory.mktemp("mmproj") / "bundle"
    rc = main(["export", str(tiny_checkpoint), "--out", str(out), "--quant", "f32", "--vision", "int8,mmproj"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    """The tiny checkpoint with its zero-initialised position table / CLS token and constant layer scales and norms
    replaced by random values, so that a wrong position order, norm or scale mapping changes the output."""
    import torch

    from facellm_edge.export.checkpoint import load_model

    ck = load_model(tiny_checkpoint)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in ck.model.named_parameters():
            if name.startswith(("model.vision_tower.", "model.multi_modal_projector.")) and any(
                    k in name for k in ("position", "cls_token", "lambda_", "norm")):
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return ck


@pytest.fixture(scope="module")
def face_tile(astronaut_bgr) -> np.ndarray:
    """A 448x448 RGB crop of a real photo (the astronaut's head and shoulders): no resize on either side."""
    return np.ascontiguousarray(astronaut_bgr[:448, 30:478, ::-1])


def _mtmd_vs_torch(loaded, tmp_path: Path, text_gguf: Path, rgb: np.ndarray, ftype: str) -> dict:
    from facellm_edge.export import mmproj
    from facellm_edge.export.mtmd_peer import MtmdConfig, MtmdVision

    path = tmp_path / f"mmproj-{ftype}.gguf"
    mmproj.write_mmproj_gguf(loaded.model, loaded.processor, path, ftype=ftype)
    ip = loaded.processor.image_processor
    expected = mmproj.torch_image_features(loaded.model, rgb, ip.image_mean, ip.image_std)
    with MtmdVision(path, text_gguf, MtmdConfig(n_threads=2, flash_attn=False)) as vision:
        got = vision.encode(rgb)
    assert got.dtype == np.float32 and got.shape == expected.shape
    return mmproj.compare_embeddings(got, expected)


@pytest.mark.slow  # exports
def test_mtmd_embeddings_match_torch_per_token(loaded, mmproj_bundle, face_tile, tmp_path, monkeypatch):
    m = load_bundle(mmproj_bundle).manifest
    text_gguf = mmproj_bundle / m.llm["f32"].path
    n_tokens = m.tokens.num_image_tokens

    f32 = _mtmd_vs_torch(loaded, tmp_path, text_gguf, face_tile, "f32")
    # f32 weights: only ggml's tanh-GELU and summation order differ from torch (measured rel 4e-4, cos 0.9999998).
    assert f32["max_rel_diff"] < 3e-3 and f32["token_cosine_min"] > 0.99999, f32
    f16 = _mtmd_vs_torch(loaded, tmp_path, text_gguf, face_tile, "f16")
    assert f16["token_cosine_min"] > 0.999 and f16["cosine"] > 0.9999, f16

    # The per-token check sees a position-table layout error that a shape check would not: clip.cpp appends CLS
    # after the patches, so a table left in InternViT's order (CLS first) shifts every patch's position.
    from facellm_edge.export import mmproj

    monkeypatch.setattr(mmproj, "_cls_last", lambda pos: pos)
    wrong = _mtmd_vs_torch(loaded, tmp_path, text_gguf, face_tile, "f32")
    assert wrong["token_cosine_min"] < 0.9, wrong
    assert n_tokens == 256


@pytest.mark.slow  # exports
def test_cli_export_records_and_verifies_the_mmproj(mmproj_bundle, capsys):
    import gguf

    b = load_bundle(mmproj_bundle)
    m = b.manifest
    assert m.mmproj is not None and m.mmproj.path == "vision/mmproj-f16.gguf"
    path = mmproj_bundle / m.mmproj.path
    assert m.mmproj.sha256 == sha256_file(path) and m.mmproj.bytes == path.stat().st_size
    assert m.mmproj.extra["projector"] == "internvl" and m.mmproj.extra["ftype"] == "f16"
    # The ONNX runtime's table holds ONNX graphs only; the fp32 reference graph was not asked for and is gone.
    assert set(m.vision) == {"int8"} and not (mmproj_bundle / "vision" / "fp32.onnx").exists()
    v = m.verification["mmproj"]
    assert v["n_tokens"] == m.tokens.num_image_tokens and v["token_cosine_min"] > 0.999, v

    # The GGUF carries the checkpoint's own preprocessing (mean/std, tile size; tiling: see the next test).
    r = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert fields["clip.projector_type"] == "internvl"
    assert np.allclose(fields["clip.vision.image_mean"], m.image.mean)
    assert np.allclose(fields["clip.vision.image_std"], m.image.std)
    assert fields["clip.vision.image_size"] == m.image.size
    assert fields["clip.vision.projection_dim"] == m.arch.llm_hidden
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["v.blk.0.attn_q.weight"] == "F16" and types["v.position_embd.weight"] == "F32"

    rc = main(["inspect", str(mmproj_bundle)])
    out = capsys.readouterr().out
    assert rc == 0 and "mmproj" in out and "all file hashes match" in out and "libmtmd" in out
    rc = main(["inspect", str(mmproj_bundle), "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["mmproj"]["sha256"] == m.mmproj.sha256


@pytest.mark.slow  # exports
def test_mmproj_tiles_as_the_processor_does(mmproj_bundle, tiny_checkpoint):
    """The GGUF asks libmtmd for the tiling the checkpoint's processor really applies: 1..12 tiles, because
    transformers' InternVLProcessor passes crop_to_patches=True although the image processor config (like
    InternVL3-hf's) says false. A 1024x1024 image: 3x3 tiles + thumbnail on both sides (was 1..1, which libmtmd
    turns into 2 tiles while transformers makes 10)."""
    import gguf

    from facellm_edge.export.checkpoint import load_processor
    from facellm_edge.export.mmproj import _preproc_tiles
    from facellm_edge.export.mtmd_peer import MtmdConfig, MtmdVision

    b = load_bundle(mmproj_bundle)
    m = b.manifest
    processor = load_processor(tiny_checkpoint)
    assert processor.image_processor.crop_to_patches is False and _preproc_tiles(processor) == (1, 12)
    fields = {k: f.contents() for k, f in gguf.GGUFReader(str(b.path(m.mmproj))).fields.items()}
    assert (fields["clip.vision.preproc_min_tiles"], fields["clip.vision.preproc_max_tiles"]) == (1, 12)
    assert m.mmproj.extra["preproc_tiles"] == [1, 12]
    rgb = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    ref = processor(text=[processor.image_token], images=[rgb], return_tensors="np")
    assert ref["pixel_values"].shape[0] == 10
    with MtmdVision(b.path(m.mmproj), mmproj_bundle / m.llm["f32"].path, MtmdConfig(n_threads=2)) as vision:
        got = vision.encode(rgb)
    assert got.shape[0] == list(ref["input_ids"][0]).count(processor.image_token_id) == 10 * m.tokens.num_image_tokens


@pytest.mark.slow  # exports
def test_mmproj_alone_without_verification_writes_no_onnx(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "b"
    rc = main(["export", str(tiny_checkpoint), "--out", str(out), "--quant", "f32", "--vision", "mmproj",
               "--no-verify"])
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert "vision -> mmproj GGUF f16" in text.err and "ONNX" not in text.err
    m = load_bundle(out).manifest
    assert m.vision == {} and m.mmproj is not None
    assert sorted(p.name for p in (out / "vision").iterdir()) == ["mmproj-f16.gguf"]
    # a bundle for llama.cpp / ollama: the runtime says what it lacks, not "damaged"
    assert main(["inspect", str(out)]) == 0
    with pytest.raises(BundleError, match="has only llama.cpp's mmproj vision file .* re-export it with --vision int8"):
        load_bundle(out).vision_file()


def test_unmapped_tensor_raises_and_writes_nothing(loaded, tmp_path):
    import torch

    from facellm_edge.export import mmproj

    sd = dict(loaded.model.state_dict())
    # Every real vision/projector tensor has a rule (2 blocks x 18 + 4 embeddings + 6 projector).
    assert len(mmproj.map_state_dict(list(sd))) == 46
    extra = "model.vision_tower.encoder.layer.0.attention.gate_proj.weight"
    out = tmp_path / "x.gguf"
    with pytest.raises(ExportError, match=extra.replace(".", r"\.")):
        mmproj.write_mmproj_gguf(loaded.model, loaded.processor, out, state_dict={**sd, extra: torch.zeros(4, 4)})
    stray = "model.some_adapter.weight"  # neither vision nor LLM
    with pytest.raises(ExportError, match=stray.replace(".", r"\.")):
        mmproj.write_mmproj_gguf(loaded.model, loaded.processor, out, state_dict={**sd, stray: torch.zeros(4)})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # exports
def test_libmtmd_refusal_is_a_runtime_stage_error(mmproj_bundle):
    from facellm_edge.export.mtmd_peer import MtmdVision

    llm = mmproj_bundle / "llm" / "f32.gguf"
    with pytest.raises(RuntimeStageError, match="libmtmd refused f32.gguf"):
        MtmdVision(llm, llm)  # an LLM GGUF is no clip model


def test_llama_cpp_chat_peer_answers_like_the_runtime(mmproj_bundle, face_tile):
    """The bench's llama.cpp peer (llama.cpp's own multimodal chat path: mtmd_tokenize, its prefill helpers, default
    context, greedy sampler) and the runtime's Generator, given the same image embeddings (libmtmd's), read the same
    first turn and answer with the same greedy tokens: the peer rows compare two implementations of one job."""
    from facellm_edge.bench.peer import MtmdChat
    from facellm_edge.export.mtmd_peer import MtmdVision
    from facellm_edge.llm.engine import EngineConfig
    from facellm_edge.llm.generator import Generator
    from facellm_edge.llm.sampling import GenerationConfig

    b = load_bundle(mmproj_bundle)
    mmproj, gguf = b.path(b.manifest.mmproj), b.llm_file("f32")[1]
    chat = MtmdChat(mmproj, gguf, b.manifest.prompt, threads=1, n_ctx=1024)
    try:
        t: dict[str, float] = {}
        ans = chat.first_turn(face_tile, "What is the apparent age?", 6, t)
        warm = chat.followup("And the expression?", 3)
        n_first = chat.n_image_prefix + ans.n_prefilled
    finally:
        chat.close()
    assert t["encode"] > 0 and t["image_prefill"] > 0 and ans.timings["ttft"] >= ans.timings["question_prefill"]
    assert ans.n_generated == 6 and warm.n_generated == 3 and ans.tokens_per_s > 0

    with MtmdVision(mmproj, gguf) as vision:
        embeds = vision.encode(face_tile)
    gen = Generator.from_bundle(b, EngineConfig(quant="f32", n_ctx=1024, n_threads=1))
    try:
        n_prefix = gen.prefill_image("face", embeds)
        ours = gen.ask("face", "What is the apparent age?", GenerationConfig(max_tokens=6, stop_at_eos=False))
        ours_warm = gen.ask("face", "And the expression?", GenerationConfig(max_tokens=3, stop_at_eos=False))
    finally:
        gen.close()
    assert n_prefix + ours.n_prefilled == n_first  # the same first turn, token for token in count
    assert warm.n_prefilled == ours_warm.n_prefilled  # the answer's last token, then the follow-up turn
    assert ans.token_ids == ours.token_ids and warm.token_ids == ours_warm.token_ids
