"""README.md's promises, checked: the Python API example runs as written, the layout names real folders."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_api_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Python API"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README's Python API section has no python block"
    return match.group(1)


@pytest.mark.slow  # tiny_bundle, six faces answered in a fresh process
def test_python_api_example_runs_as_written(tiny_bundle, t1_bgr, astronaut_bgr, tmp_path):
    """The example, byte for byte, in a folder holding what it names: the tests' tiny bundle (real ONNX vision
    tower, real GGUF) at bundles/facellm-1b-q4km, a group photo and two portraits; the packaged YuNet detects."""
    (tmp_path / "bundles").mkdir()
    os.symlink(tiny_bundle, tmp_path / "bundles" / "facellm-1b-q4km")
    cv2.imwrite(str(tmp_path / "group.jpg"), t1_bgr)
    cv2.imwrite(str(tmp_path / "a.jpg"), astronaut_bgr)
    cv2.imwrite(str(tmp_path / "b.jpg"), cv2.flip(astronaut_bgr, 1))
    code = _python_api_example()
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    # six faces of the group photo, each answered with its box and stage timings, then its follow-up
    assert out.count("'image_prefill'") == 6 and out.count("'ttft'") >= 6
    assert out.rstrip().endswith(")")  # the last line prints the tiles of the two images: (1, 1) or more
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jpg", "b.jpg", "bundles", "group.jpg"]  # nothing written


def test_layout_names_real_folders():
    text = README.read_text(encoding="utf-8")
    layout = text[text.index("## Layout"):]
    root = README.parent
    named = re.findall(r"^ {4}(?: {2})*([a-z_]+/)", layout, re.M)
    assert len(named) >= 8
    for folder in named:
        candidates = [root / folder, root / "facellm_edge" / folder, root / "facellm_edge" / "runtime" / folder]
        assert any(c.is_dir() for c in candidates), folder


@pytest.mark.parametrize("name", ["FaceLLM", "FaceSession", "RuntimeConfig", "GenerationConfig", "SessionError"])
def test_the_api_names_the_readme_uses_are_importable_from_the_package(name):
    import facellm_edge

    assert getattr(facellm_edge, name).__name__ == name
