"""A bundle on disk: loading it (paths confined to the folder, hashes checked), recognising our own bundles, and
resolving what ``--bundle`` names (a local folder, or a hub repo id)."""

from __future__ import annotations

import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from facellm_edge.bundle.manifest import EXTERNAL_DATA, MANIFEST, FileEntry, Manifest, ManifestError
from facellm_edge.errors import BundleError
from facellm_edge.io import OutputKind, read_json_object, sha256_file
from facellm_edge.typed import check_value
from facellm_edge.io import loads_json

log = logging.getLogger(__name__)



def file_entry(root: Path, path: Path, **extra: Any) -> FileEntry:
    """Describe ``path`` (inside ``root``) for the manifest."""
    rel = path.relative_to(root).as_posix()
    return FileEntry(path=rel, bytes=path.stat().st_size, sha256=sha256_file(path), extra=dict(extra))


def _hub_blobs(real_root: Path) -> Path | None:
    """The ``blobs`` folder of a Hugging Face cache snapshot (``models--o--n/snapshots/<rev>``), whose files are
    symlinks into it: the one place outside the bundle folder a bundle's files may live."""
    repo = real_root.parent.parent
    if real_root.parent.name == "snapshots" and repo.name.startswith("models--") and (repo / "blobs").is_dir():
        return repo / "blobs"
    return None


def resolve_inside(root: Path, rel: str) -> Path | None:
    """``root / rel`` with every symlink followed, or None when it leads outside ``root`` (or, for a bundle in the
    Hugging Face cache, outside the snapshot and its repo's ``blobs``).

    Nothing outside is ever ``lstat``-ed or read as a link: a link pointing out is rejected from its target text.
    A result inside ``root`` keeps ``root``'s spelling.
    """
    real_root = Path(os.path.realpath(root))
    bases = [b for b in (real_root, _hub_blobs(real_root)) if b is not None]

    def inside(p: Path) -> bool:
        return any(p == b or b in p.parents for b in bases)

    def on_the_way(p: Path) -> bool:  # inside a base, or a folder above one (a link may climb up and down again)
        return inside(p) or any(p in b.parents for b in bases)

    cur, parts, hops = real_root, list(PurePosixPath(rel).parts), 0
    while parts:
        part = parts.pop(0)
        if part in ("", "."):
            continue
        nxt = cur.parent if part == ".." else cur / part
        if not on_the_way(nxt):
            return None
        if part == "..":
            cur = nxt
            continue
        try:
            st = os.lstat(nxt)
        except OSError:  # missing: what follows is checked lexically; verify_hashes reports it missing
            if ".." in parts:
                return None
            cur = nxt.joinpath(*parts)
            break
        if not stat.S_ISLNK(st.st_mode):
            cur = nxt
            continue
        hops += 1
        target = os.readlink(nxt)
        if hops > 40:
            return None
        if os.path.isabs(target):  # resolved again from "/": every step must stay on the way to a base
            cur, parts = Path("/"), [*PurePosixPath(target).parts[1:], *parts]
        else:
            parts = [*PurePosixPath(target).parts, *parts]
    if not inside(cur):
        return None
    return Path(root) / cur.relative_to(real_root) if real_root == cur or real_root in cur.parents else cur


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: Manifest

    def path(self, entry: FileEntry) -> Path:
        """Where ``entry`` is, inside the bundle (BundleError if the manifest or a symlink points outside)."""
        p = resolve_inside(self.root, entry.path)
        if p is None:
            raise BundleError(f"bundle {self.root} is damaged: {entry.path} leads outside the bundle; re-export it")
        return p

    def vision_file(self, precision: str | None = None) -> tuple[str, Path]:
        if not self.manifest.vision and self.manifest.mmproj is not None:  # export --vision mmproj alone
            raise BundleError(f"bundle {self.root} has only llama.cpp's mmproj vision file (for llama.cpp / ollama); "
                              "the runtime needs an ONNX encoder: re-export it with --vision int8 (or fp32)")
        return self._pick(self.manifest.vision, precision, ("int8", "fp32"), "vision")

    def llm_file(self, quant: str | None = None) -> tuple[str, Path]:
        prefer = ("q4_0", "q4_k_m", "q8_0", "bf16", "f16", "f32")
        return self._pick(self.manifest.llm, quant, prefer, "llm")

    def _pick(self, table: dict[str, FileEntry], want: str | None, prefer: tuple[str, ...], kind: str):
        if not table:
            raise BundleError(f"bundle {self.root} has no {kind} file; re-export it")
        if want is not None:
            if want not in table:
                raise BundleError(
                    f"bundle {self.root} has no {kind} precision '{want}'; it has: {', '.join(sorted(table))}"
                )
            return want, self.path(table[want])
        for p in prefer:
            if p in table:
                return p, self.path(table[p])
        key = sorted(table)[0]
        return key, self.path(table[key])

    def entries(self) -> Iterator[FileEntry]:
        for e in self.manifest.vision.values():
            yield e
            # external weight files of large ONNX graphs
            yield from check_value(e.extra.get("external_data", []), EXTERNAL_DATA)
        yield from self.manifest.llm.values()
        if self.manifest.mmproj is not None:
            yield self.manifest.mmproj

    def check_paths(self) -> None:
        """Every listed file must stay inside the bundle (BundleError otherwise); nothing outside is touched."""
        for e in self.entries():
            self.path(e)

    def verify_hashes(self) -> list[str]:
        """Return a list of problems (missing file, size or sha256 mismatch); empty when intact."""
        problems = []
        for e in self.entries():
            p = self.path(e)
            if not p.is_file():
                problems.append(f"{e.path}: missing")
            elif p.stat().st_size != e.bytes:
                problems.append(f"{e.path}: size {p.stat().st_size} != {e.bytes}")
            elif sha256_file(p) != e.sha256:
                problems.append(f"{e.path}: sha256 mismatch")
        return problems


def load_bundle(root: str | os.PathLike[str], *, check_hashes: bool = True) -> Bundle:
    """Load and validate a bundle directory. Raises :class:`BundleError` with a one-line message."""
    root = Path(root)
    try:
        return _load_bundle(root, check_hashes)
    except PermissionError as exc:
        where = f" ({exc.filename})" if exc.filename and Path(exc.filename) != root else ""
        raise BundleError(f"cannot read bundle {root}{where}: permission denied; run as a user who may read it, "
                          "or fix its permissions") from exc


def _load_bundle(root: Path, check_hashes: bool) -> Bundle:
    if not root.exists():
        raise BundleError(f"bundle not found: {root} (create one with `facellm-edge export`)")
    mpath = resolve_inside(root, MANIFEST)
    if mpath is None:
        raise BundleError(f"bundle {root} is damaged: {MANIFEST} leads outside the bundle; re-export it")
    if not mpath.is_file():
        raise BundleError(f"{root} is not a bundle: no {MANIFEST} (create one with `facellm-edge export`)")
    data = read_json_object(mpath, BundleError, "re-export the bundle")
    try:
        bundle = Bundle(root=root, manifest=Manifest.from_dict(data))
    except ManifestError as exc:
        raise BundleError(f"bundle {root} is damaged: {exc}") from exc
    bundle.check_paths()
    if check_hashes:
        problems = bundle.verify_hashes()
        if problems:
            raise BundleError(f"bundle {root} is damaged: {'; '.join(problems)}; re-export it")
    return bundle


def bundle_files(root: Path) -> set[str] | None:
    """The files of the bundle at ``root`` (manifest + every listed file), or None when it is not a bundle of ours:
    the ownership proof :func:`facellm_edge.io.check_replaceable` needs before ``export --force`` replaces it."""
    mpath = Path(root) / MANIFEST
    if mpath.is_symlink() or not mpath.is_file():
        return None
    try:
        data = loads_json(mpath.read_text(encoding="utf-8"))
        bundle = Bundle(root=Path(root), manifest=Manifest.from_dict(data))
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, BundleError):
        return None
    return {MANIFEST, *(e.path for e in bundle.entries())}


# What `export` writes: no marker file in the bundle, its manifest is the proof of ownership.
BUNDLE = OutputKind("a bundle", recognise=bundle_files, marker=False)


# Hub repo ids as the hub accepts them: owner/name, word characters, '.', '-' (no '--' or '..'), <= 96 each.
_HUB_ID = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}(?<![.-])$")


def is_local_path(spec: str) -> bool:
    """``spec`` can only be a local path: ``./x``, ``/x``, ``~/x``, ``a/b/c``, ``x\\y``, ``bundle`` ..."""
    seps = {os.sep, os.altsep} - {None, "/"}
    return (spec.startswith((".", "/", "~")) or spec.endswith("/") or any(sep in spec for sep in seps)
            or not _HUB_ID.match(spec))


def resolve_bundle_spec(spec: str) -> Path:
    """``--bundle`` -> a local folder, or a hub repo pulled into the cache (:func:`facellm_edge.hub.pull.pull`).

    Only a plausible hub id (``owner/name`` with nothing path-like about it and no local ``owner`` folder) is looked
    up on the hub; a missing local path is reported without any network access.
    """
    path = Path(spec).expanduser()
    if os.path.lexists(path) or is_local_path(spec):
        return path  # load_bundle says what is wrong with it, if anything
    owner = spec.split("/", 1)[0]
    if os.path.lexists(owner):  # `bundles/facellm` with a local `bundles/`: a mistyped path, not a hub id
        raise BundleError(f"no bundle at {spec} ('{owner}' is a local folder, so {spec} was not looked up as a hub "
                          f"repo); check the path, or create it with `facellm-edge export --out {spec}`")
    from facellm_edge.hub.pull import PullConfig, pull  # the one way bundles come from the hub (verified)

    return pull(PullConfig(source=spec)).root
