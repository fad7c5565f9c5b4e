"""FaceXBench-style bench files: a JSON list of multiple-choice questions about one or more face images.

Item: ``{"id", "question", "options": {"A": .., "B": ..} | [..], "answer": "B", "images": [paths], "category",
"task", optional "group" (str or {attr: value}) / "demographics" ({attr: value}), "context", "prepend_text",
"postpend_text" (default: an answer-with-the-letter instruction), "num_images"}``. Texts are kept byte for byte.

FaceXBench's own per-task files are read as they are too: ``{"category", "sub-category", "prepend_text",
"postpend_text", "questions": {"1": {"image_paths", "question_text", "options": [..], "correct_answer_option"}}}``
(``sub-category`` becomes the task, ids become ``<file stem>/<n>``), as is a folder of such files.
Image paths are relative to ``--images`` (default: the bench file's folder); absolute paths are used as they are.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

from facellm_edge.errors import InputError
from facellm_edge.io import loads_json

LETTERS = string.ascii_uppercase
PROMPT_SUFFIX = "Answer with the option's letter from the given choices directly."
FACEXBENCH_LABELS = 4  # FaceXBench's evaluate.py labels options A-D and leaves any further option out of the prompt


@dataclass(frozen=True)
class MCQItem:
    id: str
    question: str
    options: tuple[tuple[str, str], ...]  # (letter, text) in order
    answer: str
    images: tuple[Path, ...]
    category: str
    task: str
    groups: tuple[tuple[str, str], ...] = ()  # demographic attribute -> value
    context: str = ""  # FaceXBench's task context (tools_use tasks: the API catalogue), always in the prompt
    prepend: str = ""  # FaceXBench's prepend_text (task description): in the prompt only with --prepend-text
    postpend: str = PROMPT_SUFFIX  # FaceXBench's postpend_text (answer instruction), before the options
    num_images: str = ""  # FaceXBench's "single" | "multiple" | "zero" (its tools task shows a black image)
    with_prepend: bool = False  # the default of prompt(): FaceXBench's --prepend_text, chosen when the bench is loaded

    @property
    def option_map(self) -> dict[str, str]:
        return dict(self.options)

    def prompt(self, prepend_text: bool | None = None) -> str:
        """The question text exactly as FaceXBench's ``evaluate.py`` builds it (the images go before it):
        ``context\n`` + (``prepend_text\n`` with --prepend-text) + ``question\n`` + ``postpend\n`` +
        ``(A) option\n`` per option, A-D. ``prepend_text`` None: as the bench was loaded (``with_prepend``)."""
        if prepend_text is None:
            prepend_text = self.with_prepend
        text = f"{self.context}\n" if self.context else ""
        if prepend_text and self.prepend:
            text += f"{self.prepend}\n"
        text += f"{self.question}\n"
        if self.postpend:
            text += f"{self.postpend}\n"
        for letter, option in self.options[:FACEXBENCH_LABELS]:
            text += f"({letter}) {option}\n"
        return text


@dataclass(frozen=True)
class MCQAnswer:
    """What a backend answered: the text, and whether generation stopped at the token cap (None: unknown)."""

    text: str
    truncated: bool | None = None


def _str(item: dict, key: str, where: str, required: bool = True) -> str:
    value = item.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, (str, int)) or isinstance(value, bool) or not str(value).strip():
        raise InputError(f"{where}: field '{key}' must be a non-empty string")
    return str(value).strip()


def _exact(item: dict, key: str, where: str) -> str:
    """A required text field, validated like ``_str`` but kept exactly as written."""
    _str(item, key, where)
    return str(item[key])


def _text(item: dict, key: str, where: str) -> str:
    """An optional free-text field, kept exactly as written (FaceXBench's prompt is byte-exact)."""
    value = item.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InputError(f"{where}: field '{key}' must be a string")
    return value


def _count_name(n: int) -> str:
    return "single" if n == 1 else "multiple"


def _options(raw: object, where: str) -> tuple[tuple[str, str], ...]:
    if isinstance(raw, list):
        pairs = list(zip(LETTERS, raw))
        if len(raw) > len(LETTERS):
            raise InputError(f"{where}: too many options ({len(raw)})")
    elif isinstance(raw, dict):
        pairs = [(str(k).strip().upper(), v) for k, v in raw.items()]
        letters = [k for k, _ in pairs]
        if letters != list(LETTERS[: len(letters)]):
            raise InputError(f"{where}: option keys must be A, B, C, ... in order, got {', '.join(map(str, raw))}")
    else:
        raise InputError(f"{where}: field 'options' must be an object {{'A': ..}} or a list")
    if len(pairs) < 2:
        raise InputError(f"{where}: needs at least 2 options")
    for letter, text in pairs:
        if not isinstance(text, (str, int, float)) or isinstance(text, bool) or not str(text).strip():
            raise InputError(f"{where}: option {letter} must be a non-empty string")
    return tuple((letter, str(text)) for letter, text in pairs)  # as written: the prompt is byte-exact


def _groups(item: dict, where: str) -> tuple[tuple[str, str], ...]:
    out: dict[str, str] = {}
    for key in ("demographics", "group"):
        raw = item.get(key)
        if raw is None:
            continue
        if isinstance(raw, str) and raw.strip():
            out["group"] = raw.strip()
        elif isinstance(raw, dict):
            for k, v in raw.items():
                if not isinstance(v, (str, int)) or isinstance(v, bool):
                    raise InputError(f"{where}: {key}.{k} must be a string")
                out[str(k)] = str(v)
        else:
            raise InputError(f"{where}: field '{key}' must be a string or an object of attribute -> value")
    return tuple(out.items())


def _from_facexbench(raw: dict, path: Path) -> list[dict]:
    """FaceXBench's native per-task file -> flat items."""
    out = []
    for n, q in raw["questions"].items():
        if not isinstance(q, dict):
            raise InputError(f"{path} question {n} is not an object")
        out.append({
            "id": f"{path.stem}/{n}", "question": q.get("question_text"), "options": q.get("options"),
            "answer": q.get("correct_answer_option"), "images": q.get("image_paths"),
            "category": raw.get("category"), "task": raw.get("sub-category") or path.stem,
            # FaceXBench puts its context into the prompt for tools_use tasks only
            "context": raw.get("context") if raw.get("category") == "tools_use" else "",
            "prepend_text": raw.get("prepend_text") or "", "postpend_text": raw.get("postpend_text") or "",
            "num_images": raw.get("num_images"),
        })
    return out


def _read_json(path: Path) -> object:
    try:
        return loads_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InputError(f"bench file {path} does not exist") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"bench file {path} is not valid JSON: {exc}") from exc


def load_bench(path: Path, images_dir: Path | None = None, *, prepend_text: bool = False,
               check_images: bool = True) -> list[MCQItem]:
    """Read and validate a bench file (or a folder of FaceXBench task files); every error names the item (index
    and id) and the field. Image paths are relative to ``images_dir`` (default: the bench file's folder).
    ``prepend_text``: the items' prompts carry FaceXBench's prepend_text (its --prepend_text). ``check_images``
    False: image files need not exist (re-scoring saved answers needs only the questions)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise InputError(f"bench folder {path} holds no .json files")
        items = [it for f in files for it in load_bench(f, images_dir if images_dir is not None else path,
                                                        prepend_text=prepend_text, check_images=check_images)]
        ids = [it.id for it in items]
        if len(set(ids)) != len(ids):
            raise InputError(f"bench folder {path}: question ids repeat across files")
        return items
    if images_dir is None:
        images_dir = path.parent
    raw = _read_json(path)
    if isinstance(raw, dict) and isinstance(raw.get("questions"), dict):
        raw = _from_facexbench(raw, path)
    elif isinstance(raw, dict) and isinstance(raw.get("questions"), list):
        raw = raw["questions"]
    if not isinstance(raw, list) or not raw:
        raise InputError(f"bench file {path} must be a non-empty JSON list of questions (or a FaceXBench task file)")
    items: list[MCQItem] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        where = f"{path} item {i}"
        if not isinstance(item, dict):
            raise InputError(f"{where} is not an object")
        qid = _str(item, "id", where)
        where = f"{path} item {i} (id {qid})"
        if qid in seen:
            raise InputError(f"{where}: duplicate id")
        seen.add(qid)
        options = _options(item.get("options"), where)
        answer = _str(item, "answer", where).upper().strip("() .")
        if answer not in dict(options):
            raise InputError(f"{where}: answer {item.get('answer')!r} is not one of the option letters "
                             f"{', '.join(k for k, _ in options)}")
        imgs = item.get("images", item.get("image"))
        if isinstance(imgs, str):
            imgs = [imgs]
        if not isinstance(imgs, list) or not imgs or not all(isinstance(p, str) and p for p in imgs):
            raise InputError(f"{where}: field 'images' must be a non-empty list of paths")
        paths = []
        for p in imgs:
            full = Path(p) if Path(p).is_absolute() or images_dir is None else Path(images_dir) / p
            if check_images and not full.is_file():
                raise InputError(f"{where}: image {full} does not exist (check --images)")
            paths.append(full)
        items.append(MCQItem(
            id=qid, question=_exact(item, "question", where), options=options, answer=answer, images=tuple(paths),
            category=_str(item, "category", where), task=_str(item, "task", where, required=False) or "all",
            groups=_groups(item, where), context=_text(item, "context", where),
            prepend=_text(item, "prepend_text", where),
            postpend=_text(item, "postpend_text", where) if "postpend_text" in item else PROMPT_SUFFIX,
            num_images=_text(item, "num_images", where) or _count_name(len(paths)), with_prepend=prepend_text,
        ))
    return items
