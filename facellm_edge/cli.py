"""The ``facellm-edge`` command line: parse -> build config -> call.

This is the only place that prints errors and exits. Every command and group is one row of :data:`COMMANDS`; its
module (``facellm_edge.commands.<verb>``) is imported only when that command runs or shows its own help, so
``facellm-edge --help`` is instant and one area's missing library cannot break another's commands.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import signal
import sys
import threading
from typing import Any

import typer
from typer.core import TyperCommand  # click's Command, from the click typer runs on

from facellm_edge import __version__
from facellm_edge.errors import FaceLLMEdgeError

log = logging.getLogger(__name__)

_SETTINGS = {"add_completion": False, "pretty_exceptions_enable": False}

app = typer.Typer(
    name="facellm-edge",
    help="FaceLLM on the edge: export to ONNX + GGUF, run live on cameras, benchmark, train, evaluate.",
    no_args_is_help=True,
    **_SETTINGS,
)

# name -> ("module:attribute", the line `facellm-edge --help` shows; also the first line of the command's own help).
# The attribute is a command function or a typer.Typer group (its subcommands); nothing else registers commands.
COMMANDS: dict[str, tuple[str, str]] = {
    "export": ("facellm_edge.commands.export:export_cmd",
               "Export a FaceLLM/InternVL checkpoint to a verified edge bundle (ONNX vision + GGUF LLM)."),
    "inspect": ("facellm_edge.commands.export:inspect_cmd",
                "Print a bundle's manifest summary and re-check every file's sha256."),
    "ask": ("facellm_edge.commands.runtime:ask", "Answer a question about every face in a photo."),
    "run": ("facellm_edge.commands.runtime:run",
            "Live loop: detect and track faces every frame, answer about each new face, stream the answers."),
    "serve": ("facellm_edge.commands.serve:serve_cmd",
              "Serve the model over HTTP: OpenAI-compatible chat, face sessions, live events, the kiosk page."),
    "bench": ("facellm_edge.commands.bench:bench_cmd",
              "Per-stage latency and memory of the edge path (ONNX Runtime + llama.cpp) beside transformers."),
    "train": ("facellm_edge.commands.train:train_command",
              "LoRA fine-tune FaceLLM / InternVL3 on ShareGPT face data (FaceLLM's recipe by default)."),
    "data": ("facellm_edge.commands.data:data_app",
             "Build FairFaceGPT-style question-answer data (ShareGPT JSONL), or import the published dataset."),
    "eval": ("facellm_edge.commands.eval:eval_app",
             "Evaluate on FaceXBench (or a bench in its style), re-score saved answers, compare runs."),
    "pull": ("facellm_edge.commands.hub:pull_cmd",
             "Fetch a published bundle (only the files one configuration needs), verify every sha256, cache it."),
    "list": ("facellm_edge.commands.hub:list_cmd", "List the bundles in the cache (pulled, and the default one)."),
    "rm": ("facellm_edge.commands.hub:rm_cmd", "Remove bundles from the cache (never a folder of yours)."),
    "push": ("facellm_edge.commands.hub:push_cmd",
             "Publish a bundle on the hub with a model card (source, licence, verification, measured speed)."),
    "doctor": ("facellm_edge.commands.doctor:doctor_cmd",
               "Check this machine and install: versions, CPU features, ONNX Runtime providers, llama.cpp, cameras."),
}


class _Lazy(TyperCommand):
    """A row of :data:`COMMANDS`: its name and summary are known up front (the root's help lists them); the command
    itself is built from its module on first use. Click makes the subcommand's context through ``make_context``, so
    the real command (or group) parses and runs; this stand-in never does."""

    def __init__(self, name: str, target: str, summary: str) -> None:
        super().__init__(name, short_help=summary, help=summary)
        self.target = target
        self._real: Any = None  # the click command or group

    def load(self) -> Any:
        if self._real is None:
            module, attr = self.target.split(":")
            holder = typer.Typer(**_SETTINGS)  # the settings of the root, whatever the module's Typer says
            obj = getattr(importlib.import_module(module), attr)
            if isinstance(obj, typer.Typer):
                holder.add_typer(obj, name=self.name)
            else:
                holder.command(self.name)(obj)
            holder.callback()(_nothing)  # a group, so that a single command stays a named subcommand
            real = typer.main.get_command(holder).commands[self.name]
            real.short_help = self.short_help
            real.help = f"{self.help}\n\n{real.help}" if real.help else self.help
            self._real = real
        return self._real

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        return self.load().make_context(info_name, args, parent=parent, **extra)


def _nothing() -> None:
    pass


def _loaded(cmd: Any) -> Any:
    return cmd.load() if isinstance(cmd, _Lazy) else cmd


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


# the root group with every row of COMMANDS (only the root's own callback is built by typer up front)
cli = typer.main.get_command(app)
for _name, (_target, _summary) in COMMANDS.items():
    cli.add_command(_Lazy(_name, _target, _summary))


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the app, turn every failure into one line on stderr + an exit code.

    Codes: 0 done, 2 usage, 3 input, 4 output, 5 export, 6 runtime, 7 missing extra, 130 Ctrl-C, 143 SIGTERM
    (``serve`` returns 0 after a graceful shutdown on either: a service's normal stop)."""
    args = list(sys.argv[1:] if argv is None else argv)
    with _StopSignals() as stop:
        rc, line = _run(args)
    if stop.signum is not None:  # a stop request wins over whatever the interrupted command did next
        rc, line = _STOP[stop.signum]
    if line:
        print(line, file=sys.stderr)
    return rc


# -- signals -------------------------------------------------------------------------------------------
_STOP = {signal.SIGINT: (130, "interrupted"), signal.SIGTERM: (143, "terminated")}


class _StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (systemd, ``docker stop``) for the length of one ``main`` call.

    The first raises KeyboardInterrupt in the main thread, so every ``finally`` and ``atomic_directory`` cleanup
    runs and finished results are kept; ``signum`` remembers it even if a command catches the KeyboardInterrupt to
    shut down gracefully (the live loop does). A second one is not raised, so the cleanup it would cut short
    finishes; a third stops at once (temporary files may then be left). Handlers are restored on exit; a signal
    the parent process ignores (``nohup``) stays ignored; outside the main thread nothing is installed."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._count = 0
        self._saved: dict[int, object] = {}

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in _STOP:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._saved.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)

    def _handle(self, signum: int, _frame: object) -> None:
        self._count += 1
        if self.signum is None:
            self.signum = signum
        if self._count == 2:
            log.warning("stopping: finishing the cleanup first (once more quits at once, leaving temporary files)")
            return
        raise KeyboardInterrupt


# -- errors -> one line ----------------------------------------------------------------------------------
def _run(args: list[str]) -> tuple[int, str]:
    """Run the app; (exit code, the line to print on stderr or "")."""
    click_exc = sys.modules[typer.BadParameter.__module__]  # click's exceptions, or typer's vendored copy of them
    debug = os.environ.get("FACELLM_EDGE_DEBUG")
    try:
        rc = cli.main(args=args, prog_name="facellm-edge", standalone_mode=False)
    except FaceLLMEdgeError as exc:
        if debug:
            raise
        if isinstance(exc.__cause__, UnicodeEncodeError) and any(_has_surrogates(a) for a in args):
            return _not_utf8(args, exc.__cause__)  # non-UTF-8 bytes of an argument: name the argument
        return exc.exit_code, f"error: {_one_line(str(exc))}"
    except KeyboardInterrupt:  # typer turns it into exit code 130; this is a fallback
        return _STOP[signal.SIGINT]
    except typer.Exit as exc:
        return exc.exit_code, ""
    except typer.Abort:  # end of input at a prompt
        return 1, "error: aborted (end of input)"
    except SystemExit as exc:  # typer exits 1 on a broken pipe (`| head`)
        return (int(exc.code or 0), "") if not isinstance(exc.code, str) else (1, f"error: {exc.code}")
    except click_exc.NoArgsIsHelpError as exc:  # a bare command group: its help (rich prints it while formatting)
        if exc.format_message().strip():
            typer.echo(exc.format_message())
        return exc.exit_code, ""
    except click_exc.UsageError as exc:
        return exc.exit_code, _usage_line(exc, args)
    except click_exc.ClickException as exc:
        return exc.exit_code, f"error: {_one_line(exc.format_message())}"
    except OSError as exc:  # a file or folder the library opened without naming the fix
        if debug:
            raise
        return _os_error(exc)
    except UnicodeEncodeError as exc:  # non-UTF-8 bytes from argv (surrogate-escaped) reached a text encoder
        if debug:
            raise
        return _not_utf8(args, exc)
    except ImportError as exc:  # ONNX Runtime / OpenCV missing: no runtime flavour installed
        from facellm_edge.doctor.flavours import missing_runtime

        err = missing_runtime(exc)
        if debug:
            raise
        if err is None:
            return 1, f"error: unexpected ImportError: {_one_line(str(exc))} (run with --debug for the traceback)"
        return err.exit_code, f"error: {_one_line(str(err))}"
    except Exception as exc:
        if debug:
            raise
        return 1, f"error: unexpected {type(exc).__name__}: {_one_line(str(exc))} (run with --debug for the traceback)"
    return (rc if isinstance(rc, int) else 0), ""  # typer returns 130 for a KeyboardInterrupt it caught


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _usage_line(exc, args: list[str]) -> str:
    """click's usage error as one line: what is wrong with which option, then the usage line."""
    msg = _one_line(exc.format_message()).rstrip(".")
    if len(msg) > 1 and msg[0].isupper() and msg[1].islower():
        msg = msg[0].lower() + msg[1:]
    ctx = getattr(exc, "ctx", None)
    if ctx is None:  # the option parser raises some errors (an option without its value) without a context
        cmd, path, _, _ = _walk(args, len(args))
        ctx = typer.Context(cmd, info_name=" ".join(path))
    usage = _one_line(ctx.get_usage())
    usage = usage[0].lower() + usage[1:] if usage.startswith("Usage:") else usage
    return f"error: {msg} ({usage}; see {ctx.command_path} --help)"


_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _os_error(exc: OSError) -> tuple[int, str]:
    """An OSError as one line naming the file and the reason (exit 4 for a full / read-only disk, else 3)."""
    what = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
    reason = exc.strerror.lower() if exc.strerror else _one_line(str(exc))
    fix = "; run as a user who may access it, or change its permissions" if isinstance(exc, PermissionError) else ""
    code = 4 if exc.errno in _OUTPUT_ERRNOS else 3
    return code, f"error: {f'cannot access {what}: ' if what else ''}{reason}{fix}"


def _not_utf8(args: list[str], exc: UnicodeEncodeError) -> tuple[int, str]:
    """Name the command-line argument whose bytes are not UTF-8 (Python keeps them as lone surrogates)."""
    bad = [i for i, a in enumerate(args) if _has_surrogates(a)]
    hit = next((i for i in bad if args[i] in exc.object or exc.object in args[i]), bad[0] if bad else None)
    if hit is None:
        return 3, f"error: text that is not valid UTF-8 ({exc.object[exc.start:exc.end]!r}); use UTF-8 text"
    raw = args[hit].encode("utf-8", "surrogateescape")
    return 2, f"error: {_argument_name(args, hit)} is not valid UTF-8 text ({raw!r}); pass it in UTF-8"


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _argument_name(args: list[str], index: int) -> str:
    """The option (``--question``) or argument (``QUESTION``) that ``args[index]`` is the value of."""
    if args[index].startswith("--") and "=" in args[index]:
        return args[index].split("=", 1)[0]
    cmd, _path, positional, option = _walk(args, index)
    if option is not None:
        return option
    arguments = [p for p in cmd.params if p.param_type_name == "argument"]
    return arguments[positional].name.upper() if positional < len(arguments) else f"argument {index + 1}"


def _walk(args: list[str], stop: int) -> tuple[Any, list[str], int, str | None]:
    """Read ``args[:stop]`` the way the parser does: the (sub)command they reach, its path (``facellm-edge data
    build``), how many positional arguments it has been given, and the option ``args[stop]`` is the value of."""
    cmd, path = cli, ["facellm-edge"]
    positional, i = 0, 0
    while i < stop:
        t = args[i]
        opt = next((p for p in cmd.params if t.split("=", 1)[0] in getattr(p, "opts", ())), None)
        if t.startswith("-") and opt is not None:
            if not (opt.is_flag or opt.count) and "=" not in t:
                if i + 1 == stop:
                    return cmd, path, positional, t
                i += 1
        elif not t.startswith("-") and t in getattr(cmd, "commands", {}):
            cmd, positional = _loaded(cmd.commands[t]), 0
            path.append(t)
        elif not t.startswith("-"):
            positional += 1
        i += 1
    return cmd, path, positional, None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
