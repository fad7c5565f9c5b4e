"""Files on disk, one helper of each kind: atomic file and directory writes, sha256, the ownership rule, single
output files (``--jsonl``, ``--output``) and the bounded image reader.

Longer than the ~400 lines a module should be, on purpose: it is the one owner of every byte the toolkit reads from
a user's image or writes under a user's name, so that each rule (ownership, umask, temp names, stale-temp removal,
decoded-size bound) exists once. Its sections are independent and ordered as listed.

Every output of the toolkit goes through here, so that an interrupted or failed write never leaves a
half-written file under the user's name, and so that one rule decides what ``--force`` may replace:

* only a directory this tool provably wrote — one carrying our marker file (:data:`MARKER`, written into every
  :func:`atomic_directory` output) or one a caller's ``recognise`` function vouches for (a bundle whose manifest
  parses as ours, results folders of older versions by their exact file set) — and
* only when it holds nothing but the files we wrote (a user's note dropped into it blocks the replacement).

Outputs get the permissions of ordinary files: ``0o666 & ~umask`` / ``0o777 & ~umask`` (644/755 under umask 022),
not the 600/700 of the temporary files and directories they are built in.

Temporary directories are named ``.<name>.tmp-<pid>-<random>`` and locked (``flock``) while in use. A later write
to the same destination removes the ones whose process is dead and whose lock is free (left by ``kill -9`` or a
power cut); a live writer's directory is never touched. Older unlabelled ``.<name>.tmp-<random>`` directories are
left alone: nothing proves their writer is gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from facellm_edge.errors import OutputError

log = logging.getLogger(__name__)

MARKER = ".facellm-edge-output.json"
TOOL = "facellm-edge"

# A function that, given an existing directory, returns the relative POSIX paths of the files this tool wrote in
# it — or None when it cannot prove the directory is ours.
Recogniser = Callable[[Path], "set[str] | None"]


@dataclass(frozen=True)
class OutputKind:
    """A kind of output folder: ``name`` is a noun phrase for messages and the marker ("a bundle", "eval results");
    ``recognise`` proves ownership of folders without the marker (older versions; bundles, whose manifest is the
    proof); ``marker`` says whether :func:`atomic_directory` writes :data:`MARKER` into it."""

    name: str
    recognise: Recogniser | None = None
    marker: bool = True


OUTPUT = OutputKind("an output folder")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# -- permissions ------------------------------------------------------------------------------------------------

def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (``os.umask`` alone is a set-and-restore
    that briefly exposes umask 0 to other threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    return 0o777 & ~current_umask()


def apply_default_modes(root: Path) -> None:
    """Give ``root`` and everything under it the modes a plain ``mkdir``/``open`` would have (umask respected)."""
    fmode, dmode = file_mode(), dir_mode()
    os.chmod(root, dmode)
    for top, dirs, files in os.walk(root):
        for d in dirs:
            p = os.path.join(top, d)
            if not os.path.islink(p):
                os.chmod(p, dmode)
        for f in files:
            p = os.path.join(top, f)
            if not os.path.islink(p):
                os.chmod(p, fmode)


# -- ownership --------------------------------------------------------------------------------------------------

def files_under(root: Path) -> Iterator[str]:
    """Relative POSIX paths of every non-directory entry under ``root`` (symlinks included, never followed)."""
    for top, dirs, files in os.walk(root):
        rel_top = Path(top).relative_to(root)
        for name in files + [d for d in dirs if os.path.islink(os.path.join(top, d))]:
            yield (rel_top / name).as_posix()


def marker_files(dest: Path, kind: str) -> set[str] | None:
    """The files listed in ``dest``'s marker when it marks a ``kind`` output of this tool; None otherwise."""
    path = Path(dest) / MARKER
    if path.is_symlink() or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not (isinstance(data, dict) and data.get("tool") == TOOL and data.get("kind") == kind
            and isinstance(data.get("files"), list) and all(isinstance(f, str) for f in data["files"])):
        return None
    return {*data["files"], MARKER}


def check_replaceable(dest: Path, *, force: bool, kind: OutputKind = OUTPUT) -> None:
    """The ``--force`` rule, in one place: raise :class:`OutputError` unless ``dest`` is absent, or ``force`` is
    given and ``dest`` is a ``kind`` output this tool wrote that holds nothing else."""
    dest = Path(dest)
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
    path = Path(path)
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
        present = set(files_under(dest))
        if present != names or (dest / json_name).is_symlink():
            return None
        try:
            doc = json.loads((dest / json_name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return None
        return set(names) if isinstance(doc, dict) and doc.get("schema") == schema else None

    return recognise


# -- stale temporaries ------------------------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def _lock(fd: int, blocking: bool) -> bool:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: the pid check alone decides
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except OSError:
        return False
    return True


def _unlocked(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        return _lock(fd, blocking=False)
    finally:
        os.close(fd)  # closing releases the probe's lock


def _siblings_named(dest: Path, pattern: "re.Pattern[str]") -> Iterator[tuple[os.DirEntry, "re.Match[str]"]]:
    """The entries beside ``dest`` whose names match ``pattern`` (none when the folder cannot be listed)."""
    parent = dest.parent if str(dest.parent) else Path(".")
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        m = pattern.match(entry.name)
        if m is not None:
            yield entry, m


def clean_stale_temps(dest: Path) -> list[Path]:
    """Remove ``dest``'s temporary siblings left by dead processes; return what was removed or restored.

    ``.<name>.tmp-<pid>-*``: a build that never finished -> removed. ``.<name>.old-<pid>``: the previous output,
    set aside for the instant of the swap -> removed when ``dest`` exists, renamed back to ``dest`` otherwise.
    """
    dest = Path(dest)
    # exactly the names atomic_directory gives: mkdtemp's suffix is 8 characters of [a-z0-9_]
    pattern = re.compile(rf"^\.{re.escape(dest.name)}\.(?:(tmp)-(\d+)-[a-z0-9_]{{8}}|(old)-(\d+))$")
    done: list[Path] = []
    for entry, m in _siblings_named(dest, pattern):
        if not entry.is_dir(follow_symlinks=False):
            continue
        pid = int(m.group(2) or m.group(4))
        if _pid_alive(pid):
            continue
        path = Path(entry.path)
        if m.group(1) == "tmp":
            if not _unlocked(path):
                continue
            shutil.rmtree(path, ignore_errors=True)
            log.warning("removed %s, left by an interrupted run (pid %d)", path, pid)
        elif os.path.lexists(dest):
            shutil.rmtree(path, ignore_errors=True)
            log.warning("removed %s, the previous %s set aside by an interrupted run", path, dest.name)
        else:
            os.replace(path, dest)
            log.warning("restored %s from %s, set aside by an interrupted run", dest, path)
        done.append(path)
    return done


# -- atomic writes ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_directory(dest: Path, *, force: bool = False, kind: OutputKind = OUTPUT) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes ``dest`` only if the block succeeds.

    On any exception (Ctrl-C included) the temporary directory is removed and ``dest`` is untouched. With
    ``force`` an existing ``dest`` is replaced only if :func:`check_replaceable` allows it (checked before and
    again just before the swap), and only after the new one is complete. ``kind.marker`` writes :data:`MARKER`
    (tool, version, kind, file list) into the output so that a later ``--force`` can prove it is ours.
    """
    dest = Path(dest)
    check_replaceable(dest, force=force, kind=kind)
    parent = dest.parent if str(dest.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(dest)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=parent))
    except OSError as exc:
        raise OutputError(f"cannot write to {parent}: {exc.strerror or exc}") from exc
    lock_fd = os.open(tmp, os.O_RDONLY)
    try:
        _lock(lock_fd, blocking=True)  # a concurrent clean_stale_temps sees a live writer
        yield tmp
        if kind.marker:
            from facellm_edge import __version__

            files = sorted(files_under(tmp))
            doc = {"tool": TOOL, "version": __version__, "kind": kind.name, "files": files}
            (tmp / MARKER).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        apply_default_modes(tmp)
        if os.path.lexists(dest):
            check_replaceable(dest, force=force, kind=kind)
            old = parent / f".{dest.name}.old-{os.getpid()}"
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(lock_fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same directory and ``os.replace``.

    The file keeps the mode of the file it replaces; a new file gets ``0o666 & ~umask``.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode & 0o7777
    except OSError:
        mode = file_mode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# -- single output files (--jsonl, --output) --------------------------------------------------------------------

def check_output_file(path: Path, *, option: str, exists: str = "refuse", fix: str = "") -> None:
    """Check, before any work, that ``path`` can be written as one output file; :class:`OutputError` naming
    ``option`` otherwise. Nothing is created. ``exists``: "refuse" an existing file (``fix`` says what to pass
    instead), "append" to it or "replace" it. The parent folder (or its nearest existing ancestor: missing folders
    are made later) is probed with an unnamed temporary file, so permissions, read-only disks and ACLs are tested
    for real, root included."""
    path = Path(path)
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
    path = Path(path)
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


_TEMP_FILE_RANDOM = r"[a-z0-9_]{8}"  # tempfile's random part


def temp_file_beside(dest: Path) -> Path:
    """An empty temporary file beside ``dest`` with ``dest``'s suffix (encoders pick the container from it), named
    ``.<stem>.tmp-<pid>-<random><suffix>`` so that :func:`clean_stale_temp_files` can tell a dead run's leftovers."""
    dest = Path(dest)
    parent = dest.parent if str(dest.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{dest.stem}.tmp-{os.getpid()}-", suffix=dest.suffix, dir=parent)
    except OSError as exc:
        raise OutputError(f"cannot write {dest}: {exc.strerror or exc}") from exc
    os.close(fd)
    return Path(name)


def clean_stale_temp_files(dest: Path) -> list[Path]:
    """Remove the temporary files of :func:`temp_file_beside` for ``dest`` whose process is gone (``kill -9``, power
    cut): they may hold faces. A live process's file is never touched."""
    dest = Path(dest)
    pattern = re.compile(rf"^\.{re.escape(dest.stem)}\.tmp-(\d+)-{_TEMP_FILE_RANDOM}{re.escape(dest.suffix)}$")
    removed: list[Path] = []
    for entry, m in _siblings_named(dest, pattern):
        if not entry.is_file(follow_symlinks=False) or _pid_alive(int(m.group(1))):
            continue
        with contextlib.suppress(OSError):
            os.unlink(entry.path)
            removed.append(Path(entry.path))
            log.warning("removed %s, left by an interrupted run (pid %s)", entry.path, m.group(1))
    return removed


def commit_temp_file(tmp: Path, dest: Path, *, replace: bool = True) -> None:
    """Give ``tmp`` the mode of an ordinary new file (umask respected) and move it to ``dest`` atomically. With
    ``replace=False`` an existing ``dest`` is never touched: :class:`FileExistsError` (hard link, then unlink)."""
    os.chmod(tmp, file_mode())
    if replace:
        os.replace(tmp, dest)
    else:
        os.link(tmp, dest)
        os.unlink(tmp)


# -- images -----------------------------------------------------------------------------------------------------

DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP: 120 MB as BGR; bigger photos are refused before they are decoded


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image's header, without decoding its pixels (Pillow reads the first few KB)."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    from facellm_edge.errors import InputError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                return im.size
        except Image.DecompressionBombError as exc:  # Pillow's own cap (2 x MAX_IMAGE_PIXELS) refused the header
            raise _TooLarge(2 * (Image.MAX_IMAGE_PIXELS or 0)) from exc
        except (UnidentifiedImageError, SyntaxError, ValueError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno is not None:  # the file system's error, not the decoder's
                raise InputError(f"cannot read image {path}: {exc.strerror or exc}") from exc
            raise InputError(f"cannot decode image {path} (empty, damaged or not an image file)") from exc


def _mp(pixels: int) -> str:
    return f"{pixels / 1e6:.1f}".removesuffix(".0") + " MP"


class _TooLarge(Exception):
    def __init__(self, at_least: int) -> None:
        super().__init__(at_least)
        self.at_least = at_least


def read_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> "np.ndarray":
    """Read an image file as BGR uint8. Missing, unreadable, undecodable, or above ``max_pixels`` (checked on the
    header, before any pixel is decoded; 0 = no limit) -> :class:`~facellm_edge.errors.InputError`."""
    import cv2
    import numpy as np

    from facellm_edge.errors import InputError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"image not found: {path}")
    try:
        w, h = image_size(path)
    except _TooLarge as big:
        if max_pixels and max_pixels <= big.at_least:
            raise InputError(f"image {path} has more than {_mp(big.at_least)}, above the {_mp(max_pixels)} limit; "
                             "downscale it or raise --max-pixels") from None
        w = h = 0  # the caller allowed more than Pillow's cap: OpenCV decodes it
    if max_pixels and w * h > max_pixels:
        raise InputError(f"image {path} is {w}x{h} ({_mp(w * h)}), above the {_mp(max_pixels)} limit; "
                         "downscale it or raise --max-pixels")
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        raise InputError(f"cannot read image {path}: {exc.strerror or exc}") from exc
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None or image.size == 0:
        raise InputError(f"cannot decode image {path} (empty, damaged or not an image file)")
    return image
