"""ONNX Runtime, imported one way: with its telemetry off.

onnxruntime's official builds (1.32 here) carry Microsoft's 1DS telemetry. On ``import onnxruntime`` it creates
``$XDG_CACHE_HOME/Microsoft/DeveloperTools/.onnxruntime/`` (``~/.cache/...`` without XDG_CACHE_HOME) holding
``deviceid`` (a persistent random device identifier) and ``onnxruntime.db`` (an SQLite queue of events to upload:
OS, CPU, the Python executable's path, session and model details). Faces are biometric and this tool promises that
nothing leaves the device or accumulates, so:

* ``ORT_DISABLE_TELEMETRY=1`` is set before onnxruntime is imported; onnxruntime reads it once, at import, and then
  creates neither the uploader, the events nor the device id. Setting it later does nothing (measured: the folder
  appears on a bare ``import onnxruntime``, with the variable set after the import, and after
  ``disable_telemetry_events()``);
* ``onnxruntime.disable_telemetry_events()`` is called too, for a process that imported onnxruntime before us.

Every ONNX Runtime import of this package goes through :func:`onnxruntime_module`. ONNX Runtime is not a base
dependency (it comes with the runtime flavour, ``facellm-edge[cpu]`` or ``[gpu]``, ...: see
:mod:`facellm_edge.doctor.flavours`): without it, or with two flavours overwriting each other, the error or the
warning says which one to install.
"""

from __future__ import annotations

import logging
import os
import sys
from types import ModuleType

log = logging.getLogger(__name__)

TELEMETRY_ENV = "ORT_DISABLE_TELEMETRY"


def disable_telemetry() -> None:
    """Turn ONNX Runtime's telemetry off for this process (fully only if onnxruntime is not imported yet)."""
    os.environ[TELEMETRY_ENV] = "1"
    ort = sys.modules.get("onnxruntime")
    if ort is not None and hasattr(ort, "disable_telemetry_events"):
        ort.disable_telemetry_events()


def onnxruntime_module(extra: str | None = None, module: str = "onnxruntime") -> ModuleType:
    """Import ``module`` (``onnxruntime`` or one of its submodules) with telemetry off.

    No ONNX Runtime installed (or a broken one) raises
    :class:`~facellm_edge.doctor.flavours.MissingRuntimeError` (exit code 7) naming the runtime flavours to install;
    two flavours installed over each other log a warning once. With ``extra``, a missing *submodule* raises
    :class:`~facellm_edge.errors.MissingExtraError` naming that extra (see ``errors.require``)."""
    import importlib

    from facellm_edge.doctor.flavours import MissingRuntimeError, warn_clashes_once

    if "onnxruntime" in sys.modules and os.environ.get(TELEMETRY_ENV) != "1":
        log.debug("onnxruntime was imported before facellm_edge could turn its telemetry off; only non-essential "
                  "events are disabled")
    disable_telemetry()
    try:
        importlib.import_module("onnxruntime")
    except ImportError as exc:
        raise MissingRuntimeError("onnxruntime", exc) from exc
    warn_clashes_once()
    if extra is not None:
        from facellm_edge.errors import require

        mod = require(module, extra)
    else:
        mod = importlib.import_module(module)
    disable_telemetry()  # now that onnxruntime is imported: its runtime switch as well
    return mod
