"""The FairFaceGPT prompt families, attribute-aware prompts and validation of the LLM's JSON answer.

Each request asks for ONE question-answer pair of one family about one image, as a JSON object
``{"question": ..., "answer": ...}``. The known labels are given to the LLM so its answer is consistent with them,
but the stored question never states them (the trained model must infer them from the image); in every family but
``demographics`` the answer must not quote them either.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from facellm_edge.data.labels import FaceLabels
from facellm_edge.io import loads_json


@dataclass(frozen=True)
class Family:
    name: str
    focus: str
    answer_may_state_labels: bool = False


FAMILIES: tuple[Family, ...] = (
    Family("demographics", "the person's apparent demographic attributes (age range, gender, ethnicity) and the "
           "visual cues that support each estimate", answer_may_state_labels=True),
    Family("facial_structure", "facial structure: face shape, jawline, cheekbones, forehead, nose, eyes, lips and "
           "their proportions and symmetry"),
    Family("skin_texture", "skin: texture, tone evenness, wrinkles, blemishes, pores, facial hair and signs of age"),
    Family("expression", "facial expression and apparent emotion, with the muscle cues (eyes, brows, mouth) behind it"),
    Family("lighting_quality", "lighting and image quality: light direction and softness, exposure, sharpness, noise, "
           "compression artefacts and resolution"),
    Family("pose", "head pose (yaw, pitch, roll), gaze direction, occlusions and how frontal the face is"),
    Family("forensic", "forensic considerations: cues that help or hinder identification or face matching, signs of "
           "editing or manipulation, and the reliability of judgements made from this image"),
    Family("description", "a general, detailed description of the face and the photo"),
)
FAMILY_NAMES = tuple(f.name for f in FAMILIES)

SYSTEM_PROMPT = (
    "You are an expert in face analysis creating training data for a face-understanding assistant. "
    "You look at one face image and write one question a user could ask about it and an expert answer. "
    "Reply with a single JSON object {\"question\": string, \"answer\": string} and nothing else."
)
REFUSAL_PATTERNS = re.compile(
    r"\b(i'?m sorry|i am sorry|i apologi[sz]e|i can'?t|i cannot|i can not|i'?m unable|i am unable|i'?m not able|"
    r"i am not able|i won'?t|as an ai|unable to (assist|help|comply)|not able to (assist|help))\b",
    re.IGNORECASE,
)


# Label values too generic to count as a leak when they appear in text ("none", "yes", ...).
GENERIC_VALUES = frozenset({"true", "false", "yes", "no", "none", "n/a", "na", "unknown", "other", "0", "1"})


def get_family(name: str) -> Family:
    for f in FAMILIES:
        if f.name == name:
            return f
    raise KeyError(name)


def _label_text(labels: FaceLabels) -> str:
    return "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in labels.attributes)


def build_prompt(labels: FaceLabels, family: Family) -> str:
    """The user message sent with the image (the labels are stated here, never in the stored question)."""
    answer_rule = (
        "The answer should state the estimates consistently with the known labels and explain the visual cues."
        if family.answer_may_state_labels
        else "Do not quote any known label verbatim in the answer either; describe what is visible instead."
    )
    return (
        f"Known labels of this face (ground truth, for your consistency only): {_label_text(labels)}.\n"
        f"Topic: {family.focus}.\n"
        "Write one natural question a user might ask about this topic for this image, and a detailed, factual "
        "answer grounded in what is visible. "
        "The question must NOT mention or hint at any of the known labels. "
        f"{answer_rule} Do not refuse. "
        'Reply only with JSON: {"question": "...", "answer": "..."}'
    )


class InvalidResponse(ValueError):
    """The LLM's reply is not a usable question-answer pair (the reason is the message)."""


def _mentions(text: str, value: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(value)}(?!\w)", text, re.IGNORECASE) is not None


def parse_response(text: str, labels: FaceLabels, family: Family) -> tuple[str, str]:
    """Validate a reply: JSON object with non-empty question/answer, no refusal, no leaked label. Returns (q, a)."""
    body = text.strip()
    fence = re.match(r"^```(?:json)?\s*(.*?)\s*```$", body, re.DOTALL)
    if fence:
        body = fence.group(1)
    try:
        obj = loads_json(body)
    except json.JSONDecodeError as exc:
        raise InvalidResponse(f"reply is not JSON ({exc.msg})") from exc
    if not isinstance(obj, dict):
        raise InvalidResponse("reply is not a JSON object")
    q, a = obj.get("question"), obj.get("answer")
    if not isinstance(q, str) or not q.strip():
        raise InvalidResponse("reply has no non-empty 'question'")
    if not isinstance(a, str) or not a.strip():
        raise InvalidResponse("reply has no non-empty 'answer'")
    q, a = q.strip(), a.strip()
    for field, value in (("question", q), ("answer", a)):
        if REFUSAL_PATTERNS.search(value):
            raise InvalidResponse(f"{field} is a refusal")
    for _, value in labels.attributes:
        if value.lower() in GENERIC_VALUES:
            continue
        if _mentions(q, value):
            raise InvalidResponse(f"question leaks the known label {value!r}")
        if not family.answer_may_state_labels and _mentions(a, value):
            raise InvalidResponse(f"answer quotes the known label {value!r}")
    return q, a
