"""Files on disk, one helper of each kind: atomic file and directory writes, sha256.

Every output of the toolkit goes through here, so that an interrupted or failed write never leaves a
half-written file under the user's name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from facellm_edge.errors import OutputError


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_directory(dest: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes ``dest`` only if the block succeeds.

    On any exception the temporary directory is removed and ``dest`` is untouched. With ``force`` an existing
    ``dest`` is replaced only after the new one is complete.
    """
    dest = Path(dest)
    if dest.exists() and not force:
        raise OutputError(f"output {dest} already exists; choose another --out or pass --force to replace it")
    parent = dest.parent if str(dest.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=parent))
    except OSError as exc:
        raise OutputError(f"cannot write to {parent}: {exc.strerror or exc}") from exc
    try:
        yield tmp
        if dest.exists():
            old = parent / f".{dest.name}.old-{os.getpid()}"
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same directory and ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
