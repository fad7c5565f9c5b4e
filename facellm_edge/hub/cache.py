"""The local cache of bundles, all under :func:`facellm_edge.io.user_cache_dir` (``~/.cache/facellm-edge``)::

    hub/models--OWNER--NAME/        huggingface_hub's own cache layout (``cache_dir`` of every hub call): blobs/
                                    named by content, snapshots/<commit>/<path> links into them, refs/<branch>.
                                    ``hf cache scan --dir ~/.cache/facellm-edge/hub`` reads it.
    bundles/OWNER--NAME/            the runnable bundle of a pull: ``manifest.json`` narrowed to the files pulled
                                    (plus a ``pulled`` record: repo, revision, source, alias) and those files, hard
                                    links to the blobs (copies where the file system has no hard links)
    bundles/FaceLLM-1B-q4_k_m/      the default bundle, exported on first use when the export extra is installed

A pull fetches only the files of the configuration asked for, so a snapshot holds a subset of the repo; the runnable
bundle beside it lists exactly what is there, so that loading, ``inspect`` and every hash check see a whole bundle.

Local folders are pulled through the same layout: :func:`write_local_repo` writes their files into ``hub/`` as
repo ``local/<folder name>`` (blobs, snapshot links, ``refs/main``), and huggingface_hub then resolves the snapshot
offline exactly as it resolves a download.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from facellm_edge.bundle import BUNDLE, MANIFEST, Bundle, Manifest
from facellm_edge.errors import BundleError, FaceLLMEdgeError, InputError, OutputError
from facellm_edge.io import atomic_directory, atomic_file, atomic_write_text, sha256_bytes, user_cache_dir
from facellm_edge.io import loads_json

log = logging.getLogger(__name__)

PULLED = "pulled"  # the manifest key of a pulled bundle: {repo, revision, source, alias}


def hub_dir() -> Path:
    """The hub-layout download cache (``cache_dir`` of every huggingface_hub call)."""
    return user_cache_dir() / "hub"


def bundles_dir() -> Path:
    """The runnable bundles: one folder per pulled repo, and the default bundle exported on first use."""
    return user_cache_dir() / "bundles"


def repo_folder(repo_id: str) -> Path:
    return hub_dir() / f"models--{repo_id.replace('/', '--')}"


def view_dir(repo_id: str) -> Path:
    return bundles_dir() / repo_id.replace("/", "--")


@dataclass(frozen=True)
class CachedBundle:
    """A bundle in the cache: pulled (``revision`` set) or exported there (the default bundle)."""

    name: str  # the repo id of a pulled bundle; the folder name of the others
    root: Path
    alias: str | None = None
    revision: str | None = None
    source: str = "exported"  # "hub", a local folder, or "exported"
    quants: tuple[str, ...] = ()
    vision: tuple[str, ...] = ()  # ONNX precisions, then "mmproj" when that file is there
    files: int = 0
    bytes: int = 0
    problem: str | None = None  # why it cannot be read (it can still be removed)

    def names(self) -> tuple[str, ...]:
        return tuple(n for n in (self.name, self.alias, self.root.name) if n)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "alias": self.alias, "revision": self.revision, "source": self.source,
                "quants": list(self.quants), "vision": list(self.vision), "files": self.files, "bytes": self.bytes,
                "path": str(self.root), "problem": self.problem}


def describe(root: Path) -> CachedBundle:
    """What the cached bundle folder ``root`` holds (never raises: an unreadable one says why in ``problem``)."""
    try:
        data = loads_json((root / MANIFEST).read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"{MANIFEST} is not a JSON object")
        manifest = Manifest.from_dict(data)
    except (OSError, UnicodeDecodeError, ValueError, FaceLLMEdgeError) as exc:
        return CachedBundle(name=root.name, root=root, problem=" ".join(str(exc).split()) or type(exc).__name__)
    pulled = data.get(PULLED) if isinstance(data.get(PULLED), dict) else {}
    entries = list(Bundle(root=root, manifest=manifest).entries())
    vision = (*manifest.vision, *(("mmproj",) if manifest.mmproj is not None else ()))
    return CachedBundle(
        name=str(pulled.get("repo") or root.name), root=root, alias=pulled.get("alias"),
        revision=pulled.get("revision"), source=str(pulled.get("source") or "exported"), quants=tuple(manifest.llm),
        vision=vision, files=len(entries) + 1, bytes=sum(e.bytes for e in entries),
    )


def cached_bundles() -> list[CachedBundle]:
    """Every bundle folder in the cache, by name (temporaries of unfinished writes are not bundles)."""
    root = bundles_dir()
    if not root.is_dir():
        return []
    found = [describe(p) for p in sorted(root.iterdir())
             if not p.name.startswith(".") and p.is_dir() and not p.is_symlink()]
    return sorted(found, key=lambda b: b.name.lower())


def find_cached(spec: str) -> CachedBundle | None:
    """The cached bundle called ``spec``: its repo id, its alias or its folder name (no network)."""
    found = cached_bundles()
    for same in (lambda a, b: a == b, lambda a, b: a.casefold() == b.casefold()):
        hit = next((b for b in found if any(same(n, spec) for n in b.names())), None)
        if hit is not None:
            return hit
    return None


def remove_cached(spec: str) -> CachedBundle:
    """Remove the cached bundle ``spec`` (and its repo in the hub-layout cache). Only folders of our cache."""
    entry = find_cached(spec)
    if entry is None:
        raise InputError(f"no bundle named {spec} in the cache {bundles_dir()} (see `facellm-edge list`); rm "
                         "removes cached bundles only, never a folder of yours")
    trash = entry.root.parent / f".{entry.root.name}.rm-{os.getpid()}"
    try:
        os.replace(entry.root, trash)  # gone from the cache at once; then deleted
        shutil.rmtree(trash)
        if entry.revision is not None:
            drop_hub_repo(entry.name)
    except OSError as exc:
        raise OutputError(f"cannot remove {entry.root}: {exc.strerror or exc}") from exc
    return entry


def interrupted_download(spec: str) -> Path | None:
    """The hub-layout folder of repo ``spec`` (OWNER/NAME) when no cached bundle was made from it: what a pull
    that failed (a file that did not verify, a lost connection) or was stopped leaves in this cache."""
    return _leftover(spec, _cached_names())


def interrupted_downloads() -> dict[str, int]:
    """Every :func:`interrupted_download` in the cache: repo id -> the bytes it holds (the cache's bundles are read
    once, not once per downloaded repo)."""
    root = hub_dir()
    if not root.is_dir():
        return {}
    ids = [p.name.removeprefix("models--").replace("--", "/", 1) for p in sorted(root.iterdir())
           if p.name.startswith("models--") and "--" in p.name.removeprefix("models--")]
    names = _cached_names()
    return {i: _tree_bytes(f) for i in ids if (f := _leftover(i, names)) is not None}


def _cached_names() -> set[str]:
    """Every name a cached bundle answers to (:func:`find_cached`'s match, case-folded)."""
    return {n.casefold() for b in cached_bundles() for n in b.names()}


def _leftover(spec: str, cached_names: set[str]) -> Path | None:
    if spec.count("/") != 1 or spec.casefold() in cached_names:
        return None
    folder = repo_folder(spec)
    return folder if folder.is_dir() and not folder.is_symlink() else None


def _tree_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def remove_interrupted(spec: str) -> int:
    """Delete :func:`interrupted_download` of ``spec``; returns the bytes it held (0: there was none)."""
    folder = interrupted_download(spec)
    if folder is None:
        return 0
    size = _tree_bytes(folder)
    try:
        shutil.rmtree(folder)
    except OSError as exc:
        raise OutputError(f"cannot remove {folder}: {exc.strerror or exc}") from exc
    return size


def drop_hub_repo(repo_id: str) -> None:
    """Delete every revision of ``repo_id`` from the hub-layout cache (huggingface_hub's own delete strategy)."""
    folder = repo_folder(repo_id)
    if not folder.is_dir():
        return
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(hub_dir())
    for repo in info.repos:
        if repo.repo_id == repo_id and repo.repo_type == "model" and repo.revisions:
            info.delete_revisions(*(r.commit_hash for r in repo.revisions)).execute()
    if folder.is_dir():  # a repo without a complete revision (an interrupted download): nothing else refers to it
        shutil.rmtree(folder)


def write_local_repo(repo_id: str, manifest_bytes: bytes, files: Bundle) -> str:
    """Write ``manifest_bytes`` and the files ``files`` lists (read from its root, a local bundle folder) into the
    hub-layout cache as ``repo_id``; returns the revision (the sha1 of the manifest, in place of a commit hash).
    Blobs are named by their sha256; a blob already there is not copied again."""
    repo = repo_folder(repo_id)
    revision = hashlib.sha1(manifest_bytes).hexdigest()
    snapshot = repo / "snapshots" / revision
    items: list[tuple[str, str, bytes | Path]] = [(MANIFEST, sha256_bytes(manifest_bytes), manifest_bytes)]
    items += [(e.path, e.sha256, files.path(e)) for e in files.entries()]
    rel = MANIFEST
    try:
        for rel, digest, content in items:
            blob = repo / "blobs" / digest
            if not blob.is_file():  # blobs are named by content: one already there is this file
                blob.parent.mkdir(parents=True, exist_ok=True)
                with atomic_file(blob) as tmp:
                    if isinstance(content, bytes):
                        tmp.write_bytes(content)
                    elif not content.is_file():
                        raise BundleError(f"{files.root} lacks {rel}, which its {MANIFEST} lists; re-export the "
                                          "bundle")
                    else:
                        shutil.copyfile(content, tmp)
            link = snapshot / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            target = os.path.relpath(blob, link.parent)
            if os.path.islink(link) and os.readlink(link) == target:
                continue
            if os.path.lexists(link):
                os.unlink(link)
            os.symlink(target, link)
        (repo / "refs").mkdir(exist_ok=True)
        atomic_write_text(repo / "refs" / "main", revision)
    except OSError as exc:
        if exc.filename is not None and not str(exc.filename).startswith(str(repo)):  # the source's file
            raise InputError(f"cannot read {rel} of {files.root}: {exc.strerror or exc}") from exc
        raise OutputError(f"cannot write the cache {repo}: {exc.strerror or exc}") from exc
    return revision


def drop_from_snapshot(snapshot: Path, rels: list[str]) -> None:
    """Remove damaged files from a snapshot (the link and the blob it points to), so that a new pull fetches them."""
    for rel in rels:
        link = snapshot / rel
        blob = Path(os.path.realpath(link))
        for p in (link, blob):
            try:
                p.unlink()
            except OSError:
                pass


def write_view(repo_id: str, snapshot: Bundle, pulled: dict[str, Any]) -> Path:
    """The runnable bundle of ``repo_id``: ``snapshot``'s manifest (already narrowed to the files pulled) with the
    ``pulled`` record, and those files hard-linked from the snapshot. Replaces the previous one atomically."""
    dest = view_dir(repo_id)
    copied = 0
    with atomic_directory(dest, force=True, kind=BUNDLE) as tmp:
        for e in snapshot.entries():
            src = Path(os.path.realpath(snapshot.path(e)))
            dst = tmp / e.path
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:  # no hard links here (or across these folders): a copy
                shutil.copyfile(src, dst)
                copied += e.bytes
        doc = loads_json(snapshot.manifest.to_json())
        doc[PULLED] = pulled
        (tmp / MANIFEST).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    if copied:
        log.warning("%s: %.0f MB copied out of the download cache %s (no hard links on this file system)",
                    dest, copied / 2**20, hub_dir())
    return dest
