"""``push BUNDLE REPO``: publish a verified bundle on the hub with its model card, in one commit.

What is uploaded is exactly :func:`upload_plan`: ``README.md`` (the card), ``manifest.json`` and every file the
manifest lists — never anything else that lies in the folder. A pulled bundle's local ``pulled`` record is left out
of the published manifest.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from facellm_edge.bundle import MANIFEST, Bundle, load_bundle
from facellm_edge.errors import UsageError
from facellm_edge.hub import remote
from facellm_edge.hub.cache import PULLED
from facellm_edge.hub.card import CARD, public_source, read_bench_results, render_card
from facellm_edge.hub.sources import is_hub_id
from facellm_edge.io import loads_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PushConfig:
    bundle: Path
    repo: str  # owner/name on the hub
    results: Path | None = None  # a `facellm-edge bench` results.json: the card's measured speed
    private: bool = False
    revision: str | None = None  # a branch (created if needed); default main
    message: str | None = None

    def __post_init__(self) -> None:
        if "/" not in self.repo or not is_hub_id(self.repo):
            raise UsageError(f"push needs a hub repo id OWNER/NAME, got {self.repo!r}")


@dataclass(frozen=True)
class Upload:
    """One push: the card text and the files in upload order (path in the repo, local file or bytes)."""

    card: str
    files: list[tuple[str, Path | bytes]]

    def paths(self) -> list[str]:
        return [rel for rel, _ in self.files]

    def bytes(self) -> int:
        return sum(len(src) if isinstance(src, bytes) else src.stat().st_size for _, src in self.files)


def upload_plan(config: PushConfig) -> Upload:
    """Load the bundle with every hash checked (a damaged bundle is never published) and list what goes up."""
    bundle = load_bundle(config.bundle, check_hashes=True)
    results = read_bench_results(config.results) if config.results is not None else None
    card = render_card(bundle.manifest, config.repo, results)
    return Upload(card=card, files=[(CARD, card.encode("utf-8")), (MANIFEST, _published_manifest(bundle)),
                                    *((e.path, bundle.path(e)) for e in bundle.entries())])


def _published_manifest(bundle: Bundle) -> bytes:
    """The manifest as published: the file's own bytes, less the local ``pulled`` record of a pulled bundle and
    this machine's paths in ``source`` (:func:`~facellm_edge.hub.card.public_source`)."""
    raw = (bundle.root / MANIFEST).read_bytes()
    doc = loads_json(raw)
    source = doc.get("source") if isinstance(doc.get("source"), dict) else {}
    if PULLED not in doc and public_source(source) == source:
        return raw
    doc.pop(PULLED, None)
    doc["source"] = public_source(source)
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


def push(config: PushConfig) -> tuple[Upload, str]:
    """Publish the bundle; returns the upload and the commit URL."""
    plan = upload_plan(config)
    message = config.message or f"facellm-edge bundle: {', '.join(plan.paths()[2:])}"
    log.info("pushing %d files (%.1f MB) to %s", len(plan.files), plan.bytes() / 2**20, config.repo)
    url = remote.upload(config.repo, plan.files, private=config.private, revision=config.revision, message=message)
    return plan, url
