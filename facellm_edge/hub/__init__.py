"""Bundles as models you pull: ``pull`` / ``list`` / ``rm`` / ``push`` and the names ``--bundle`` accepts.

* :mod:`~facellm_edge.hub.sources` — what a source names (hub repo id, huggingface.co URL, local folder, file:// URL).
* :mod:`~facellm_edge.hub.remote` — every huggingface_hub call (manifest, selective snapshot, upload) and its errors.
* :mod:`~facellm_edge.hub.cache` — the cache: hub layout under ``~/.cache/facellm-edge/hub``, runnable bundles under
  ``~/.cache/facellm-edge/bundles``; list, find, remove.
* :mod:`~facellm_edge.hub.pull` — choose the files of a configuration, fetch, verify, make runnable.
* :mod:`~facellm_edge.hub.card` / :mod:`~facellm_edge.hub.push` — the model card and the upload.

Nothing here imports torch; huggingface_hub is imported when a function needs it. See ``docs/bundles.md``.
"""

from facellm_edge.hub.cache import CachedBundle, bundles_dir, cached_bundles, find_cached, hub_dir, remove_cached
from facellm_edge.hub.pull import PullConfig, pull

__all__ = ["CachedBundle", "PullConfig", "bundles_dir", "cached_bundles", "find_cached", "hub_dir", "pull",
           "remove_cached"]
