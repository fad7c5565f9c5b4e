"""Every call into ``huggingface_hub``: the manifest download, the selective snapshot download and the upload, each
with its failures turned into one line that says what to do.

Downloads go to ``cache_dir`` (the hub layout under our cache, :func:`facellm_edge.hub.cache.hub_dir`) and obey
``HF_HUB_OFFLINE`` / ``local_files_only``: offline, huggingface_hub resolves ``refs/<revision>`` and the snapshot
folder from that cache without any request.
"""

from __future__ import annotations

import contextlib
import glob
import logging
from pathlib import Path
from typing import Iterator, Sequence

from facellm_edge.bundle import MANIFEST
from facellm_edge.errors import BundleError, OutputError

log = logging.getLogger(__name__)

LOGIN = "`hf auth login` (or set HF_TOKEN)"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def download_errors(repo_id: str, revision: str | None, cache_dir: Path) -> Iterator[None]:
    """huggingface_hub's download failures -> :class:`BundleError` (exit 3), one line."""
    from huggingface_hub import errors as hf

    at = f"{repo_id}@{revision}" if revision else repo_id
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its retry warnings would be lines at the user; the failure is said below
    try:
        yield
    except hf.LocalEntryNotFoundError as exc:  # offline (or the hub unreachable) and not in the cache
        raise BundleError(f"no bundle at {repo_id}: neither a local folder nor a downloadable hub repo (the hub "
                          f"cannot be reached or HF_HUB_OFFLINE is set, and {at} is not in the cache {cache_dir})"
                          ) from exc
    except hf.GatedRepoError as exc:
        raise BundleError(f"{repo_id} is gated: accept its terms on huggingface.co, then {LOGIN}") from exc
    except hf.RepositoryNotFoundError as exc:
        raise BundleError(f"no bundle at {repo_id}: neither a local folder nor a downloadable hub repo (no hub "
                          f"repo of that name; a private one needs {LOGIN})") from exc
    except hf.RevisionNotFoundError as exc:
        raise BundleError(f"{repo_id} has no revision {revision!r} (a branch, tag or commit of the repo)") from exc
    except hf.EntryNotFoundError as exc:
        raise BundleError(f"{at} is a hub repo but not a facellm-edge bundle: it has no {MANIFEST} (publish one "
                          "with `facellm-edge push BUNDLE REPO`)") from exc
    except (hf.HfHubHTTPError, OSError, ValueError) as exc:
        raise BundleError(f"cannot download {at}: {_first_line(exc)}") from exc
    finally:
        hub_log.setLevel(level)


def download_manifest(repo_id: str, revision: str | None, cache_dir: Path) -> Path:
    """``manifest.json`` of ``repo_id`` at ``revision`` (default: main), inside its snapshot folder
    (``.../snapshots/<commit>/manifest.json``: the folder name is the commit every other file is fetched at)."""
    from huggingface_hub import hf_hub_download

    with download_errors(repo_id, revision, cache_dir):
        return Path(hf_hub_download(repo_id=repo_id, filename=MANIFEST, revision=revision, cache_dir=cache_dir))


def allow_patterns(paths: Sequence[str]) -> list[str]:
    """Patterns that match exactly these repo paths (fnmatch's ``*?[`` escaped)."""
    return [glob.escape(p) for p in paths]


def download_files(repo_id: str, revision: str | None, paths: Sequence[str], cache_dir: Path, *,
                   local_files_only: bool = False) -> Path:
    """The snapshot folder holding ``paths`` of ``repo_id`` at ``revision`` (only those are downloaded)."""
    from huggingface_hub import snapshot_download

    with download_errors(repo_id, revision, cache_dir):
        return Path(snapshot_download(repo_id=repo_id, revision=revision, cache_dir=cache_dir,
                                      allow_patterns=allow_patterns(paths), local_files_only=local_files_only))


def upload(repo_id: str, files: Sequence[tuple[str, Path | bytes]], *, private: bool, revision: str | None,
           message: str) -> str:
    """Create ``repo_id`` if needed and commit ``files`` (path in the repo, local file or bytes) in one commit;
    returns the commit's URL. Needs the hub and a token with write access."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants
    from huggingface_hub import errors as hf

    if constants.HF_HUB_OFFLINE:
        raise OutputError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set, and publishing needs the hub")
    api = HfApi()
    try:
        api.create_repo(repo_id=repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id=repo_id, branch=revision, exist_ok=True)
        ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=src if isinstance(src, bytes) else str(src))
               for rel, src in files]
        info = api.create_commit(repo_id=repo_id, operations=ops, commit_message=message, revision=revision)
    except hf.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 401:
            raise OutputError(f"cannot push to {repo_id}: not logged in to the hub; run {LOGIN}") from exc
        if status == 403:
            raise OutputError(f"cannot push to {repo_id}: this token may not write there (a write token of "
                              f"{repo_id.split('/')[0]} is needed)") from exc
        raise OutputError(f"cannot push to {repo_id}: {_first_line(exc)}") from exc
    except (OSError, ValueError) as exc:
        raise OutputError(f"cannot push to {repo_id}: {_first_line(exc)}") from exc
    return str(getattr(info, "commit_url", info))
