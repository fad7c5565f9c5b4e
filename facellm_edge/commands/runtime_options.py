"""The options ``ask`` and ``run`` share, declared once.

:func:`runtime_options` adds them to a command's signature and hands the command one frozen :class:`RuntimeOptions`,
which builds the nested :class:`~facellm_edge.runtime.config.RuntimeConfig`. Every default is read from the field of
the stage config the option sets (``--ctx`` from ``EngineConfig.n_ctx``, ``--detector`` from ``DetectorConfig.name``,
...), except run's ``--max-tokens``: the live default :data:`~facellm_edge.runtime.live.loop.LIVE_MAX_TOKENS`.

The stage configs import numpy; this module is imported only when ``ask`` or ``run`` runs or shows its help
(``facellm_edge.cli`` loads command modules on first use). ``RuntimeConfig`` itself (cv2) is imported when the config
is built.
"""

from __future__ import annotations

import functools
import inspect
import logging
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import typer

from facellm_edge.commands.config_file import config_parameter_callback
from facellm_edge.commands.defaults import field_default
from facellm_edge.errors import FaceLLMEdgeError, MissingExtraError, UsageError
from facellm_edge.export.exporter import ExportConfig
from facellm_edge.io import DEFAULT_MAX_PIXELS
from facellm_edge.llm.engine import EngineConfig
from facellm_edge.llm.sampling import GenerationConfig
from facellm_edge.runtime.detect import DetectorConfig
from facellm_edge.runtime.encode import DEVICES, PREPACK, EncoderConfig
from facellm_edge.runtime.live.loop import LIVE_MAX_TOKENS

if TYPE_CHECKING:
    from facellm_edge.runtime.config import RuntimeConfig

log = logging.getLogger(__name__)


# The bundle ask/run/serve use without --bundle: the published bundle DEFAULT_BUNDLE_REPO (pulled on first use) when
# there is one; otherwise DEFAULT_MODEL exported into the user cache on first use, which needs the export extra.
DEFAULT_BUNDLE_REPO: str | None = None  # FaceLLM's authors publish checkpoints, not bundles: none to pull yet
DEFAULT_MODEL = "Idiap/FaceLLM-1B"
DEFAULT_QUANT = field_default(ExportConfig, "quants")[0]

_GEN, _ENGINE, _DETECT, _ENCODER = GenerationConfig(), EngineConfig(), DetectorConfig(), EncoderConfig()


@dataclass(frozen=True)
class RuntimeOptions:
    """What ask and run were told about the model (the values of the shared options)."""

    bundle: str | None
    max_tokens: int
    temperature: float
    detector: str
    detector_model: Path | None
    detect_size: int | None
    device: str
    quant: str | None
    precision: str | None
    threads: int | None
    vision_prepack: str
    max_faces: int
    ctx: int
    gpu_layers: int
    schema: Path | None
    max_pixels: int
    system: str | None
    live: bool  # run: the live thread policy (RuntimeConfig.for_live) for every thread count left unset

    def runtime_config(self) -> "RuntimeConfig":
        """The runtime config these options describe; every value is checked here, before any bundle is touched."""
        from facellm_edge.runtime.config import RuntimeConfig

        config = RuntimeConfig(
            detector=DetectorConfig(name=self.detector, model_path=self.detector_model, max_faces=self.max_faces,
                                    input_size=self.detect_size),
            encoder=EncoderConfig(device=self.device, precision=self.precision, prepack=self.vision_prepack),
            engine=EngineConfig(quant=self.quant, n_ctx=self.ctx, n_gpu_layers=self.gpu_layers,
                                n_threads=self.threads, n_threads_batch=self.threads),
            generation=GenerationConfig(max_tokens=self.max_tokens, temperature=self.temperature,
                                        grammar=_grammar(self.schema)),
            max_pixels=self.max_pixels,
            system=self.system,
        )
        return config.for_live() if self.live else config

    def bundle_dir(self) -> Path:
        """``--bundle``: a local folder, a pulled name, a hub repo id (pulled: the files of --quant / --precision)
        or the default bundle."""
        return resolve_bundle(self.bundle, quant=self.quant, vision=self.precision)


def default_bundle_dir() -> Path:
    from facellm_edge.io import user_cache_dir

    return user_cache_dir() / "bundles" / f"{DEFAULT_MODEL.split('/')[-1]}-{DEFAULT_QUANT}"


def resolve_bundle(spec: Optional[str], *, quant: Optional[str] = None, vision: Optional[str] = None) -> Path:
    """The bundle folder ``--bundle`` names: a local folder; a pulled bundle (repo id, alias or folder name in the
    cache: no network); a hub repo id not pulled yet (pulled now, the ``quant`` / ``vision`` files or the preferred
    ones); or, for None, the default bundle (:func:`default_bundle`)."""
    import os

    from facellm_edge.bundle import resolve_bundle_spec
    from facellm_edge.hub import find_cached
    from facellm_edge.hub.sources import is_hub_id

    if spec is None:
        return default_bundle(quant=quant, vision=vision)
    if not spec.strip():  # Path("") is ".": the current folder would be checked as the bundle
        raise UsageError("--bundle is empty; name a bundle folder, a pulled bundle or a hub repo id")
    if not os.path.lexists(Path(spec).expanduser()):
        cached = find_cached(spec)
        if cached is not None:
            return _cached_root(cached, quant, vision)
        if is_hub_id(spec):
            return _pull(spec, quant, vision)
    return resolve_bundle_spec(spec)  # a local folder, or the one-line reason it is none (no network)


def default_bundle(*, quant: Optional[str] = None, vision: Optional[str] = None) -> Path:
    """No ``--bundle``: :data:`DEFAULT_BUNDLE_REPO` pulled (once) when one is published; else the default bundle
    exported into the cache on first use where the export extra is installed; else (a runtime-only install) a
    one-line error saying how to make and publish a bundle on a workstation and pull it here."""
    from facellm_edge.bundle import MANIFEST
    from facellm_edge.hub import find_cached

    if DEFAULT_BUNDLE_REPO is not None:
        cached = find_cached(DEFAULT_BUNDLE_REPO)
        if cached is not None:
            return _cached_root(cached, quant, vision)
        return _pull(DEFAULT_BUNDLE_REPO, quant, vision)
    dest = default_bundle_dir()
    if (dest / MANIFEST).is_file():
        return dest
    if not _export_installed():
        raise NoDefaultBundle(_no_default_message())
    from facellm_edge.export.exporter import export_bundle

    log.warning("no --bundle: exporting the default model %s at %s into %s — this downloads the checkpoint from the "
                "hub (about 2 GB), converts it to ONNX + GGUF and checks it against transformers; several minutes, "
                "first use only (pass --bundle to use a bundle you have)", DEFAULT_MODEL, DEFAULT_QUANT, dest)
    return export_bundle(ExportConfig(model=DEFAULT_MODEL, out=dest, quants=(DEFAULT_QUANT,))).out


class NoDefaultBundle(MissingExtraError):
    """No ``--bundle``, none published to pull, and no export extra to make one here (exit 7, as a missing extra)."""

    def __init__(self, message: str) -> None:
        FaceLLMEdgeError.__init__(self, message)


def _export_installed() -> bool:
    import importlib.util

    try:
        return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))
    except (ImportError, ValueError):  # a module set to None or without a spec: not importable
        return False


def _no_default_message() -> str:
    from facellm_edge.hub import cached_bundles

    pulled = [b.alias or b.name for b in cached_bundles() if b.revision is not None and b.problem is None]
    here = f"; bundles pulled here: {', '.join(pulled)} (pass one with --bundle)" if pulled else ""
    return ("no --bundle given and no published default bundle to pull; this install has no torch, so the default "
            f"({DEFAULT_MODEL}) cannot be exported here. On a workstation: pip install 'facellm-edge[export]', "
            f"facellm-edge export {DEFAULT_MODEL} --quant {DEFAULT_QUANT} --out B, facellm-edge push B USER/REPO; "
            f"then here: facellm-edge pull USER/REPO and --bundle USER/REPO{here}")


def _cached_root(cached: Any, quant: Optional[str], vision: Optional[str]) -> Path:
    """A pulled bundle's folder, after checking it holds the --quant / --precision asked for (a pull names them)."""
    from facellm_edge.errors import BundleError

    for want, have, option in ((quant, cached.quants, "--quant"), (vision, cached.vision, "--vision")):
        if want is not None and cached.revision is not None and want not in have:
            raise BundleError(f"{cached.name} was pulled without {want} (it has {', '.join(have) or 'none'}); "
                              f"fetch it with `facellm-edge pull {cached.name} {option} {want}`")
    log.info("bundle %s: %s", cached.name, cached.root)
    return cached.root


def _pull(repo: str, quant: Optional[str], vision: Optional[str]) -> Path:
    from facellm_edge.hub import PullConfig, pull

    log.warning("bundle %s is not in the cache: pulling it (llm %s, vision %s)", repo, quant or "preferred",
                vision or "preferred")
    return pull(PullConfig(source=repo, quants=(quant,) if quant else (), vision=(vision,) if vision else ())).root


def _grammar(schema: Optional[Path]) -> Optional[str]:
    """``--schema FILE`` (a JSON schema) -> a llama.cpp grammar that forces every answer to match it."""
    if schema is None:
        return None
    from facellm_edge.errors import InputError
    from facellm_edge.llm.generator import schema_to_grammar

    try:
        text = schema.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the JSON schema {schema}: {exc}") from exc
    return schema_to_grammar(text)


_BUNDLE_HELP = ("Bundle folder, a pulled bundle (repo id or alias: `facellm-edge list`), or a hub repo id (pulled on "
                f"first use: the --quant / --precision files). Default: {DEFAULT_MODEL.split('/')[-1]} at "
                f"{DEFAULT_QUANT} in the user cache, exported on first use (needs the 'export' extra).")
_SYSTEM_HELP = ("System message for this run (default: the bundle's own, none unless exported with --system). "
                "none | intern_vl (the InternVL identity text FaceLLM was trained with) | the message text.")


def _parameters(live: bool) -> list[inspect.Parameter]:
    """The shared options, as keyword parameters typer reads (defaults shown in --help)."""

    def option(name: str, annotation: Any, default: Any, flag: str, help: str, **kw: Any) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                 default=typer.Option(default, flag, help=help, **kw))

    return [
        option("config", Optional[Path], None, "--config",
               "TOML file of option values (keys = the long flags with underscores; see docs/config.md); flags given "
               "here win.", is_eager=True, callback=config_parameter_callback(SHARED)),
        option("bundle", Optional[str], None, "--bundle", _BUNDLE_HELP),
        option("max_tokens", int, LIVE_MAX_TOKENS if live else _GEN.max_tokens, "--max-tokens",
               "Max tokens per answer" + (" (live default: short answers come while the face is still there)."
                                          if live else "."), min=1),
        option("temperature", float, _GEN.temperature, "--temperature", "0 = greedy.", min=0.0),
        option("detector", str, _DETECT.name, "--detector", "Face detector: yunet (MIT) or scrfd (non-commercial)."),
        option("detector_model", Optional[Path], _DETECT.model_path, "--detector-model", "Local detector model file."),
        option("detect_size", Optional[int], _DETECT.input_size, "--detect-size",
               "Longest side (px, a multiple of 32) the face detector works at; larger images are scaled down to it. "
               "Default 640. 320 frees CPU for the answers on a small CPU (a kiosk with near faces) but misses faces "
               "under ~32 px in a 640 x 480 frame.", min=64),
        option("device", str, _ENCODER.device, "--device", f"Vision encoder: {' | '.join(DEVICES)}."),
        option("quant", Optional[str], _ENGINE.quant, "--quant", "LLM quant in the bundle (default: its best)."),
        option("precision", Optional[str], _ENCODER.precision, "--precision",
               "Vision precision, int8 | fp32 (default: the bundle's preferred)."),
        option("vision_prepack", str, _ENCODER.prepack, "--vision-prepack",
               f"Vision encoder weight pre-packing + ONNX Runtime memory arena, {' | '.join(PREPACK)}: on encodes "
               "~5-13 % faster for up to ~380 MB more memory (FaceLLM-1B); auto turns it on where the CPU has int8 "
               "dot products (VNNI, AMX, ARM dotprod / i8mm) and the vision file is int8."),
        option("threads", Optional[int], _ENGINE.n_threads, "--threads",
               "llama.cpp threads (default: all cores; the live detector gets 1)." if live
               else "llama.cpp threads (default: all cores).", min=1),
        option("max_faces", int, _DETECT.max_faces, "--max-faces",
               ("Track at most N faces per frame" if live else "Answer about at most N faces") + " (0 = all).",
               min=0),
        option("ctx", int, _ENGINE.n_ctx, "--ctx", "LLM context size.", min=16),
        option("gpu_layers", int, _ENGINE.n_gpu_layers, "--gpu-layers",
               "LLM layers llama.cpp offloads to the GPU (needs a CUDA/Metal build of llama-cpp-python; 999 = all).",
               min=0),
        option("schema", Optional[Path], None, "--schema", "JSON schema file: answers are constrained to match it."),
        option("max_pixels", int, DEFAULT_MAX_PIXELS, "--max-pixels",
               "Refuse image files larger than this many pixels, read from the file's header before decoding "
               "(0 = no limit).", min=0),
        option("system", Optional[str], None, "--system", _SYSTEM_HELP),
    ]


# --detect-every's help (run and serve: the live loop's option).
DETECT_EVERY_HELP = (
    "Run the face detector on every Nth frame; the frames between show the last boxes. 0 = auto: every 3rd frame on a CPU with 4 usable cores or fewer (where the detector is most of the frame loop's work and what it does not take goes to the answers; every 6th while an answer is being made), every frame otherwise."
)


# The option names ask, run and serve share: the top-level keys of a --config file.
SHARED = frozenset(f.name for f in fields(RuntimeOptions) if f.name != "live")


def runtime_options(*, live: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: the command's own parameters, then the shared options; the command's ``options`` parameter gets
    their values as one :class:`RuntimeOptions` (``live``: run's defaults and thread policy)."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(command)  # real types: typer reads the wrapper, defined in this module
        own = [p.replace(annotation=hints.get(p.name, p.annotation))
               for p in inspect.signature(command).parameters.values() if p.name != "options"]
        if len(own) == len(inspect.signature(command).parameters):
            raise TypeError(f"{command.__name__} needs an 'options' parameter for its RuntimeOptions")
        shared = _parameters(live)

        @functools.wraps(command)
        def with_options(**kwargs: Any) -> Any:
            kwargs.pop("config")  # applied while parsing (the file's values are the options' defaults)
            options = RuntimeOptions(live=live, **{p.name: kwargs.pop(p.name) for p in shared if p.name != "config"})
            return command(options=options, **kwargs)

        params = [*own, *shared]
        with_options.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        with_options.__annotations__ = {p.name: p.annotation for p in params}
        return with_options

    return decorate
