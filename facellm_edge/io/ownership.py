"""The ``--force`` rule: which existing outputs the toolkit may replace.

Only a directory this tool provably wrote — one carrying our marker file (:data:`MARKER`, written into every
:func:`~facellm_edge.io.files.atomic_directory` output) or one a caller's ``recognise`` function vouches for (a bundle
whose manifest parses as ours, results folders of older versions by their exact file set) — and only when it holds
nothing but the files we wrote (a user's note dropped into it blocks the replacement).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from facellm_edge.errors import OutputError

MARKER = ".facellm-edge-output.json"
TOOL = "facellm-edge"

# A function that, given an existing directory, returns the relative POSIX paths of the files this tool wrote in
# it — or None when it cannot prove the directory is ours.
Recogniser = Callable[[Path], "set[str] | None"]


@dataclass(frozen=True)
class OutputKind:
    """A kind of output folder: ``name`` is a noun phrase for messages and the marker ("a bundle", "eval results");
    ``recognise`` proves ownership of folders without the marker (older versions; bundles, whose manifest is the
    proof); ``marker`` says whether :func:`~facellm_edge.io.files.atomic_directory` writes :data:`MARKER` into it."""

    name: str
    recognise: Recogniser | None = None
    marker: bool = True


OUTPUT = OutputKind("an output folder")


def files_under(root: Path) -> Iterator[str]:
    """Relative POSIX paths of every non-directory entry under ``root`` (symlinks included, never followed)."""
    for top, dirs, files in os.walk(root):
        rel_top = Path(top).relative_to(root)
        for name in files + [d for d in dirs if os.path.islink(os.path.join(top, d))]:
            yield (rel_top / name).as_posix()


def _json_object_or_none(path: Path) -> dict | None:
    """``path`` as a JSON object, or None when it is a link, unreadable, not JSON or not an object: recognisers
    answer "not ours", they never raise."""
    if path.is_symlink() or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: nested too deeply
        return None
    return data if isinstance(data, dict) else None


def marker_files(dest: Path, kind: str) -> set[str] | None:
    """The files listed in ``dest``'s marker when it marks a ``kind`` output of this tool; None otherwise."""
    data = _json_object_or_none(Path(dest) / MARKER)
    if not (data is not None and data.get("tool") == TOOL and data.get("kind") == kind
            and isinstance(data.get("files"), list) and all(isinstance(f, str) for f in data["files"])):
        return None
    return {*data["files"], MARKER}


def output_path(path: Path | str) -> Path:
    """``path`` with ``..`` and ``.`` resolved by name (``os.path.normpath``), as every output is checked and written:
    ``out/NEW/..`` is ``out``. Otherwise its existence was checked through a ``NEW`` that did not exist yet (so
    "absent"), and only after the whole export, once writing had created ``NEW``, was ``out`` found to exist."""
    return Path(os.path.normpath(path))


def check_replaceable(dest: Path, *, force: bool, kind: OutputKind = OUTPUT) -> None:
    """The ``--force`` rule, in one place: raise :class:`OutputError` unless ``dest`` is absent, or ``force`` is
    given and ``dest`` is a ``kind`` output this tool wrote that holds nothing else."""
    dest = output_path(dest)
    if not os.path.lexists(dest):
        return
    if not force:
        raise OutputError(f"output {dest} already exists; choose another --out or pass --force to replace it")
    refuse = f"refusing to replace {dest}"
    fix = "move it away or choose another --out"
    if dest.is_symlink() or not dest.is_dir():
        raise OutputError(f"{refuse}: it is not a folder written by {TOOL}; {fix}")
    owned = marker_files(dest, kind.name)
    if owned is None and kind.recognise is not None:
        owned = kind.recognise(dest)
    if owned is None:
        raise OutputError(f"{refuse}: it is not {kind.name} written by {TOOL}; {fix}")
    foreign = next((f for f in files_under(dest) if f not in owned), None)
    if foreign is not None:
        raise OutputError(f"{refuse}: it holds {foreign}, which {TOOL} did not write; {fix}")


def check_replaceable_file(path: Path, *, force: bool, kind: str, recognise: Callable[[Path], bool]) -> None:
    """:func:`check_replaceable` for an output that is one file: ``recognise(path)`` must prove it is ours."""
    path = output_path(path)
    if not os.path.lexists(path):
        return
    if not force:
        raise OutputError(f"output {path} already exists; choose another --out or pass --force to replace it")
    if path.is_symlink() or not path.is_file() or not recognise(path):
        raise OutputError(f"refusing to replace {path}: it is not {kind} written by {TOOL}; move it away or choose "
                          "another --out")


def known_file_set(names: set[str], json_name: str, schema: str) -> Recogniser:
    """A recogniser for outputs of versions without the marker: exactly ``names``, with ``json_name`` a JSON object
    whose ``schema`` key is ``schema``."""

    def recognise(dest: Path) -> set[str] | None:
        if set(files_under(dest)) != names:
            return None
        doc = _json_object_or_none(dest / json_name)
        return set(names) if doc is not None and doc.get("schema") == schema else None

    return recognise
