"""How eval asks its questions and reads the answers: one frozen dataclass, the one source of the CLI's defaults,
recorded in every results file's meta. Light on purpose (the CLI imports it to build its options)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from facellm_edge.eval.letters import DEFAULT_RULES

# FaceLLM's own VLMEvalKit wrapper (the one behind the published FaceXBench table) generates up to 2048 new tokens.
# Greedy decoding gives the same text under any cap at least as long as the answer, so this cap scores every answer
# exactly as the paper did; an answer that ends earlier costs nothing more (generation stops at end of turn).
DEFAULT_MAX_NEW_TOKENS = 2048


@dataclass(frozen=True)
class EvalSettings:
    prepend_text: bool = False  # FaceXBench's --prepend_text: off there by default, and for FaceLLM's numbers
    letter_rules: str = DEFAULT_RULES  # a name of facellm_edge.eval.letters.RULES
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS

    def to_json(self) -> dict:
        return asdict(self)
