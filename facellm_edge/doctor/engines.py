"""The two inference engines as built here: ONNX Runtime's providers that actually initialise, llama.cpp's features.

An ONNX Runtime build *lists* providers (``get_available_providers``) whose libraries may still be missing (CUDA or
cuDNN not installed, no GPU): ONNX Runtime then logs an error and silently runs on the CPU. So each listed provider
gets a real session on a tiny model, is checked to be among the session's providers, and runs it once.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from facellm_edge.doctor.report import FAIL, INFO, OK, WARN, Check

# Not a local compute device: calls a remote endpoint (in every official build's list).
NOT_COMPUTE = {"AzureExecutionProvider"}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, value: int | str | bytes) -> bytes:
    """One protobuf field: an int as a varint, a str/bytes as length-delimited."""
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    raw = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(raw)) + raw


def tiny_model(n: int = 8) -> bytes:
    """``y = Relu(x)`` on float32 [1, n] as ONNX bytes (IR 8, opset 13), written without the onnx package (not a
    runtime dependency). Field numbers from onnx.proto: ModelProto(ir_version 1, producer_name 2, graph 7,
    opset_import 8), GraphProto(node 1, name 2, input 11, output 12), NodeProto(input 1, output 2, op_type 4),
    ValueInfoProto(name 1, type 2), TypeProto(tensor_type 1), Tensor(elem_type 1, shape 2), TensorShapeProto(dim 1),
    Dimension(dim_value 1), OperatorSetIdProto(domain 1, version 2)."""
    shape = _field(1, _field(1, 1)) + _field(1, _field(1, n))

    def value_info(name: str) -> bytes:
        return _field(1, name) + _field(2, _field(1, _field(1, 1) + _field(2, shape)))  # elem_type 1 = FLOAT

    node = _field(1, "x") + _field(2, "y") + _field(4, "Relu")
    graph = _field(1, node) + _field(2, "doctor") + _field(11, value_info("x")) + _field(12, value_info("y"))
    return _field(1, 8) + _field(2, "facellm-edge doctor") + _field(7, graph) + _field(8, _field(1, "") + _field(2, 13))


def probe_provider(ort: Any, provider: str) -> str | None:
    """None when ``provider`` initialises and computes the tiny model correctly, else why not (one line)."""
    x = np.linspace(-1, 1, 8, dtype=np.float32)[None]
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4  # the failure is reported here, not as ONNX Runtime's multi-line log
        session = ort.InferenceSession(tiny_model(), sess_options=opts, providers=[provider])
        if provider not in session.get_providers():
            return f"falls back to {', '.join(session.get_providers())} (its libraries did not load)"
        (y,) = session.run(None, {"x": x})
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        text = str(exc).strip().splitlines()
        return text[0] if text else type(exc).__name__
    if not np.allclose(y, np.maximum(x, 0)):
        return "initialises but computes a wrong result"
    return None


def check_onnxruntime(device: str | None) -> Check:
    """Which providers initialise; with ``device`` (ask/run's --device), its first provider must."""
    from facellm_edge.errors import MissingExtraError
    from facellm_edge.onnxrt import onnxruntime_module
    from facellm_edge.runtime.encode import DEVICES

    try:
        ort = onnxruntime_module()
    except MissingExtraError as exc:  # the flavour check says it in full
        return Check("onnxruntime", FAIL if device else INFO, f"not checked: {exc}", exit_code=7)
    listed = list(ort.get_available_providers())
    results = {p: probe_provider(ort, p) for p in listed if p not in NOT_COMPUTE}
    working = [p for p, why in results.items() if why is None]
    notes = tuple(f"{p}: {'initialises' if why is None else why}" for p, why in results.items())
    data = {"version": ort.__version__, "listed": listed, "initialise": working,
            "failures": {p: why for p, why in results.items() if why is not None}}
    summary = f"{ort.__version__}: {', '.join(working) or 'no provider'} initialise{'s' if len(working) == 1 else ''}"
    if device is not None and device != "auto":
        wanted = DEVICES[device][0]
        if wanted not in working:
            why = results.get(wanted, "not in this onnxruntime build")
            from facellm_edge.runtime.encode import GPU_FIX

            return Check("onnxruntime", FAIL, f"--device {device}: {wanted} {why}", notes + (f"fix: {GPU_FIX}",),
                         data, exit_code=6)
    if not working:
        return Check("onnxruntime", FAIL, summary, notes, data, exit_code=6)
    return Check("onnxruntime", WARN if len(working) < len(results) else OK, summary, notes, data)


def parse_system_info(text: str) -> dict[str, dict[str, str]]:
    """llama.cpp's ``llama_print_system_info()`` (``CPU : SSE3 = 1 | AVX2 = 1 | ... | CUDA : ARCHS = 890 | ...``) as
    backend -> {feature: value}."""
    backends: dict[str, dict[str, str]] = {}
    current = "CPU"
    for part in text.split("|"):
        part = part.strip()
        if not part:
            continue
        if re.match(r"^[\w .-]+ : ", part):
            current, part = (s.strip() for s in part.split(" : ", 1))
        key, _, value = part.partition("=")
        backends.setdefault(current, {})[key.strip()] = value.strip()
    return backends


def llama_system_info(llama_cpp: Any) -> dict[str, dict[str, str]]:
    """:func:`parse_system_info` of this llama-cpp-python build's ``llama_print_system_info()``."""
    raw = llama_cpp.llama_print_system_info()
    return parse_system_info(raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw))


def built_in(features: dict[str, str], name: str) -> bool:
    """Whether a backend's system info lists ``name`` as compiled in (``AVX2 = 1``, ``ARCHS = 890``; not ``= 0``)."""
    return features.get(name, "0") not in ("0", "")


# llama.cpp feature names of what the CPU check reports (X86_FEATURES / ARM_FEATURES names -> ggml's)
GGML_NAMES = {"AVX2": "AVX2", "AVX-512": "AVX512", "VNNI": "AVX512_VNNI", "NEON": "NEON", "DOTPROD": "DOTPROD",
              "I8MM": "MATMUL_INT8", "SVE": "SVE"}


REBUILD = "pip install --force-reinstall --no-cache-dir --no-binary llama-cpp-python llama-cpp-python==0.3.36"
# Every AMX CPU (Sapphire Rapids and later) has these; GGML_NATIVE=OFF keeps AMX out, which a native build turns on
NO_AMX_FLAGS = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
                "-DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON")


def llama_cpu_advice(built: dict[str, str], cpu_features: dict[str, bool]) -> tuple[str, list[str]]:
    """(status, notes) for llama.cpp's CPU build on this CPU: features the CPU has and the build lacks, and its AMX
    kernels, which crashed the process (SIGSEGV in the first answer) on a 16-core Xeon VM (issue 15's GPU lease,
    benchmarks/gpu/README.md) as upstream reports say they do on some virtualised Sapphire/Granite Rapids machines.
    On an AMX CPU the rebuild advised is therefore AVX-512 with VNNI and BF16 without AMX, not a native build."""
    no_amx = f'CMAKE_ARGS="{NO_AMX_FLAGS}" {REBUILD}'
    if built_in(built, "AMX_INT8"):
        return WARN, ["llama.cpp is built with AMX (AMX_INT8 = 1): its AMX kernels have crashed the process "
                      "(SIGSEGV in the first answer) on some machines, virtual ones especially (ggml-org/llama.cpp"
                      f"#20824); if answers crash, rebuild without AMX: {no_amx}"]
    unused = [name for name, have in cpu_features.items() if have and name in GGML_NAMES and not built_in(built, GGML_NAMES[name])]
    if not unused:
        return OK, []
    how = no_amx if cpu_features.get("AMX") else f"on this machine ({REBUILD})"
    return INFO, [f"this CPU has {', '.join(unused)} but llama.cpp was not built with it: rebuild {how}"]


def check_llama(device: str | None, cpu_features: dict[str, bool]) -> Check:
    """llama-cpp-python's build: backends (CPU, CUDA, Metal, BLAS, ...), SIMD features, GPU offload."""
    try:
        import llama_cpp
    except Exception as exc:  # noqa: BLE001 - ImportError, or OSError from a shared library that does not load
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return Check("llama.cpp", FAIL, f"llama-cpp-python cannot be imported ({first}); reinstall it: "
                     "pip install --force-reinstall --no-cache-dir llama-cpp-python==0.3.36", exit_code=6)
    info = llama_system_info(llama_cpp)
    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    cpu = info.get("CPU", {})
    enabled = [k for k in cpu if built_in(cpu, k)]
    others = [b for b in info if b != "CPU"]
    summary = (f"llama-cpp-python {llama_cpp.__version__}: {', '.join(['CPU', *others])} backend"
               f"{'s' if others else ''}; GPU offload {'yes' if gpu else 'no'}")
    notes = [f"CPU features built in: {', '.join(enabled) or 'none listed'}"]
    notes += [f"{b}: {', '.join(f'{k}={v}' if v else k for k, v in info[b].items())}" for b in others]
    status, advice = llama_cpu_advice(cpu, cpu_features)
    notes += advice
    if device in ("cuda", "tensorrt") and not gpu:
        if "CUDA" in info:  # built with CUDA, but its backend found no device (llama.cpp's ggml_cuda_init line says why)
            notes.append("llama.cpp is built with CUDA but finds no GPU (no NVIDIA driver, or no device visible): "
                         "the LLM stays on the CPU")
        else:
            notes.append("--device only moves the vision encoder: the LLM stays on the CPU unless llama-cpp-python "
                         "is built with CUDA (CMAKE_ARGS=-DGGML_CUDA=on pip install --force-reinstall --no-cache-dir "
                         "llama-cpp-python==0.3.36)")
        status = WARN
    return Check("llama.cpp", status, summary, tuple(notes),
                 {"version": llama_cpp.__version__, "gpu_offload": gpu, "system_info": info})
