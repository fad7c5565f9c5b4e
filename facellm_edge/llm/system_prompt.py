"""The system message of a conversation: ``--system none|intern_vl|TEXT`` for export, ask/run, train and eval.

FaceLLM was fine-tuned with LLaMA-Factory's ``intern_vl`` template, which opens every training sample with a system
turn holding InternVL's identity text (``INTERN_VL`` below, that template's ``default_system``). The authors' own
inference script and their VLMEvalKit wrapper (behind the published FaceXBench numbers) send no system message,
so ``none`` is the default everywhere. The message itself is rendered through the checkpoint's own chat template
(export: into the bundle's ``prompt.first_system``; train/eval with transformers: as a ``system`` message).
"""

from __future__ import annotations

from facellm_edge.errors import UsageError

# LLaMA-Factory's `intern_vl` template, default_system (src/llamafactory/data/template.py).
INTERN_VL = ("你是书生·万象，英文名是InternVL，"
             "是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。")
NAMED: dict[str, str | None] = {"none": None, "intern_vl": INTERN_VL}
DEFAULT = "none"
HELP = ("System message: none (FaceLLM's authors' inference and evaluation), intern_vl (the InternVL identity text "
        "FaceLLM was trained with, LLaMA-Factory's intern_vl template) or the message text itself.")


def resolve_system(choice: str) -> str | None:
    """``none`` -> None (no system turn), ``intern_vl`` -> :data:`INTERN_VL`, anything else is the message itself."""
    if not isinstance(choice, str) or not choice.strip():
        raise UsageError("--system needs none, intern_vl or the text of a system message (got an empty value)")
    return NAMED[choice] if choice in NAMED else choice


def describe(system: str | None) -> str:
    """A short label for logs and results: none, intern_vl, or the message (cut at 60 characters)."""
    if system is None:
        return "none"
    for name, text in NAMED.items():
        if text == system:
            return name
    return system if len(system) <= 60 else system[:57] + "..."


def system_messages(system: str | None) -> list[dict]:
    """The chat-template messages that put ``system`` first ([] for None): the processor's own format."""
    if system is None:
        return []
    return [{"role": "system", "content": [{"type": "text", "text": system}]}]
