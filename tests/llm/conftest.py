"""Fixtures of the generator tests in this folder (used by more than one of its files): a real small GGUF's
generator, an independent reference context, its token specs and "images" made of real token embeddings."""

from __future__ import annotations

import numpy as np
import pytest
from smollm2_chat import CFG, FIRST, FOLLOWUP, N_IMG, single_token

from facellm_edge.bundle import PromptSpec, TokenSpec
from facellm_edge.llm.engine import EngineConfig, LlamaEngine
from facellm_edge.llm.generator import Generator


@pytest.fixture(scope="module")
def ref(smollm2_gguf) -> LlamaEngine:
    """A second, independent llama.cpp context: from-scratch references and tokenisation for the tests."""
    eng = LlamaEngine(smollm2_gguf, EngineConfig(n_ctx=1024, n_threads=1, n_threads_batch=1, max_slots=1,
                                                 n_batch=CFG.n_batch))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def specs(ref) -> tuple[TokenSpec, PromptSpec]:
    tokens = TokenSpec(
        image_context=" face", image_context_id=single_token(ref, " face"),
        image_start="<repo_name>", image_start_id=single_token(ref, "<repo_name>"),
        image_end="<file_sep>", image_end_id=single_token(ref, "<file_sep>"),
        num_image_tokens=N_IMG, eos_ids=(single_token(ref, "<|im_end|>"),),
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

