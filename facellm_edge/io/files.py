"""Files and folders on disk: sha256, the JSON object reader, the user cache folder, permissions, stale
temporaries and atomic writes.

Every output of the toolkit is built under a temporary name beside its destination and moved into place only once
complete, so that an interrupted or failed write never leaves a half-written file under the user's name:
:func:`atomic_directory` for folders, :func:`atomic_file` for one file (filled by this process or by an external
tool given its path), :func:`atomic_write_text` for text.

Outputs get the permissions of ordinary files: ``0o666 & ~umask`` / ``0o777 & ~umask`` (644/755 under umask 022),
not the 600/700 of the temporary files and directories they are built in.

Temporary directories are named ``.<name>.tmp-<pid>-<random>`` and locked (``flock``) while in use; temporary files
``.<stem>.tmp-<pid>-<random><suffix>``. A later write to the same destination removes the ones whose process is
dead (and, for directories, whose lock is free): left by ``kill -9`` or a power cut; a live writer's temporary is
never touched. Older unlabelled ``.<name>.tmp-<random>`` directories are left alone: nothing proves their writer is
gone.
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
import time
from pathlib import Path
from typing import Callable, Iterator

from facellm_edge.errors import FaceLLMEdgeError, OutputError
from facellm_edge.io.ownership import MARKER, OUTPUT, TOOL, OutputKind, check_replaceable, files_under, output_path
from facellm_edge.signals import call_holding_signals

log = logging.getLogger(__name__)


def sha256_bytes(data: bytes) -> str:
    """The sha256 of ``data`` as hex (how bundles, the hub cache and the server name content)."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """The sha256 of a file's bytes as hex, read in ``chunk``-sized blocks (:func:`sha256_bytes` for bytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # "\ud800"..."\udfff" in JSON text


def loads_json(text: str | bytes) -> object:
    """``json.loads`` for untrusted text, where two more things are malformed JSON (:class:`json.JSONDecodeError`,
    which every reader already turns into its one-line error): nesting deeper than Python's recursion limit
    (``[[[[...`` a hundred thousand deep: RecursionError otherwise), and a string holding a lone surrogate escape
    (``"\udc80"``: valid JSON syntax, but no text — it fails only when written out as UTF-8, after the work)."""
    doc = text if isinstance(text, str) else bytes(text).decode("utf-8", "replace")
    try:
        obj = json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", doc, 0) from None
    if _SURROGATE_ESCAPE.search(doc):
        _check_text(obj, doc)
    return obj


def _check_text(obj: object, doc: str) -> None:
    stack = [obj]
    while stack:  # iterative: the document may be nested as deep as json accepted
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                bad = item[exc.start:exc.end].encode("unicode_escape").decode("ascii")
                raise json.JSONDecodeError(f"a string holds {bad}, half of a surrogate pair (not text)", doc,
                                           0) from None


def read_json_object(path: Path, error: type[FaceLLMEdgeError], fix: str = "") -> dict:
    """Read a JSON object from ``path``; anything else (unreadable, not JSON, not an object) raises ``error``
    with a one-line message ending in ``fix``."""
    path = Path(path)
    suffix = f"; {fix}" if fix else ""
    try:
        data = loads_json(path.read_text(encoding="utf-8"))
    except PermissionError as exc:  # the file is fine: re-exporting or re-downloading would not help
        raise error(f"cannot read {path}: permission denied; run as a user who may read it, or change its "
                    "permissions") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"cannot read {path}: {exc}{suffix}") from exc
    if not isinstance(data, dict):
        raise error(f"{path} is not a JSON object{suffix}")
    return data


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/facellm-edge`` (default ``~/.cache/facellm-edge``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "facellm-edge"


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
    set aside for the instant of the swap (:func:`replace_directory`) -> removed when ``dest`` exists, renamed back
    to ``dest`` otherwise.
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


_TEMP_FILE_RANDOM = r"[a-z0-9_]{8}"  # tempfile's random part


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


# -- atomic directories -----------------------------------------------------------------------------------------

def replace_directory(tmp: Path, dest: Path) -> None:
    """Move the finished folder ``tmp`` to ``dest``. An existing ``dest`` is set aside as ``.<name>.old-<pid>`` for
    the instant of the swap (put back by :func:`clean_stale_temps` if the process dies in between), then removed."""
    dest = Path(dest)
    if not os.path.lexists(dest):
        os.replace(tmp, dest)
        return
    old = dest.parent / f".{dest.name}.old-{os.getpid()}"
    os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(dest: Path, *, force: bool = False, kind: OutputKind = OUTPUT) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes ``dest`` only if the block succeeds.

    On any exception (Ctrl-C included) the temporary directory is removed and ``dest`` is untouched. With
    ``force`` an existing ``dest`` is replaced only if :func:`check_replaceable` allows it (checked before and
    again just before the swap), and only after the new one is complete. ``kind.marker`` writes :data:`MARKER`
    (tool, version, kind, file list) into the output so that a later ``--force`` can prove it is ours.
    """
    dest = output_path(dest)
    check_replaceable(dest, force=force, kind=kind)
    parent = dest.parent if str(dest.parent) else Path(".")
    made: list[Path] = []  # the temporary, recorded with signals held (see _make_temporary)
    lock_fd: int | None = None
    try:
        try:
            parent.mkdir(parents=True, exist_ok=True)
            clean_stale_temps(dest)
            _make_temporary(made, lambda: Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{os.getpid()}-",
                                                                 dir=parent)))
        except OSError as exc:
            raise OutputError(f"cannot write to {parent}: {exc.strerror or exc}") from exc
        tmp = made[0]
        lock_fd = os.open(tmp, os.O_RDONLY)
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
        replace_directory(tmp, dest)
    except BaseException:
        for tmp in made:
            remove_tree(tmp)
        raise
    finally:
        if lock_fd is not None:
            os.close(lock_fd)


def temporary_directory(prefix: str) -> "tempfile.TemporaryDirectory[str]":
    """``tempfile.TemporaryDirectory(prefix=...)`` in the system temp dir, made with Ctrl-C / SIGTERM held: once it
    exists its finalizer removes it whatever happens next, and a stop cannot land inside its constructor between
    the folder's creation and that finalizer's registration (a stop held meanwhile removes it, then stops)."""
    return call_holding_signals(lambda: tempfile.TemporaryDirectory(prefix=prefix), lambda t: t.cleanup())


def _make_temporary(made: list[Path], make: Callable[[], Path]) -> None:
    """Create a temporary (``make``) and record it in ``made`` with Ctrl-C / SIGTERM held: a stop that lands
    between the creation and the record would leave a temporary the caller's cleanup does not know of (seen: an
    export stopped just as its bundle folder was created). The held signal is delivered right after, and the
    caller's cleanup removes what ``made`` holds."""
    call_holding_signals(lambda: made.append(make()))


def remove_tree(path: Path, attempts: int = 30, pause_s: float = 0.1) -> bool:
    """Remove a temporary folder of ours even while a library's writer threads are still finishing files in it (an
    interrupted ONNX save): one pass of rmtree can lose that race and leave the folder; retry for up to
    ``attempts * pause_s`` seconds. Returns whether it is gone."""
    for i in range(attempts):
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            return True
        if i + 1 < attempts:
            time.sleep(pause_s)
    log.warning("could not remove the temporary folder %s", path)
    return False


# -- atomic files -----------------------------------------------------------------------------------------------

def temp_file_beside(dest: Path) -> Path:
    """An empty temporary file beside ``dest`` with ``dest``'s suffix (encoders pick the container from it), named
    ``.<stem>.tmp-<pid>-<random><suffix>`` so that :func:`clean_stale_temp_files` can tell a dead run's leftovers.
    Created exclusively: it never is, nor replaces, a file someone else made."""
    dest = output_path(dest)
    parent = dest.parent if str(dest.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{dest.stem}.tmp-{os.getpid()}-", suffix=dest.suffix, dir=parent)
    except OSError as exc:
        raise OutputError(f"cannot write {dest}: {exc.strerror or exc}") from exc
    os.close(fd)
    return Path(name)


def commit_temp_file(tmp: Path, dest: Path, *, replace: bool = True, mode: int | None = None) -> None:
    """Give ``tmp`` ``mode`` (default: the mode of an ordinary new file, umask respected) and move it to ``dest``
    atomically. With ``replace=False`` an existing ``dest`` is never touched: :class:`FileExistsError` (hard link,
    then unlink)."""
    dest = output_path(dest)
    os.chmod(tmp, file_mode() if mode is None else mode)
    if replace:
        os.replace(tmp, dest)
    else:
        os.link(tmp, dest)
        os.unlink(tmp)


@contextlib.contextmanager
def atomic_file(dest: Path, *, replace: bool = True, mode: int | None = None) -> Iterator[Path]:
    """Yield an empty temporary file beside ``dest`` (:func:`temp_file_beside`) for a writer to fill — this process,
    or an external tool given its path (llama.cpp's quantiser, gguf-py's writer) — that becomes ``dest``
    (:func:`commit_temp_file`, ``replace`` and ``mode`` as there) only if the block succeeds. On any exception,
    Ctrl-C included, the temporary file is removed and ``dest`` is untouched. Temporary files of dead runs for
    ``dest`` are removed first."""
    dest = output_path(dest)
    clean_stale_temp_files(dest)
    made: list[Path] = []
    try:
        _make_temporary(made, lambda: temp_file_beside(dest))
        tmp = made[0]
        yield tmp
        commit_temp_file(tmp, dest, replace=replace, mode=mode)
    except BaseException:
        for tmp in made:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through :func:`atomic_file`, synced to the disk before the rename. The file keeps
    the mode of the file it replaces; a new file gets ``0o666 & ~umask``."""
    path = Path(path)
    try:
        mode: int | None = os.stat(path).st_mode & 0o7777
    except OSError:
        mode = None
    with atomic_file(path, mode=mode) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
