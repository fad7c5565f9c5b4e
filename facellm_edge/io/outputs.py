"""Single output files the runtime streams into (``--jsonl``, ``--output``): checked before any work, JSON lines
pushed to the disk one by one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from facellm_edge.errors import OutputError
from facellm_edge.io.ownership import output_path


def check_output_file(path: Path, *, option: str, exists: str = "refuse", fix: str = "") -> None:
    """Check, before any work, that ``path`` can be written as one output file; :class:`OutputError` naming
    ``option`` otherwise. Nothing is created. ``exists``: "refuse" an existing file (``fix`` says what to pass
    instead), "append" to it or "replace" it. The parent folder (or its nearest existing ancestor: missing folders
    are made later) is probed with an unnamed temporary file, so permissions, read-only disks and ACLs are tested
    for real, root included."""
    path = output_path(path)  # dir/NEW/.. is dir, as it will be written
    if path.is_dir():
        raise OutputError(f"{option} {path} is a folder; give a file path")
    if os.path.lexists(path):
        if not path.is_file():
            raise OutputError(f"{option} {path} is not a regular file; give a file path")
        if exists == "refuse":
            raise OutputError(f"{option} {path} already exists; {fix or 'choose another path'}")
    parent = path.parent if str(path.parent) else Path(".")
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot write {option} {path}: {existing} is not a folder")
    try:  # the folder, or the nearest one that exists (where the missing ones would be made)
        tempfile.TemporaryFile(dir=existing).close()  # O_TMPFILE where supported: no name ever appears
    except OSError as exc:
        raise OutputError(f"cannot write {option} {path}: {(exc.strerror or str(exc)).lower()} in {existing}") from exc
    if os.path.lexists(path) and not os.access(path, os.W_OK):
        raise OutputError(f"cannot write {option} {path}: permission denied")


def open_line_log(path: Path, *, append: bool):
    """Open a JSON-lines output for :func:`write_line`: a new file (``append=False``: one that appeared since it was
    checked is refused, never truncated) or the end of an existing one. A file whose last line has no newline (a
    write cut by a power loss) gets one first, so the next line starts clean and the torn one stays as it was."""
    path = output_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a" if append else "x", encoding="utf-8")
        if append and fh.tell() > 0:
            with open(path, "rb") as r:
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":
                    fh.write("\n")
    except FileExistsError as exc:
        raise OutputError(f"{path} already exists; pass --append to add to it or choose another file") from exc
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return fh


def write_line(fh, line: str) -> None:
    """Append one line and push it to the disk: an interrupted run or a power cut keeps every complete line."""
    fh.write(line + "\n")
    fh.flush()
    os.fsync(fh.fileno())
