"""Moved: the Python API lives in :mod:`facellm_edge.runtime.pipeline` (``from facellm_edge import FaceLLM``).

Kept so that ``from facellm_edge.pipeline import FaceLLM, RuntimeConfig`` (the 0.1 README's import) still works.
"""

from facellm_edge.runtime.pipeline import *  # noqa: F401,F403
from facellm_edge.runtime.pipeline import __all__  # noqa: F401
