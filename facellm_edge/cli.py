"""The ``facellm-edge`` command line: parse -> build config -> call.

This is the only place that prints errors and exits. Each area registers its commands from
``facellm_edge.commands.<area>``; those modules import heavy libraries only inside the command bodies so that
``facellm-edge --help`` is instant.
"""

from __future__ import annotations

import logging
import os
import sys

import typer

from facellm_edge import __version__
from facellm_edge.errors import FaceLLMEdgeError

app = typer.Typer(
    name="facellm-edge",
    help="FaceLLM on the edge: export to ONNX + GGUF, run live on cameras, benchmark, train, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_AREAS = ("export", "runtime", "bench", "train", "data", "evaluate")


def _register_commands() -> None:
    import importlib

    for area in _AREAS:
        try:
            module = importlib.import_module(f"facellm_edge.commands.{area}")
        except ModuleNotFoundError as exc:
            if exc.name == f"facellm_edge.commands.{area}":
                continue  # area not part of this build
            raise
        module.register(app)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"facellm-edge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    if debug:
        os.environ["FACELLM_EDGE_DEBUG"] = "1"
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


_register_commands()


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the app, turn our errors into one line + exit code."""
    try:
        app(args=argv, standalone_mode=False)
    except FaceLLMEdgeError as exc:
        if os.environ.get("FACELLM_EDGE_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except typer.Exit as exc:  # raised by --version / explicit exits
        return exc.exit_code
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            return exc.exit_code
        if isinstance(exc, click.exceptions.Abort):
            print("aborted", file=sys.stderr)
            return 130
        if os.environ.get("FACELLM_EDGE_DEBUG"):
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
