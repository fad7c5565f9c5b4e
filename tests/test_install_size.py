"""What a lean runtime install is made of, and what it does without the optional parts.

The install's size itself is measured by ``scripts/install_size.sh`` (a fresh venv per extra: minutes, so not a
test); these tests keep the shape that makes it small and clash-free: each runtime flavour is exactly one ONNX Runtime
and one OpenCV distribution, the base has neither (nor insightface, psutil or torch), a missing or broken ONNX
Runtime is one line naming the flavours, and `bench` measures memory without psutil.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from facellm_edge.doctor import flavours
from facellm_edge.errors import MissingExtraError

REPO = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _names(requirements: list[str]) -> list[str]:
    return [re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() for r in requirements]


def test_each_flavour_is_one_onnxruntime_and_one_opencv():
    project = _pyproject()
    extras = project["optional-dependencies"]
    shared = {d for dists in flavours.PROVIDERS.values() for d in dists}
    base = set(_names(project["dependencies"]))
    assert not base & (shared | {"insightface", "psutil", "torch", "transformers"}), base
    for extra, (ort, cv) in flavours.FLAVOURS.items():
        assert set(_names(extras[extra])) == {ort, cv}, extra
    for extra, reqs in extras.items():  # no other extra names one: any combination stays one of each
        if extra not in flavours.FLAVOURS:
            assert not set(_names(reqs)) & shared, extra
    assert "cpu" in extras["dev"][0] and "insightface" in extras["dev"][0]  # CI runs on the CPU flavour


def test_no_onnxruntime_is_one_line_naming_the_flavours(monkeypatch):
    from facellm_edge.onnxrt import onnxruntime_module

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` fails as if not installed
    with pytest.raises(MissingExtraError) as info:
        onnxruntime_module()
    msg = str(info.value)
    assert info.value.exit_code == 7 and "\n" not in msg
    assert msg.startswith("ONNX Runtime is not installed") and "pip install 'facellm-edge[cpu]'" in msg

    broken = flavours.missing_runtime(ImportError("cannot import name 'C' from 'onnxruntime.capi'",
                                                  name="onnxruntime.capi"))
    assert "installed but cannot be imported" in str(broken)
    assert "pip uninstall -y onnxruntime onnxruntime-gpu &&" in str(broken)
    assert flavours.missing_runtime(ImportError("no", name="torch")) is None
    no_gl = flavours.missing_runtime(ImportError("libGL.so.1: cannot open shared object file", name="cv2"))
    assert "OpenCV is installed but cannot be imported" in str(no_gl) and "choose [headless]" in str(no_gl)


def test_two_flavours_installed_over_each_other_are_named(tmp_path, monkeypatch):
    """A second ONNX Runtime distribution (its metadata, as pip leaves it) next to the installed one."""
    info = tmp_path / "onnxruntime_gpu-1.20.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-gpu\nVersion: 1.20.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert set(flavours.installed("onnxruntime")) == {"onnxruntime", "onnxruntime-gpu"}
    (line,) = [c for c in flavours.clashes() if "ONNX Runtime" in c]
    assert "onnxruntime, onnxruntime-gpu" in line and "pip uninstall -y onnxruntime onnxruntime-gpu" in line
    assert flavours.flavour() is None


_WITHOUT_PSUTIL = """
import json, sys
import psutil
truth = {"rss": psutil.Process().memory_info().rss / 2**20, "cores": psutil.cpu_count(logical=False),
         "ram": round(psutil.virtual_memory().total / 2**30, 1)}
del sys.modules["psutil"]
sys.modules["psutil"] = None  # from here on `import psutil` fails, as on a device without it
sys.modules["torch"] = None  # nor torch (machine_info asks it for its CPU kernels): a device has neither
from facellm_edge.bench.stages import RssSampler, rss_mb
from facellm_edge.bench.system import machine_info, physical_cores
with RssSampler(interval_s=0.005) as sampler:
    block = bytearray(200 * 2**20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    import time; time.sleep(0.05)
ours = {"rss": rss_mb(), "cores": physical_cores(), "ram": machine_info()["ram_gb"], "peak": sampler.peak_mb}
print(json.dumps({"truth": truth, "ours": ours}))
"""


def test_bench_memory_and_machine_without_psutil():
    pytest.importorskip("psutil")  # the reference values
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_PSUTIL], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    truth, ours = out["truth"], out["ours"]
    assert ours["peak"] > truth["rss"] + 150  # the sampler saw the 200 MB block
    assert ours["rss"] > truth["rss"] + 150  # still held
    assert ours["ram"] == pytest.approx(truth["ram"], abs=0.2)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file() and "core id" in cpuinfo.read_text():  # x86 Linux lists cores: the count must agree
        assert ours["cores"] == truth["cores"]
    assert ours["cores"] >= 1


def test_the_runtime_imports_no_insightface_torch_or_psutil():
    code = ("import sys\n"
            "import facellm_edge.runtime.pipeline, facellm_edge.runtime.live.loop, facellm_edge.commands.runtime\n"
            "import facellm_edge.doctor.run, facellm_edge.runtime.detect.yunet, facellm_edge.runtime.align\n"
            "print(sorted(m for m in ('insightface', 'torch', 'transformers', 'psutil', 'skimage', 'scipy') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
