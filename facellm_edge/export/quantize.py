"""llama.cpp quantisation of an f32/f16/bf16 GGUF, with an honest report of what llama.cpp actually wrote.

k-quants need rows divisible by 256; llama.cpp silently falls back to another type for tensors that are not
(Qwen2.5-0.5B's width 896 and the tiny test model's 64 are not). The report lists those tensors.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from facellm_edge.errors import ExportError, InputError, OutputError, UsageError, require
from facellm_edge.io import atomic_file

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantSpec:
    """A quant name -> llama.cpp ftype constant (attribute of ``llama_cpp``) + the GGML types its mix uses."""

    ftype_attr: str
    types: tuple[str, ...]  # GGML type names llama.cpp's mix picks for 2-D weights when dims allow it
    pure: bool = False  # llama-quantize --pure: every tensor in the base type, the output head / tied embedding too


# The mixes follow llama.cpp's llama_tensor_get_type: *_K_M put attn_v / ffn_down / the output head (the token
# embedding when tied) in Q6_K; Q4_0 and IQ4_NL put the output head in Q6_K.
QUANTS: dict[str, QuantSpec] = {
    "f32": QuantSpec("LLAMA_FTYPE_ALL_F32", ("F32",)),
    "f16": QuantSpec("LLAMA_FTYPE_MOSTLY_F16", ("F16",)),
    "bf16": QuantSpec("LLAMA_FTYPE_MOSTLY_BF16", ("BF16",)),
    "q8_0": QuantSpec("LLAMA_FTYPE_MOSTLY_Q8_0", ("Q8_0",)),
    "q6_k": QuantSpec("LLAMA_FTYPE_MOSTLY_Q6_K", ("Q6_K",)),
    "q5_k_m": QuantSpec("LLAMA_FTYPE_MOSTLY_Q5_K_M", ("Q5_K", "Q6_K")),
    "q4_k_m": QuantSpec("LLAMA_FTYPE_MOSTLY_Q4_K_M", ("Q4_K", "Q6_K")),
    "q4_0": QuantSpec("LLAMA_FTYPE_MOSTLY_Q4_0", ("Q4_0", "Q6_K")),
    "iq4_nl": QuantSpec("LLAMA_FTYPE_MOSTLY_IQ4_NL", ("IQ4_NL", "Q6_K")),
    # Decode on a CPU is memory-bound: each token reads every weight once. The tied 151k x 896 embedding / output
    # head is 28 % of Qwen2.5-0.5B's weights, and with a width of 896 its Q6_K falls back to Q8_0 (138 of the
    # 333 MiB a q4_0 token reads). Pure Q4_0 reads 268 MiB per token instead (bench roofline; -65 MB peak RSS), at
    # the quality cost the export's logit check reports.
    "q4_0_pure": QuantSpec("LLAMA_FTYPE_MOSTLY_Q4_0", ("Q4_0",), pure=True),
}


def validate_quants(spec: str | Sequence[str]) -> tuple[str, ...]:
    """Parse ``"q4_k_m,q8_0"`` (or a list) into known quant names, in order, without duplicates."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [s.strip().lower() for s in items if s.strip()]
    if not names:
        raise UsageError(f"no quant given; choose from {', '.join(QUANTS)}")
    for name in names:
        if name not in QUANTS:
            raise UsageError(f"unknown quant '{name}'; choose from {', '.join(QUANTS)}")
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class QuantReport:
    """What llama.cpp wrote: sizes, bits per weight, type histogram, and the tensors that fell back."""

    quant: str
    path: str
    file_bytes: int
    n_params: int
    bits_per_weight: float          # file bytes (incl. the ~6 MB tokenizer metadata) * 8 / all parameters
    bits_per_weight_2d: float       # bytes of the 2-D weights * 8 / their parameters
    type_histogram: dict[str, int]  # GGML type -> number of tensors
    fallbacks: tuple[dict[str, Any], ...]  # 2-D tensors not in the quant's mix: {name, type, shape}
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fallbacks"] = list(self.fallbacks)
        return d


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: str               # GGML type name, e.g. "Q4_K"
    shape: tuple[int, ...]  # ggml order (ne0 = row length first), trailing 1s dropped
    n_bytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for x in self.shape:
            n *= x
        return n


def _ggml_gguf_api() -> Any:
    """ggml's own C GGUF reader (in llama-cpp-python's libggml-base), bound with ctypes.

    gguf-py's GGUFReader parses every vocabulary string into numpy views (~10 s CPU for a 151k-token Qwen
    vocabulary); ggml reads the same header in milliseconds, and it is the reader llama.cpp itself uses.
    """
    import ctypes

    llama_cpp = require("llama_cpp", "export")
    if _GGML_GGUF.get("lib") is None:
        lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))

        class InitParams(ctypes.Structure):  # struct gguf_init_params { bool no_alloc; struct ggml_context ** ctx; }
            _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]

        lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, InitParams]
        lib.gguf_init_from_file.restype = ctypes.c_void_p
        lib.gguf_free.argtypes = [ctypes.c_void_p]
        lib.gguf_get_n_tensors.argtypes = [ctypes.c_void_p]
        lib.gguf_get_n_tensors.restype = ctypes.c_int64
        lib.gguf_get_tensor_name.argtypes = [ctypes.c_void_p, ctypes.c_int64]
        lib.gguf_get_tensor_name.restype = ctypes.c_char_p
        lib.gguf_get_tensor_type.argtypes = [ctypes.c_void_p, ctypes.c_int64]
        lib.gguf_get_tensor_type.restype = ctypes.c_int
        lib.gguf_get_tensor_size.argtypes = [ctypes.c_void_p, ctypes.c_int64]
        lib.gguf_get_tensor_size.restype = ctypes.c_size_t
        lib.gguf_get_tensor_ne.argtypes = [ctypes.c_void_p, ctypes.c_int64]
        lib.gguf_get_tensor_ne.restype = ctypes.POINTER(ctypes.c_int64)  # int64_t ne[GGML_MAX_DIMS = 4]
        _GGML_GGUF["lib"], _GGML_GGUF["params"] = lib, InitParams(True, None)
    return _GGML_GGUF["lib"]


_GGML_GGUF: dict[str, Any] = {}


def read_tensor_infos(path: Path | str) -> list[TensorInfo]:
    """Names, GGML types, shapes and byte sizes of the tensors of a GGUF file (header only)."""
    gguf = require("gguf", "export")
    lib = _ggml_gguf_api()
    if not Path(path).is_file():
        raise InputError(f"GGUF file {path} does not exist")
    ctx = lib.gguf_init_from_file(str(path).encode(), _GGML_GGUF["params"])
    if not ctx:
        raise InputError(f"{path} is not a readable GGUF file")
    try:
        out = []
        for i in range(lib.gguf_get_n_tensors(ctx)):
            ne = [int(x) for x in lib.gguf_get_tensor_ne(ctx, i)[:4]]
            while len(ne) > 1 and ne[-1] == 1:
                ne.pop()
            out.append(TensorInfo(name=lib.gguf_get_tensor_name(ctx, i).decode(),
                                  type=gguf.GGMLQuantizationType(lib.gguf_get_tensor_type(ctx, i)).name,
                                  shape=tuple(ne), n_bytes=int(lib.gguf_get_tensor_size(ctx, i))))
        return out
    finally:
        lib.gguf_free(ctx)


def inspect_gguf(path: Path | str, quant: str) -> dict[str, Any]:
    """Summarise a GGUF's tensor types against the mix of ``quant``."""
    wanted = set(QUANTS[quant].types)
    hist: Counter[str] = Counter()
    fallbacks = []
    n_params = n_params_2d = bytes_2d = 0
    for t in read_tensor_infos(path):
        hist[t.type] += 1
        n_params += t.n_elements
        if len(t.shape) >= 2:
            n_params_2d += t.n_elements
            bytes_2d += t.n_bytes
            if t.type not in wanted:
                fallbacks.append({"name": t.name, "type": t.type, "shape": list(t.shape)})
    return {"n_params": n_params, "n_params_2d": n_params_2d, "bytes_2d": bytes_2d,
            "type_histogram": dict(sorted(hist.items())), "fallbacks": tuple(fallbacks)}


# How llama.cpp's quantize reports a write that failed: its output is a std::ofstream with failbit exceptions
# ("basic_ios::clear: iostream error", the only ofstream there: the output file; no strerror), and llama_file's
# writes throw "write error: <strerror>" (llama-mmap.cpp)
WRITE_ERROR = re.compile(r"iostream error|write error|failed to write|No space left|File too large|quota exceeded",
                         re.IGNORECASE)


class _ErrorLines(logging.Handler):
    """The ERROR lines llama.cpp logs while it runs (through facellm_edge.llama_cpp)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage().strip())


def quantize_gguf(src: Path | str, dst: Path | str, quant: str, n_threads: int = 2) -> QuantReport:
    """Quantise an f32/f16/bf16 GGUF ``src`` to ``dst`` with llama.cpp (atomically) and report the result."""
    validate_quants([quant])
    llama_cpp = require("llama_cpp", "export")
    from facellm_edge.llm.native import install_log_hook

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise InputError(f"source GGUF {src} does not exist")
    if not dst.parent.is_dir():
        raise OutputError(f"output folder {dst.parent} does not exist; create it first")
    if n_threads < 1:
        raise UsageError(f"n_threads must be >= 1, got {n_threads}")
    install_log_hook(llama_cpp)
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = int(n_threads)
    params.ftype = int(getattr(llama_cpp, QUANTS[quant].ftype_attr))
    params.pure = QUANTS[quant].pure
    t0 = time.perf_counter()
    # llama.cpp warns once per fallback tensor; the report below summarises them (errors still get through).
    llama_log = logging.getLogger("facellm_edge.llama_cpp")
    level = llama_log.level
    llama_log.setLevel(logging.ERROR)
    errors = _ErrorLines()  # llama.cpp's own reason, which its return code does not carry
    llama_log.addHandler(errors)
    try:
        with atomic_file(dst) as tmp:  # llama.cpp fills the temporary file; committed only when it succeeded
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
            if rc != 0:
                why = errors.lines[-1] if errors.lines else f"code {rc}"
                if WRITE_ERROR.search(why):  # a full disk or a size limit: where it writes, not what it reads
                    free = shutil.disk_usage(dst.parent).free / 2**30
                    raise OutputError(f"cannot write {dst}: llama.cpp's write failed ({why}); {free:.1f} GB free "
                                      "there (a full disk, a quota or a file-size limit?)")
                raise ExportError(f"llama.cpp failed to quantise {src} to {quant} ({why}); the source must be an "
                                  "f32/f16/bf16 GGUF")
    except OSError as exc:
        raise OutputError(f"cannot write {dst}: {exc}") from exc
    finally:
        llama_log.removeHandler(errors)
        llama_log.setLevel(level)
    seconds = time.perf_counter() - t0
    info = inspect_gguf(dst, quant)
    size = dst.stat().st_size
    report = QuantReport(
        quant=quant, path=str(dst), file_bytes=size, n_params=info["n_params"],
        bits_per_weight=size * 8 / info["n_params"],
        bits_per_weight_2d=info["bytes_2d"] * 8 / info["n_params_2d"] if info["n_params_2d"] else 0.0,
        type_histogram=info["type_histogram"], fallbacks=info["fallbacks"], seconds=seconds)
    if report.fallbacks:
        logger.info("%s: %d tensor(s) not in the %s mix (llama.cpp fallback, e.g. rows not divisible by 256): "
                       "%s", dst.name, len(report.fallbacks), quant,
                       ", ".join(f"{f['name']}={f['type']}" for f in report.fallbacks))
    logger.info("quantised %s -> %s: %.2f bits/weight, %s", src.name, dst.name, report.bits_per_weight,
                report.type_histogram)
    return report
