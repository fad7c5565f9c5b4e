"""One exception family for the whole toolkit.

Library code raises these with a message that names the fix; it never prints and never exits.
The CLI catches :class:`FaceLLMEdgeError` in one place, prints one line and exits with ``exit_code``.
"""

from __future__ import annotations


class FaceLLMEdgeError(Exception):
    """Base class: a user-facing error whose message is one line that says what to do."""

    exit_code = 1


class UsageError(FaceLLMEdgeError):
    """Bad arguments or options (unknown quant, unknown detector, conflicting flags)."""

    exit_code = 2


class InputError(FaceLLMEdgeError):
    """An input file, directory, image, camera or stream that cannot be used."""

    exit_code = 3


class CheckpointError(InputError):
    """A model checkpoint or adapter that is missing, corrupted or of the wrong architecture."""


class BundleError(InputError):
    """A bundle that is missing, incomplete, tampered with or inconsistent."""


class OutputError(FaceLLMEdgeError):
    """The output location exists, is not writable, or the disk filled up."""

    exit_code = 4


class ExportError(FaceLLMEdgeError):
    """A step of the export failed (conversion, quantisation, verification)."""

    exit_code = 5


class RuntimeStageError(FaceLLMEdgeError):
    """A stage of the runtime failed (detector, encoder, generator, context overflow)."""

    exit_code = 6


class MissingExtraError(FaceLLMEdgeError):
    """An optional dependency group is not installed; the message gives the pip command."""

    exit_code = 7

    def __init__(self, extra: str, module: str) -> None:
        super().__init__(
            f"this needs the '{extra}' extra ({module} is not installed): "
            f"pip install 'facellm-edge[{extra}]'"
        )


def require(module: str, extra: str):
    """Import ``module`` or raise :class:`MissingExtraError` naming the extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingExtraError(extra, module) from exc
