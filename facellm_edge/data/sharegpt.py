"""The conversation-record layouts people really have, read by one parser (``data import-fairfacegpt`` and
``train``'s loader both use it), following LLaMA-Factory's sharegpt reading (its data/README.md):

* turns under ``conversations`` (``from``/``value``: FairFaceGPT, LLaMA-Factory's default tags) or ``messages``
  (``role``/``content``: LLaMA-Factory's mllm demo and the OpenAI layout); speakers ``human``/``user`` and
  ``gpt``/``assistant``, alternating, starting with the user and ending with an answer;
* the image under ``image`` (a path: FairFaceGPT) or ``images`` (a list of one path, or a path); one image a record;
* a system prompt as a first turn ``from: system`` / ``role: system``, or as a ``system`` column. It is kept with
  the record, never dropped; a system turn and a different ``system`` column in one record are refused (which one
  was meant is not knowable). A system turn anywhere but first is refused.

Texts are kept exactly as written. Every problem raises :class:`LayoutError` whose message names the field or turn;
callers add where the record is.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_TAG = "<image>"  # where the image goes in a user turn (LLaMA-Factory's placeholder)
USER, ASSISTANT, SYSTEM = "human", "gpt", "system"  # the roles as this project's records write them
ROLES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT, "system": SYSTEM}
IMAGE_KEYS = ("image", "images")
TURN_KEYS = ("conversations", "messages")


class LayoutError(ValueError):
    """A record whose layout cannot be read; the message says why, without saying which record."""


@dataclass(frozen=True)
class Conversation:
    image: str  # the image path as written (relative to the images folder)
    turns: tuple[tuple[str, str], ...]  # (USER | ASSISTANT, text as written), alternating, user first
    system: str | None = None  # the record's system prompt, if it has one


def record_image(entry: dict, extra_keys: tuple[str, ...] = ()) -> str:
    """The record's one image path, from ``image``, ``images`` (a list of one, or a string) or ``extra_keys``."""
    found: dict[str, str] = {}
    for key in (*IMAGE_KEYS, *extra_keys):
        value = entry.get(key)
        if value is None:
            continue
        if isinstance(value, list):
            if len(value) > 1:
                raise LayoutError(f"'{key}' lists {len(value)} images; a record holds one image")
            value = value[0] if value else None
        if not isinstance(value, str) or not value.strip():
            raise LayoutError(f"'{key}' must be an image path (or a list of one)")
        found[key] = value
    if not found:
        raise LayoutError(f"no image path (one of {', '.join((*IMAGE_KEYS, *extra_keys))})")
    if len(set(found.values())) > 1:
        raise LayoutError(f"image keys disagree: {', '.join(f'{k}={v!r}' for k, v in found.items())}")
    return next(iter(found.values()))


def _raw_turns(entry: dict) -> tuple[str, list]:
    present = [k for k in TURN_KEYS if k in entry]
    if len(present) > 1:
        raise LayoutError("has both 'conversations' and 'messages'; keep one")
    if not present:
        raise LayoutError("no 'conversations' (or 'messages') list of turns")
    key = present[0]
    turns = entry[key]
    if not isinstance(turns, list) or not turns:
        raise LayoutError(f"no '{key}' list of turns (it is empty or not a list)")
    return key, turns


def _turn(k: int, turn: object) -> tuple[str, str]:
    if not isinstance(turn, dict):
        raise LayoutError(f"turn {k} is not an object")
    speaker = turn.get("from", turn.get("role"))
    text = turn.get("value", turn.get("content"))
    if not isinstance(speaker, str) or speaker.lower() not in ROLES:
        raise LayoutError(f"bad role {speaker!r} in turn {k} (from/role: human, user, gpt, assistant or, as the "
                          "first turn, system)")
    if not isinstance(text, str):
        raise LayoutError(f"turn {k} is not {{'from': str, 'value': str}} or {{'role': str, 'content': str}}")
    if not text.strip():
        raise LayoutError(f"empty turn {k}")
    return ROLES[speaker.lower()], text


def system_column(entry: dict) -> str | None:
    """The ``system`` column's prompt (None when absent or empty)."""
    value = entry.get("system")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None  # LLaMA-Factory reads an empty system the same as none
    if not isinstance(value, str):
        raise LayoutError("'system' must be a string")
    return value


def read_turns(entry: dict) -> tuple[tuple[tuple[str, str], ...], str | None]:
    """The record's turns (system turn taken out) and its system prompt."""
    _, raw = _raw_turns(entry)
    turns = [_turn(k, t) for k, t in enumerate(raw)]
    system = system_column(entry)
    first = 0
    if turns[0][0] == SYSTEM:
        if system is not None and system != turns[0][1]:
            raise LayoutError("has a system turn and a different 'system' column; keep one")
        system, first = turns[0][1], 1
    body = turns[first:]
    if not body:
        raise LayoutError("has a system prompt but no turns")
    for k, (role, _) in enumerate(body, start=first):
        want = USER if (k - first) % 2 == 0 else ASSISTANT
        if role == SYSTEM:
            raise LayoutError(f"system turn {k}: only the first turn may be a system prompt")
        if role != want:
            raise LayoutError(f"bad role in turn {k}: turns alternate, starting with the user (expected "
                              f"{'human/user' if want == USER else 'gpt/assistant'})")
    if body[-1][0] != ASSISTANT:
        raise LayoutError("last turn is not an assistant answer")
    return tuple(body), system


def read_conversation(entry: object, extra_image_keys: tuple[str, ...] = ()) -> Conversation:
    """One record in any layout above -> :class:`Conversation`; :class:`LayoutError` says what is wrong."""
    if not isinstance(entry, dict):
        raise LayoutError(f"record is a {type(entry).__name__}, not an object")
    image = record_image(entry, extra_image_keys)
    turns, system = read_turns(entry)
    return Conversation(image=image, turns=turns, system=system)
