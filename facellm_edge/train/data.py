"""ShareGPT records (FairFaceGPT's format, and the other layouts LLaMA-Factory reads): read, validate up front,
convert to chat-template messages.

A record is ``{"image": "rel/path.jpg", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}, ...]}``, or any layout of :mod:`facellm_edge.data.sharegpt` (``messages`` with
``role``/``content``, ``images`` as a list of one, a system turn or ``system`` column: the system prompt goes into
the sample's messages). The file is a JSON list or JSONL (one record per line). Every problem is collected first
and reported in one error (count + the first few records with their line/index and reason); ``skip_bad`` drops the
bad records instead.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from facellm_edge.data.sharegpt import IMAGE_TAG, USER, LayoutError, read_conversation
from facellm_edge.errors import InputError
from facellm_edge.io import DEFAULT_MAX_PIXELS, check_image_header, loads_json

log = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = IMAGE_TAG
SHOW_BAD = 5


@dataclass(frozen=True)
class Turn:
    role: str  # "user" | "assistant"
    text: str  # for the first user turn: the text with the <image> placeholder removed


@dataclass(frozen=True)
class Sample:
    where: str  # "line 12" (JSONL) or "index 11" (JSON list)
    image: Path  # absolute path
    turns: tuple[Turn, ...]
    image_before_text: bool = True  # <image> came before the first user text (the FairFaceGPT layout)
    system: str | None = None  # the record's own system prompt (system turn or column)

    def messages(self) -> list[dict[str, Any]]:
        """Messages for ``processor.apply_chat_template``: the record's system prompt first when it has one, the
        image as the first user turn's image content."""
        out: list[dict[str, Any]] = []
        if self.system is not None:
            out.append({"role": "system", "content": [{"type": "text", "text": self.system}]})
        for i, t in enumerate(self.turns):
            content: list[dict[str, Any]] = [{"type": "text", "text": t.text}]
            if i == 0:
                image = {"type": "image"}
                content = [image, *content] if self.image_before_text else [*content, image]
            out.append({"role": t.role, "content": content})
        return out


@dataclass(frozen=True)
class BadRecord:
    where: str
    reason: str


def _read_records(path: Path) -> list[tuple[str, Any]]:
    if not path.is_file():
        raise InputError(f"training data {path} not found: pass --data with a ShareGPT .json or .jsonl file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read training data {path}: {exc}") from exc
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = loads_json(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); "
                             "expected a list of ShareGPT records or JSONL") from exc
        return [(f"index {i}", r) for i, r in enumerate(items)]
    records: list[tuple[str, Any]] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"line {n}", loads_json(line)))
        except json.JSONDecodeError as exc:
            records.append((f"line {n}", _Malformed(f"invalid JSON ({exc.msg})")))
    return records


@dataclass(frozen=True)
class _Malformed:
    reason: str


def _check(where: str, rec: Any, images: Path, reserved: tuple[str, ...]) -> Sample | BadRecord:
    if isinstance(rec, _Malformed):
        return BadRecord(where, rec.reason)
    try:
        conv = read_conversation(rec)
    except LayoutError as exc:
        return BadRecord(where, str(exc))
    if conv.system is not None:
        clash = next((t for t in (*reserved, IMAGE_PLACEHOLDER) if t and t in conv.system), None)
        if clash:
            return BadRecord(where, f"the system prompt contains {clash}")
    turns: list[Turn] = []
    placeholders = 0
    image_before_text = True
    for k, (role, value) in enumerate(conv.turns):
        n = value.count(IMAGE_PLACEHOLDER)
        placeholders += n
        if n and k != 0:
            return BadRecord(where, f"{IMAGE_PLACEHOLDER} in turn {k}: it must be in the first human turn")
        if k == 0 and n == 1:
            before, after = value.split(IMAGE_PLACEHOLDER)
            image_before_text = not before.strip()
            value = (after.lstrip("\n") if image_before_text else before.rstrip("\n") + after)
        if not value.strip():
            return BadRecord(where, f"empty turn {k}")
        clash = next((t for t in reserved if t and t in value), None)
        if clash:
            return BadRecord(where, f"turn {k} contains the reserved token {clash}")
        turns.append(Turn("user" if role == USER else "assistant", value))
    if placeholders == 0:
        return BadRecord(where, f"no {IMAGE_PLACEHOLDER} in the first human turn")
    if placeholders > 1:
        return BadRecord(where, f"{placeholders} {IMAGE_PLACEHOLDER} placeholders (one image per record)")
    path = (images / conv.image).resolve()
    if not path.is_file():
        return BadRecord(where, f"missing image {conv.image}")
    problem = _image_problem(path, conv.image)
    if problem:
        return BadRecord(where, problem)
    return Sample(where, path, tuple(turns), image_before_text, conv.system)


def _image_problem(path: Path, name: str) -> str | None:
    """Why the trainer's reader (``read_image_rgb``) would refuse the image, from its header alone: a file that is
    no image, or is above the 40 MP it reads, fails here, before the model loads, not steps into training. A full
    decode of every image (88k for FairFaceGPT) would cost minutes; a body damaged past its header still fails
    there, naming its record."""
    try:
        check_image_header(path, f"image {name}", DEFAULT_MAX_PIXELS, fix="downscale it (training reads up to that)")
    except InputError as exc:
        return str(exc)
    return None


def load_samples(data: Path, images: Path, *, skip_bad: bool, reserved: tuple[str, ...] = ()) -> list[Sample]:
    """Read and validate every record; raise one :class:`InputError` listing the bad ones unless ``skip_bad``.

    ``reserved``: tokens no turn may contain (the end-of-turn token, the processor's image/video tokens).
    """
    data, images = Path(data), Path(images)
    if not images.is_dir():
        raise InputError(f"image directory {images} not found: pass --images with the folder the records' "
                         "'image' paths are relative to")
    samples: list[Sample] = []
    bad: list[BadRecord] = []
    for where, rec in _read_records(data):
        r = _check(where, rec, images, reserved)
        (bad if isinstance(r, BadRecord) else samples).append(r)
    if bad:
        shown = "; ".join(f"{b.where}: {b.reason}" for b in bad[:SHOW_BAD])
        more = f"; ... and {len(bad) - SHOW_BAD} more" if len(bad) > SHOW_BAD else ""
        summary = f"{len(bad)} bad record(s) of {len(bad) + len(samples)} in {data}: {shown}{more}"
        if not skip_bad:
            raise InputError(f"{summary} (fix them or pass --skip-bad to train without them)")
        log.warning("skipping %s", summary)
    if not samples:
        raise InputError(f"no usable records in {data}")
    return samples


def split_eval(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Deterministic held-out split: ``fraction`` of the records (at least one when > 0) go to evaluation."""
    if fraction <= 0:
        return samples, []
    import random

    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(samples) * fraction))
    if n_eval >= len(samples):
        raise InputError(f"--eval-fraction {fraction} leaves no training records out of {len(samples)}")
    held = set(order[:n_eval])
    return [s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held]
