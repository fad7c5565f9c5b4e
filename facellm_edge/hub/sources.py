"""What ``pull SOURCE`` (and ``--bundle NAME``) names: a hub repo id, a huggingface.co URL, a local folder in hub
layout (a bundle folder: ``manifest.json`` + the files it lists) or a ``file://`` URL of one.

Nothing here touches the network or the cache.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from facellm_edge.bundle import is_local_path  # the --bundle rule: what can only be a local path
from facellm_edge.errors import InputError, UsageError

# Local folders are cached as this owner's repos (``local/<folder name>``): one cache layout for every source.
LOCAL_OWNER = "local"
_HUB_HOSTS = ("huggingface.co", "hf.co", "www.huggingface.co")
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")
ALIAS = re.compile(r"^[A-Za-z0-9][\w.-]{0,63}$")


@dataclass(frozen=True)
class Source:
    """Where a pull reads from: the hub (``folder`` None) or a local folder; ``repo_id`` is its name in the cache."""

    repo_id: str
    folder: Path | None = None
    revision: str | None = None

    @property
    def is_local(self) -> bool:
        return self.folder is not None

    def __str__(self) -> str:
        return str(self.folder) if self.folder is not None else self.repo_id


def is_hub_id(spec: str) -> bool:
    """``spec`` is a plausible hub repo id (``owner/name``) that cannot be a local path the user meant: nothing of
    that name exists here, it has no path syntax, and its ``owner`` is not a local folder."""
    return (not os.path.lexists(Path(spec).expanduser()) and not is_local_path(spec)
            and not os.path.lexists(spec.split("/", 1)[0]))


def check_alias(alias: str) -> str:
    if not ALIAS.match(alias):
        raise UsageError(f"--as {alias!r}: an alias is one word of letters, digits, '_', '.' or '-' (no '/'), "
                         "at most 64 characters")
    return alias


def local_repo_id(folder: Path) -> str:
    """The cache name of a local folder: ``local/<folder name>`` (characters the hub refuses become '-')."""
    name = _NAME_CHARS.sub("-", Path(os.path.abspath(folder)).name)
    name = re.sub(r"\.{2,}", ".", re.sub(r"-{2,}", "-", name)).strip(".-")[:96].rstrip(".-")
    return f"{LOCAL_OWNER}/{name or 'bundle'}"


def parse_source(spec: str, revision: str | None = None) -> Source:
    """A hub repo id, ``https://huggingface.co/OWNER/NAME[/tree/REV]``, a local bundle folder or ``file://`` URL."""
    url = urlparse(spec)
    if url.scheme == "file":
        if url.netloc not in ("", "localhost"):
            raise UsageError(f"{spec}: only file:// URLs of this machine are supported (file:///path/to/bundle)")
        return _local(Path(url2pathname(unquote(url.path))), spec, revision)
    if url.scheme in ("http", "https"):
        return _hub_url(spec, url.netloc, url.path, revision)
    if url.scheme and len(url.scheme) > 1:  # "c:" is a Windows drive, not a scheme
        raise UsageError(f"{spec}: pull takes a hub repo id (owner/name), a huggingface.co URL, a local bundle "
                         "folder or a file:// URL")
    path = Path(spec).expanduser()
    if os.path.lexists(path):
        return _local(path, spec, revision)
    if is_hub_id(spec):
        return Source(repo_id=spec, revision=revision)
    if is_local_path(spec):
        raise InputError(f"no bundle folder at {spec} (and it is not a hub repo id like owner/name)")
    raise InputError(f"no bundle at {spec} ('{spec.split('/', 1)[0]}' is a local folder, so {spec} was not looked "
                     "up as a hub repo); check the path")


def _local(folder: Path, spec: str, revision: str | None) -> Source:
    if revision is not None:
        raise UsageError(f"--revision applies to hub repos only; {spec} is a local folder")
    if not folder.is_dir():
        raise InputError(f"{spec} is not a folder: pull takes a bundle folder (manifest.json + its files)")
    return Source(repo_id=local_repo_id(folder), folder=folder)


def _hub_url(spec: str, host: str, path: str, revision: str | None) -> Source:
    parts = [p for p in path.split("/") if p]
    if host.lower() not in _HUB_HOSTS or len(parts) < 2 or parts[0] in ("datasets", "spaces"):
        raise UsageError(f"{spec}: only huggingface.co model URLs (https://huggingface.co/OWNER/NAME) can be pulled")
    repo_id, rest = "/".join(parts[:2]), parts[2:]
    if rest[:1] == ["tree"] and len(rest) >= 2:
        url_rev = unquote("/".join(rest[1:]))
        if revision is not None and revision != url_rev:
            raise UsageError(f"{spec} names revision {url_rev!r}; --revision says {revision!r}")
        revision = url_rev
    elif rest:
        raise UsageError(f"{spec}: a repo URL is https://huggingface.co/OWNER/NAME[/tree/REVISION]")
    if is_local_path(repo_id):
        raise UsageError(f"{spec}: {repo_id} is not a valid hub repo id")
    return Source(repo_id=repo_id, revision=revision)
