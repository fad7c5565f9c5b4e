"""Import the published FairFaceGPT ``dataset.json`` into this project's ShareGPT JSONL, validated, as is.

Accepted entry shapes (a JSON list, or an object holding the list under ``data``/``annotations``/``samples``):
``{"image": "train/1.jpg", "conversations": [{"from": "human"|"gpt", "value": ...}, ...]}`` (ShareGPT, also with
``role``/``content`` keys) or ``{"image": ..., "question": ..., "answer": ...}``. The image key may also be
``image_path``/``file``. Texts are kept as they are; the ``<image>`` tag is put at the start of the first human turn
when it is absent. Optional ``id``, ``family``/``category`` and ``labels`` are carried over.
"""

from __future__ import annotations

import json
from pathlib import Path

from facellm_edge.datagen.build import is_record
from facellm_edge.io import atomic_write_text, check_replaceable_file
from facellm_edge.errors import InputError, OutputError

_ROLE = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}
_IMAGE_KEYS = ("image", "image_path", "file")
_LIST_KEYS = ("data", "annotations", "samples")


def _entries(obj: object, path: Path) -> list:
    if isinstance(obj, dict):
        for k in _LIST_KEYS:
            if isinstance(obj.get(k), list):
                return obj[k]
        raise InputError(f"{path}: expected a JSON list of entries (or an object with one of {', '.join(_LIST_KEYS)})")
    if not isinstance(obj, list):
        raise InputError(f"{path}: expected a JSON list of entries")
    return obj


def _turns(entry: dict, where: str) -> list[dict]:
    if "conversations" in entry:
        conv = entry["conversations"]
        if not isinstance(conv, list) or not conv:
            raise InputError(f"{where}: 'conversations' must be a non-empty list")
        turns = []
        for j, t in enumerate(conv):
            if not isinstance(t, dict):
                raise InputError(f"{where}: conversations[{j}] is not an object")
            role = _ROLE.get(str(t.get("from", t.get("role", ""))).lower())
            value = t.get("value", t.get("content"))
            if role is None:
                raise InputError(f"{where}: conversations[{j}] has no known speaker (from/role: human|gpt|user|assistant)")
            if not isinstance(value, str) or not value.strip():
                raise InputError(f"{where}: conversations[{j}] has an empty text")
            turns.append({"from": role, "value": value})
    elif "question" in entry and "answer" in entry:
        q, a = entry["question"], entry["answer"]
        if not isinstance(q, str) or not q.strip() or not isinstance(a, str) or not a.strip():
            raise InputError(f"{where}: 'question' and 'answer' must be non-empty strings")
        turns = [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    else:
        raise InputError(f"{where}: needs 'conversations' or 'question'+'answer'")
    if turns[0]["from"] != "human" or len(turns) % 2:
        raise InputError(f"{where}: turns must alternate human/gpt starting with human and end with gpt")
    for j, t in enumerate(turns):
        if t["from"] != ("human" if j % 2 == 0 else "gpt"):
            raise InputError(f"{where}: turn {j} should be {'human' if j % 2 == 0 else 'gpt'}")
    if "<image>" not in turns[0]["value"]:
        turns[0] = {"from": "human", "value": "<image>\n" + turns[0]["value"]}
    return turns


def _is_imported_record(obj: object) -> bool:
    keys = set(obj) if isinstance(obj, dict) else set()
    return ({"id", "image", "conversations"} <= keys <= {"id", "image", "conversations", "family", "labels"}
            and isinstance(obj["id"], str) and isinstance(obj["image"], str) and isinstance(obj["conversations"], list))


def is_sharegpt_jsonl(path: Path) -> bool:
    """Whether every line of ``path`` is a record this tool writes (``data build`` or ``import-fairfacegpt``)."""
    try:
        with open(path, "rb") as f:
            for line in f:
                if line.strip():
                    obj = json.loads(line)
                    if not (is_record(obj) or _is_imported_record(obj)):
                        return False
    except (OSError, ValueError):
        return False
    return True


def import_fairfacegpt(dataset_json: Path, images_dir: Path | None, out: Path, *, force: bool = False) -> int:
    """Validate + normalise ``dataset_json`` into ``out`` (JSONL, written atomically). Returns the record count."""
    dataset_json, out = Path(dataset_json), Path(out)
    check_replaceable_file(out, force=force, kind="a ShareGPT JSONL", recognise=is_sharegpt_jsonl)
    try:
        obj = json.loads(dataset_json.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InputError(f"{dataset_json} does not exist") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{dataset_json} is not valid JSON: {exc}") from exc
    lines, ids, missing = [], set(), []
    for i, entry in enumerate(_entries(obj, dataset_json)):
        where = f"{dataset_json} entry {i}"
        if not isinstance(entry, dict):
            raise InputError(f"{where} is not an object")
        image = next((entry[k] for k in _IMAGE_KEYS if isinstance(entry.get(k), str) and entry[k]), None)
        if image is None:
            raise InputError(f"{where} has no image path (one of {', '.join(_IMAGE_KEYS)})")
        if Path(image).is_absolute() or ".." in Path(image).parts:
            raise InputError(f"{where}: image path must be relative to --images, got {image!r}")
        if images_dir is not None and not (Path(images_dir) / image).is_file():
            missing.append(image)
        rid = str(entry.get("id", f"{Path(image).as_posix()}#{i}"))
        if rid in ids:
            raise InputError(f"{where}: duplicate id {rid!r}")
        ids.add(rid)
        record = {"id": rid, "image": Path(image).as_posix(), "conversations": _turns(entry, where)}
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
