"""Render the live overlay on the astronaut photo with a sample streamed answer and save it as a PNG.

    python scripts/overlay_screenshot.py [--out overlay.png] [--detector-model ../shared/models/...onnx]

Uses the real YuNet detector (the cached/pinned model, or --detector-model) and the runtime's own overlay code.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
from skimage import data

from facellm_edge.runtime.detect import DetectorConfig, create_detector
from facellm_edge.runtime.live.overlay import draw

SAMPLE = ("The person appears to be a woman in her early forties, smiling, with short brown hair, "
          "wearing an orange spacesuit in front of an American flag.")


def main() -> None:
    repo = Path(__file__).resolve().parents[1]
    shared = repo.parent / "shared" / "models" / "face_detection_yunet_2023mar.onnx"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("overlay.png"))
    ap.add_argument("--detector-model", type=Path, default=shared if shared.is_file() else None)
    ap.add_argument("--tokens", type=int, default=0, help="Show only the first N words (a mid-stream frame).")
    args = ap.parse_args()
    image = np.ascontiguousarray(data.astronaut()[:, :, ::-1])
    faces = create_detector(DetectorConfig(model_path=args.detector_model)).detect(image)
    for i, f in enumerate(faces, 1):
        f.track_id = i
    words = SAMPLE.split(" ")
    text = " ".join(words[: args.tokens]) if args.tokens else SAMPLE
    out = draw(image, faces, {f.track_id: text for f in faces}, status="sample answer (not model output)")
    if not cv2.imwrite(str(args.out), out):
        raise SystemExit(f"cannot write {args.out}")
    print(f"wrote {args.out} ({len(faces)} face(s))")


if __name__ == "__main__":
    main()
