"""`facellm-edge doctor` run for real (every check on this machine), its report and exit codes; the pieces it is
made of (the hand-written tiny ONNX model, llama.cpp's system info, camera probing with an injected camera, the
display rule `run` uses); and `run` going headless where there is no display."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from facellm_edge.cli import main
from facellm_edge.doctor.cameras import check_cameras
from facellm_edge.doctor.display import display_problem, opencv_gui
from facellm_edge.doctor.engines import parse_system_info, probe_provider, tiny_model

CHECKS = ["python", "versions", "flavour", "cpu", "onnxruntime", "llama.cpp", "detector", "display", "cameras",
          "storage"]


def _doctor_json(args: list[str], capsys) -> tuple[int, dict, list[str]]:
    rc = main(["doctor", "--json", *args])
    captured = capsys.readouterr()
    return rc, json.loads(captured.out), captured.err.strip().splitlines()


def test_doctor_checks_this_machine(capsys):
    rc, report, err = _doctor_json([], capsys)
    assert rc == 0 and err == [] and report["schema"] == "facellm-edge-doctor/1" and report["ok"] is True
    by_name = {c["name"]: c for c in report["checks"]}
    assert [c["name"] for c in report["checks"]] == CHECKS
    assert all(c["status"] in ("ok", "info", "warn") for c in report["checks"])
    versions = by_name["versions"]["data"]["versions"]
    assert {"python", "numpy", "llama-cpp-python", "facellm-edge", "onnxruntime", "opencv-python"} <= set(versions)
    assert by_name["flavour"]["data"]["flavour"] == "cpu"  # the dev install: [cpu]
    assert "CPUExecutionProvider" in by_name["onnxruntime"]["data"]["initialise"]
    assert by_name["llama.cpp"]["data"]["system_info"]["CPU"]  # the build's CPU features, parsed
    cpu = by_name["cpu"]["data"]
    if cpu["arch"] == "x86_64":
        assert set(cpu["features"]) == {"AVX2", "AVX-512", "VNNI", "AMX"}
        assert any(n.startswith("AVX2: ") for n in by_name["cpu"]["notes"])  # one line of meaning per feature
    assert by_name["storage"]["data"]["facellm-edge cache"]["free_bytes"] > 0

    assert main(["doctor"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in text if line[:1] in "oiwf" and not line.startswith(" ")][:len(CHECKS)] == CHECKS
    assert text[-1] == "no problems"


def test_doctor_exit_codes_name_what_cannot_work(tmp_path, capsys):
    rc, report, err = _doctor_json(["--bundle", str(tmp_path / "none")], capsys)
    assert rc == 3 and report["ok"] is False
    assert len(err) == 1 and err[0].startswith("error: doctor: 1 problem: bundle: bundle not found")
    assert report["checks"][-1]["name"] == "bundle" and report["checks"][-1]["status"] == "fail"

    if not Path("/dev/video97").exists():
        rc, report, err = _doctor_json(["--camera", "97"], capsys)
        assert rc == 3 and len(err) == 1 and "cameras: camera 97: does not open" in err[0]

    rc, report, err = _doctor_json(["--device", "cuda"], capsys)
    ort = {c["name"]: c for c in report["checks"]}["onnxruntime"]
    if "CUDAExecutionProvider" in ort["data"]["initialise"]:
        assert rc == 0
    else:  # a CPU build (or no usable CUDA): --device cuda cannot work here
        assert rc == 6 and ort["status"] == "fail" and "--device cuda: CUDAExecutionProvider" in err[0]

    assert main(["doctor", "--device", "gpu"]) == 2  # not a device: a usage error, before any check
    assert "unknown device 'gpu'" in capsys.readouterr().err


def test_doctor_without_a_runtime_flavour_or_insightface(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` fails as if not installed
    monkeypatch.setitem(sys.modules, "insightface", None)
    rc, report, err = _doctor_json(["--detector", "scrfd"], capsys)
    by_name = {c["name"]: c for c in report["checks"]}
    assert rc == 7 and by_name["flavour"]["status"] == "fail"
    assert "pip install 'facellm-edge[cpu]'" in by_name["flavour"]["summary"]
    assert by_name["detector"]["status"] == "fail" and "facellm-edge[insightface]" in by_name["detector"]["summary"]
    assert len(err) == 1 and err[0].startswith("error: doctor: 2 problems: flavour:")


@pytest.mark.slow  # tiny_bundle
def test_doctor_checks_a_bundles_hashes(tiny_bundle, tmp_path, capsys):
    rc, report, _ = _doctor_json(["--bundle", str(tiny_bundle)], capsys)
    bundle = report["checks"][-1]
    assert rc == 0 and bundle["status"] == "ok" and set(bundle["data"]["llm"]) == {"f32", "q8_0"}

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_bundle, damaged)
    onnx_file = damaged / "vision" / "int8.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    rc, report, err = _doctor_json(["--bundle", str(damaged)], capsys)
    assert rc == 3 and "vision/int8.onnx: sha256 mismatch" in report["checks"][-1]["summary"] and len(err) == 1


@pytest.mark.filterwarnings("ignore:Specified provider")  # the unknown one below, on purpose
def test_tiny_model_is_valid_onnx_and_runs_on_cpu():
    onnx = pytest.importorskip("onnx")  # the runtime writes it without onnx; onnx (dev) checks it
    model = onnx.load_from_string(tiny_model())
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ["Relu"] and model.opset_import[0].version == 13

    from facellm_edge.onnxrt import onnxruntime_module

    ort = onnxruntime_module()
    assert probe_provider(ort, "CPUExecutionProvider") is None
    assert probe_provider(ort, "NoSuchExecutionProvider") is not None  # a failure is a reason, not an exception


def test_llama_system_info_parsing():
    info = parse_system_info("CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 0 | CUDA : ARCHS = 890 | USE_GRAPHS = 1 | "
                             "PEER_MAX_BATCH_SIZE = 128 | ")
    assert info == {"CPU": {"SSE3": "1", "AVX2": "1", "AVX512": "0"},
                    "CUDA": {"ARCHS": "890", "USE_GRAPHS": "1", "PEER_MAX_BATCH_SIZE": "128"}}


# llama_print_system_info() of the two builds run on issue 15's GPU lease (a 16-core Xeon VM with AVX-512 and AMX)
NATIVE_AMX = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX_VNNI = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
              "AVX512 = 1 | AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | "
              "OPENMP = 1 | REPACK = 1 | ")
PORTABLE_AVX2 = "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | LLAMAFILE = 1 | "


def test_llama_advice_never_sends_an_amx_cpu_to_a_native_build():
    """A native build on that VM had AMX_INT8 = 1 and crashed (SIGSEGV) where the portable build ran: on an AMX CPU
    doctor warns about such a build and advises AVX-512 without AMX, never the native rebuild that turns AMX on."""
    from facellm_edge.doctor.engines import NO_AMX_FLAGS, REBUILD, llama_cpu_advice
    from facellm_edge.doctor.report import INFO, OK, WARN

    amx_cpu = {"AVX2": True, "AVX-512": True, "VNNI": True, "AMX": True}
    status, notes = llama_cpu_advice(parse_system_info(NATIVE_AMX)["CPU"], amx_cpu)
    assert status == WARN and "AMX_INT8 = 1" in notes[0] and NO_AMX_FLAGS in notes[0] and "GGML_NATIVE=OFF" in notes[0]
    status, notes = llama_cpu_advice(parse_system_info(PORTABLE_AVX2)["CPU"], amx_cpu)
    assert status == INFO and "AVX-512, VNNI" in notes[0] and NO_AMX_FLAGS in notes[0]
    assert "on this machine" not in notes[0]
    # without AMX a native build is the advice, and a build that uses every feature needs none
    avx512_cpu = {"AVX2": True, "AVX-512": True, "VNNI": True, "AMX": False}
    status, notes = llama_cpu_advice(parse_system_info(PORTABLE_AVX2)["CPU"], avx512_cpu)
    assert status == INFO and f"on this machine ({REBUILD})" in notes[0] and NO_AMX_FLAGS not in notes[0]
    no_amx_build = parse_system_info(NATIVE_AMX.replace("AMX_INT8 = 1", "AMX_INT8 = 0"))["CPU"]
    assert llama_cpu_advice(no_amx_build, amx_cpu) == (OK, [])


class _Camera:
    """A camera as cv2.VideoCapture presents one (index 0 opens at 640x480, 30 FPS; others do not open)."""

    def __init__(self, index: int) -> None:
        self.index, self.released = index, False

    def isOpened(self) -> bool:
        return self.index == 0

    def read(self):
        return True, np.zeros((480, 640, 3), np.uint8)

    def get(self, prop: int) -> float:
        return 30.0

    def release(self) -> None:
        self.released = True


def test_cameras_are_listed_opened_when_asked_and_fail_when_asked_for_in_vain():
    opened: list[_Camera] = []

    def opener(index):
        opened.append(_Camera(index))
        return opened[-1]

    listed = check_cameras((), scan=False, opener=opener, devices=[0, 1])
    assert listed.status == "info" and "/dev/video0, /dev/video1" in listed.summary and not opened

    asked = check_cameras((0,), opener=opener, devices=[0, 1])
    assert asked.status == "ok" and asked.notes == ("camera 0: 640x480 at 30 FPS",)
    assert asked.data["probed"] == [{"index": 0, "opens": True, "width": 640, "height": 480, "fps": 30.0}]

    scanned = check_cameras((), scan=True, opener=opener, devices=[0, 1])
    assert scanned.status == "ok" and scanned.summary == "open: 0" and "camera 1: does not open" in scanned.notes

    missing = check_cameras((0, 1), opener=opener, devices=[0, 1])
    assert missing.status == "fail" and missing.exit_code == 3 and missing.summary == "camera 1: does not open"
    assert all(c.released for c in opened)


def test_display_rule():
    assert display_problem({}, "linux", gui="QT5").startswith("no display")
    assert display_problem({"DISPLAY": ":0"}, "linux", gui="QT5") is None
    assert display_problem({"WAYLAND_DISPLAY": "wayland-0"}, "linux", gui="QT5") is None
    assert display_problem({"QT_QPA_PLATFORM": "eglfs"}, "linux", gui="QT5") is None  # a kiosk's framebuffer
    assert "no GUI" in display_problem({"DISPLAY": ":0"}, "linux", gui=None)
    assert display_problem({}, "darwin", gui="COCOA") is None
    assert opencv_gui("  GUI:                           NONE\n") is None
    assert opencv_gui("  GUI:                           QT5\n    QT:   YES (ver 5.15)\n") == "QT5"
    assert opencv_gui("  GUI: \n    QT:                          NO\n    GTK+:                        YES (ver 3.24)\n"
                      "\n  Media I/O:\n") == "GTK+"


def _no_display_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    return {**env, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def test_run_display_refuses_without_a_display(tmp_path):
    """--display where none can open: one line, exit 2, before any bundle or source is touched (Qt would abort the
    process with SIGABRT)."""
    if sys.platform != "linux":
        pytest.skip("the display rule needs DISPLAY / WAYLAND_DISPLAY on Linux only")
    proc = subprocess.run([sys.executable, "-m", "facellm_edge.cli", "run", "--source", str(tmp_path / "x.jpg"),
                           "--question", "Age?", "--display", "--bundle", str(tmp_path / "none")],
                          env=_no_display_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "--display cannot open a window: no display" in proc.stderr


@pytest.mark.slow  # tiny_bundle
def test_run_without_a_display_goes_headless(tiny_bundle, astronaut_bgr, tmp_path):
    """No DISPLAY and no --no-display: `run` answers headless (JSON lines on stdout) after one line saying so."""
    if sys.platform != "linux":
        pytest.skip("the display rule needs DISPLAY / WAYLAND_DISPLAY on Linux only")
    import cv2

    photo = tmp_path / "a.jpg"
    cv2.imwrite(str(photo), astronaut_bgr)
    proc = subprocess.run([sys.executable, "-m", "facellm_edge.cli", "run", "--source", str(photo), "--question",
                           "Age?", "--bundle", str(tiny_bundle), "--max-tokens", "2"],
                          env=_no_display_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    headless = [line for line in proc.stderr.splitlines() if "running headless" in line]
    assert len(headless) == 1 and "no display" in headless[0]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert records and all("answer" in r for r in records)


def test_a_cache_that_cannot_be_written_fails_the_storage_check(tmp_path, monkeypatch, capsys):
    """XDG_CACHE_HOME naming a file: doctor said "no problems", then `pull` failed with exit 4."""
    blocker = tmp_path / "cache-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    rc, report, _ = _doctor_json([], capsys)
    storage = next(c for c in report["checks"] if c["name"] == "storage")
    assert rc == 4 and storage["status"] == "fail" and report["ok"] is False
    assert f"{blocker} is a file, not a folder" in storage["summary"]
