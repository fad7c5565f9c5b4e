"""``pull``: fetch the files one configuration of a published bundle needs, verify them, make them runnable.

1. read the source's ``manifest.json`` (hub: ``hf_hub_download`` of that one file, which pins the commit);
2. choose the files: the LLM quants (``--quant``), the vision encoders (``--vision``: ONNX precisions and/or
   ``mmproj``), by default the ones the runtime prefers (:meth:`Bundle.llm_file` / :meth:`Bundle.vision_file`);
3. fetch exactly those (``snapshot_download(allow_patterns=...)`` at that commit) into the hub-layout cache; a local
   folder is first written into the same cache (:func:`~facellm_edge.hub.cache.write_local_repo`) and then resolved
   by ``snapshot_download(local_files_only=True)``;
4. check every file's size and sha256 against the manifest (a damaged file is removed from the cache and the pull
   fails);
5. write the runnable bundle (:func:`~facellm_edge.hub.cache.write_view`): what this pull fetched plus what earlier
   pulls of the same revision fetched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

from facellm_edge.bundle import MANIFEST, Bundle, FileEntry, Manifest, resolve_inside
from facellm_edge.errors import BundleError, UsageError
from facellm_edge.hub import cache, remote
from facellm_edge.hub.sources import Source, check_alias, parse_source
from facellm_edge.io import loads_json

log = logging.getLogger(__name__)

ALL = "all"  # --quant all / --vision all: every file of that kind
MMPROJ = "mmproj"  # --vision mmproj: llama.cpp's projector GGUF (manifest.mmproj), for llama.cpp / ollama peers


@dataclass(frozen=True)
class PullConfig:
    """What to pull: ``source`` (hub repo id, huggingface.co URL, local bundle folder or file:// URL) and which of
    its files. Empty ``quants`` / ``vision``: the runtime's preferred one of each."""

    source: str
    quants: tuple[str, ...] = ()
    vision: tuple[str, ...] = ()  # ONNX precisions (int8, fp32) and/or "mmproj"; "all"
    revision: str | None = None  # hub only: branch, tag or commit (default: main)
    alias: str | None = None  # a short name for --bundle

    def __post_init__(self) -> None:
        if self.alias is not None:
            check_alias(self.alias)
        for kind, keys in (("--quant", self.quants), ("--vision", self.vision)):
            if any(not k or k != k.strip() for k in keys):
                raise UsageError(f"{kind}: empty or padded name in {','.join(keys)!r}")


@dataclass(frozen=True)
class Selection:
    """The variants of a bundle a pull holds."""

    vision: tuple[str, ...]
    llm: tuple[str, ...]
    mmproj: bool = False

    def narrow(self, manifest: Manifest) -> Manifest:
        """``manifest`` listing only these variants (the rest of it unchanged)."""
        return replace(manifest, vision={k: e for k, e in manifest.vision.items() if k in self.vision},
                       llm={k: e for k, e in manifest.llm.items() if k in self.llm},
                       mmproj=manifest.mmproj if self.mmproj else None)

    def union(self, other: "Selection") -> "Selection":
        return Selection(vision=_merge(self.vision, other.vision), llm=_merge(self.llm, other.llm),
                         mmproj=self.mmproj or other.mmproj)

    def label(self) -> str:
        vision = [*self.vision, *([MMPROJ] if self.mmproj else [])]
        return f"llm {','.join(self.llm)}, vision {','.join(vision) or '-'}"


def _merge(a: tuple[str, ...], b: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys((*a, *b)))


def select(manifest: Manifest, quants: Sequence[str], vision: Sequence[str], where: str) -> Selection:
    """The variants ``--quant`` / ``--vision`` ask for, each checked against the manifest (one-line error naming
    what the bundle has)."""
    probe = Bundle(root=Path(where), manifest=manifest)  # its preference rules; no file is opened
    llm = _keys(tuple(quants), manifest.llm, lambda: probe.llm_file()[0], where, "LLM quant")
    onnx = tuple(v for v in vision if v != MMPROJ)
    if MMPROJ in vision and manifest.mmproj is None:
        raise BundleError(f"{where} has no mmproj file (export it with --vision mmproj)")
    mmproj = MMPROJ in vision or (ALL in vision and manifest.mmproj is not None)
    chosen = () if vision and not onnx else _keys(onnx, manifest.vision, lambda: probe.vision_file()[0], where,
                                                   "vision precision")
    return Selection(vision=chosen, llm=llm, mmproj=mmproj)


def _keys(wanted: tuple[str, ...], table: dict[str, FileEntry], preferred: Callable[[], str], where: str,
          kind: str) -> tuple[str, ...]:
    if not wanted:
        return (preferred(),)
    if ALL in wanted:
        if not table:
            raise BundleError(f"{where} has no {kind} file")
        return tuple(table)
    missing = [k for k in wanted if k not in table]
    if missing:
        raise BundleError(f"{where} has no {kind} {missing[0]!r}; it has: {', '.join(sorted(table)) or 'none'}")
    return tuple(dict.fromkeys(wanted))


def parse_manifest(data: bytes, where: str) -> Manifest:
    """The manifest of a bundle to pull (untrusted: schema-checked, paths relative and normalised)."""
    try:
        doc = loads_json(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BundleError(f"{where}: {MANIFEST} is not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise BundleError(f"{where}: {MANIFEST} is not a JSON object")
    try:
        return Manifest.from_dict(doc)
    except BundleError as exc:
        raise BundleError(f"{where}: {exc}") from exc


def pull(config: PullConfig) -> cache.CachedBundle:
    """Pull ``config.source`` into the cache; returns the runnable bundle (``.root`` is the folder to load)."""
    source = parse_source(config.source, config.revision)
    if source.is_local:
        source = _local_name(source)
    if config.alias is not None:
        taken = cache.find_cached(config.alias)
        if taken is not None and taken.name != source.repo_id:
            raise UsageError(f"the alias {config.alias!r} is taken by {taken.name}; choose another, or "
                             f"`facellm-edge rm {taken.name}` first")
    snapshot, manifest, revision, selection = (_fetch_local if source.is_local else _fetch_hub)(source, config)
    previous = cache.describe(cache.view_dir(source.repo_id)) if cache.view_dir(source.repo_id).is_dir() else None
    where_from = str(source.folder.resolve()) if source.folder is not None else "hub"
    same = previous is not None and previous.revision == revision and previous.source == where_from
    if same:
        selection = selection.union(_still_there(previous, manifest, snapshot))
    bundle = Bundle(root=snapshot, manifest=selection.narrow(manifest))
    _verify(bundle, source)
    alias = config.alias or (previous.alias if same and previous is not None else None)
    record = {"repo": source.repo_id, "revision": revision, "source": where_from, "alias": alias,
              "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    root = cache.write_view(source.repo_id, bundle, record)
    log.info("pulled %s@%s (%s) -> %s", source.repo_id, revision[:12], selection.label(), root)
    return cache.describe(root)


def _local_name(source: Source) -> Source:
    """``local/<folder name>``, or ``local/<folder name>-2``, ``-3``, ... when another folder of that name was
    pulled before: two USB sticks that both hold ``bundle/`` are two cached bundles, not one replacing the other.
    Pulling the same folder again updates its own entry."""
    where = str(source.folder.resolve())
    for n in range(1, 100):
        name = source.repo_id if n == 1 else f"{source.repo_id}-{n}"
        view = cache.view_dir(name)
        if not view.is_dir() or cache.describe(view).source == where:
            if n > 1:
                log.info("%s in the cache came from another folder; caching %s as %s", source.repo_id, where, name)
            return replace(source, repo_id=name)
    raise UsageError(f"{source.repo_id}: 99 other folders of this name are in the cache; `facellm-edge rm` some")


def _paths(bundle: Bundle) -> list[str]:
    return [MANIFEST, *(e.path for e in bundle.entries())]


def _fetch_hub(source: Source, config: PullConfig) -> tuple[Path, Manifest, str, Selection]:
    hub = cache.hub_dir()
    manifest_path = remote.download_manifest(source.repo_id, source.revision, hub)
    manifest = parse_manifest(manifest_path.read_bytes(), source.repo_id)
    commit = manifest_path.parent.name  # snapshots/<commit>/manifest.json: every file comes from this commit
    selection = select(manifest, config.quants, config.vision, source.repo_id)
    paths = _paths(Bundle(root=manifest_path.parent, manifest=selection.narrow(manifest)))
    log.info("pulling %s@%s: %s", source.repo_id, commit[:12], ", ".join(paths))
    snapshot = remote.download_files(source.repo_id, commit, paths, hub)
    return snapshot, manifest, commit, selection


def _fetch_local(source: Source, config: PullConfig) -> tuple[Path, Manifest, str, Selection]:
    assert source.folder is not None
    where = str(source.folder)
    mpath = resolve_inside(source.folder, MANIFEST)
    if mpath is None:
        raise BundleError(f"{where} is damaged: its {MANIFEST} leads outside the folder")
    if not mpath.is_file():
        raise BundleError(f"{where} is not a bundle: no {MANIFEST} (make one with `facellm-edge export`)")
    data = mpath.read_bytes()
    manifest = parse_manifest(data, where)
    selection = select(manifest, config.quants, config.vision, where)
    files = Bundle(root=source.folder, manifest=selection.narrow(manifest))
    files.check_paths()  # every listed file inside the folder, before anything is copied
    revision = cache.write_local_repo(source.repo_id, data, files)
    snapshot = remote.download_files(source.repo_id, revision, _paths(files), cache.hub_dir(),
                                     local_files_only=True)
    return snapshot, manifest, revision, selection


def _still_there(previous: cache.CachedBundle, manifest: Manifest, snapshot: Path) -> Selection:
    """What an earlier pull of the same revision fetched and the snapshot still holds."""
    def there(entries: list[FileEntry]) -> bool:
        paths = [resolve_inside(snapshot, e.path) for e in entries]
        return all(p is not None and p.is_file() for p in paths)

    def entries_of(kind: str, key: str) -> list[FileEntry]:
        only = Selection(vision=(key,) if kind == "vision" else (), llm=(key,) if kind == "llm" else (),
                         mmproj=kind == MMPROJ)
        return list(Bundle(root=snapshot, manifest=only.narrow(manifest)).entries())

    vision = tuple(k for k in previous.vision if k in manifest.vision and there(entries_of("vision", k)))
    llm = tuple(k for k in previous.quants if k in manifest.llm and there(entries_of("llm", k)))
    mmproj = MMPROJ in previous.vision and manifest.mmproj is not None and there(entries_of(MMPROJ, MMPROJ))
    return Selection(vision=vision, llm=llm, mmproj=mmproj)


def _verify(bundle: Bundle, source: Source) -> None:
    """Every file's size and sha256 against the manifest; damaged files leave the cache and the pull fails."""
    problems = bundle.verify_hashes()
    if not problems:
        return
    bad = [e.path for e in bundle.entries() if any(p.startswith(f"{e.path}: ") for p in problems)]
    cache.drop_from_snapshot(bundle.root, bad)
    if source.is_local and not cache.view_dir(source.repo_id).is_dir():
        # the good files are copies of the folder's, kept by no runnable bundle (list and rm do not see them): a
        # failed first pull of a folder leaves nothing behind
        cache.drop_hub_repo(source.repo_id)
    fix = "re-export it" if source.is_local else "pull again; if it persists the published bundle is damaged"
    raise BundleError(f"{source} does not match its {MANIFEST}: {'; '.join(problems)} (removed from the cache; "
                      f"{fix})")
