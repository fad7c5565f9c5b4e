"""Import the published FairFaceGPT ``dataset.json`` (or any dataset in a layout LLaMA-Factory reads) into this
project's ShareGPT JSONL, validated, texts as they are.

Input: a JSON list of records, an object holding the list under ``data``/``annotations``/``samples``, or JSONL (one
record a line). Records in the layouts of :mod:`facellm_edge.data.sharegpt` (``conversations`` with
``from``/``value`` or ``messages`` with ``role``/``content``; ``image`` or ``images``; a system turn or ``system``
column), or ``{"image": ..., "question": ..., "answer": ...}``; the image key may also be ``image_path``/``file``.
The ``<image>`` tag is put at the start of the first user turn when no turn has it. Optional ``id``,
``family``/``category`` and ``labels`` are carried over; a system prompt becomes the record's ``system``.
"""

from __future__ import annotations

import json
from pathlib import Path

from facellm_edge.data.build import is_record
from facellm_edge.data.sharegpt import (
    ASSISTANT, IMAGE_TAG, TURN_KEYS, USER, LayoutError, read_turns, record_image, system_column,
)
from facellm_edge.io import atomic_write_text, check_replaceable_file
from facellm_edge.errors import InputError, OutputError
from facellm_edge.io import loads_json

_EXTRA_IMAGE_KEYS = ("image_path", "file")
_LIST_KEYS = ("data", "annotations", "samples")


def _entries(obj: object, path: Path) -> list:
    if isinstance(obj, dict):
        for k in _LIST_KEYS:
            if isinstance(obj.get(k), list):
                return obj[k]
        if any(k in obj for k in (*TURN_KEYS, "question")):
            return [obj]  # JSONL of one record
        raise InputError(f"{path}: expected a JSON list of entries (or an object with one of {', '.join(_LIST_KEYS)})")
    if not isinstance(obj, list):
        raise InputError(f"{path}: expected a JSON list of entries")
    return obj


def _read_entries(path: Path) -> list[tuple[str, object]]:
    """(where, entry) for a JSON document, or for JSONL (one record a line, blank lines skipped)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise InputError(f"{path} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc
    try:
        return [(f"{path} entry {i}", e) for i, e in enumerate(_entries(loads_json(text), path))]
    except json.JSONDecodeError as exc:
        if not text.lstrip().startswith("{"):
            raise InputError(f"{path} is not valid JSON: {exc}") from exc
    out = []  # not one JSON document but objects: JSONL, read line by line
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((f"{path} line {n}", loads_json(line)))
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} line {n} is not valid JSON ({exc.msg}); JSONL needs one record a line") from exc
    return out


def _explicit_ids(entries: list[tuple[str, object]]) -> dict[str, str]:
    """where -> the id a record names for itself: a non-empty string or an integer (null, a boolean, an object or
    a list is no id: refused in one line rather than written as its Python text)."""
    out = {}
    for where, entry in entries:
        if isinstance(entry, dict) and "id" in entry:
            rid = entry["id"]
            if isinstance(rid, bool) or not isinstance(rid, (str, int)) or (isinstance(rid, str) and not rid.strip()):
                raise InputError(f"{where}: 'id' must be a non-empty string or an integer, got {json.dumps(rid)[:40]}")
            out[where] = str(rid)
    return out


def _turns(entry: dict, where: str) -> tuple[list[dict], str | None]:
    has_turns = any(k in entry for k in TURN_KEYS)
    if not has_turns and not ("question" in entry and "answer" in entry):
        raise InputError(f"{where}: needs 'conversations' (or 'messages', or 'question'+'answer')")
    try:
        if has_turns:
            pairs, system = read_turns(entry)
        else:
            q, a = entry["question"], entry["answer"]
            if not isinstance(q, str) or not q.strip() or not isinstance(a, str) or not a.strip():
                raise LayoutError("'question' and 'answer' must be non-empty strings")
            pairs, system = ((USER, q), (ASSISTANT, a)), system_column(entry)
    except LayoutError as exc:
        raise InputError(f"{where}: {exc}") from exc
    tags = [k for k, (_, text) in enumerate(pairs) if IMAGE_TAG in text]
    if len(tags) > 1 or (tags and pairs[tags[0]][1].count(IMAGE_TAG) > 1):
        raise InputError(f"{where}: more than one {IMAGE_TAG} tag (one image per record)")
    if tags and tags[0] != 0:
        raise InputError(f"{where}: {IMAGE_TAG} is in a later turn; it must be in the first user turn")
    turns = [{"from": role, "value": text} for role, text in pairs]
    if not tags:
        turns[0] = {"from": USER, "value": f"{IMAGE_TAG}\n" + turns[0]["value"]}
    return turns, system


def _is_imported_record(obj: object) -> bool:
    keys = set(obj) if isinstance(obj, dict) else set()
    return ({"id", "image", "conversations"} <= keys <= {"id", "image", "system", "conversations", "family", "labels"}
            and isinstance(obj["id"], str) and isinstance(obj["image"], str) and isinstance(obj["conversations"], list))


def is_sharegpt_jsonl(path: Path) -> bool:
    """Whether every line of ``path`` is a record this tool writes (``data build`` or ``import-fairfacegpt``)."""
    try:
        with open(path, "rb") as f:
            for line in f:
                if line.strip():
                    obj = loads_json(line)
                    if not (is_record(obj) or _is_imported_record(obj)):
                        return False
    except (OSError, ValueError):
        return False
    return True


def import_fairfacegpt(dataset_json: Path, images_dir: Path | None, out: Path, *, force: bool = False) -> int:
    """Validate + normalise ``dataset_json`` into ``out`` (JSONL, written atomically). Returns the record count."""
    dataset_json, out = Path(dataset_json), Path(out)
    check_replaceable_file(out, force=force, kind="a ShareGPT JSONL", recognise=is_sharegpt_jsonl)
    lines, ids, missing = [], set(), []
    entries = _read_entries(dataset_json)
    explicit = _explicit_ids(entries)  # a generated id never takes one a record names for itself
    for i, (where, entry) in enumerate(entries):
        if not isinstance(entry, dict):
            raise InputError(f"{where} is not an object")
        try:
            image = record_image(entry, _EXTRA_IMAGE_KEYS)
        except LayoutError as exc:
            raise InputError(f"{where}: {exc}") from exc
        if Path(image).is_absolute() or ".." in Path(image).parts:
            raise InputError(f"{where}: image path must be relative to --images, got {image!r}")
        if images_dir is not None and not (Path(images_dir) / image).is_file():
            missing.append(image)
        if "id" in entry:
            rid = explicit[where]
            if rid in ids:
                raise InputError(f"{where}: duplicate id {rid!r}")
        else:
            rid = f"{Path(image).as_posix()}#{i}"
            while rid in ids or rid in explicit.values():
                rid += "+"
        ids.add(rid)
        turns, system = _turns(entry, where)
        record = {"id": rid, "image": Path(image).as_posix()}
        if system is not None:
            record["system"] = system
        record["conversations"] = turns
        family = entry.get("family", entry.get("category"))
        if isinstance(family, str):
            record["family"] = family
        if isinstance(entry.get("labels"), dict):
            record["labels"] = entry["labels"]
        lines.append(json.dumps(record, ensure_ascii=False))
    if not lines:
        raise InputError(f"{dataset_json} has no entries")
    if missing:
        raise InputError(f"{len(missing)} image(s) of {dataset_json} are not under {images_dir}, e.g. {missing[0]!r}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, "\n".join(lines) + "\n")
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from exc
    return len(lines)
