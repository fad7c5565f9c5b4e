"""Draw faces on a frame: box, five landmarks, track id, and the (streamed) answer wrapped beside the face."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from facellm_edge.runtime.faces import Face

LANDMARK_COLOURS = ((255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 0, 255), (0, 255, 255))  # BGR, InsightFace order


@dataclass(frozen=True)
class OverlayStyle:
    box_colour: tuple[int, int, int] = (80, 220, 80)
    text_colour: tuple[int, int, int] = (255, 255, 255)
    panel_colour: tuple[int, int, int] = (30, 30, 30)
    panel_alpha: float = 0.65
    font_scale: float = 0.5
    thickness: int = 1
    panel_width: int = 260  # widest answer panel (pixels)
    min_panel_width: int = 140  # narrower than this beside the face -> the panel goes below it
    max_lines: int = 12


def wrap_text(text: str, width_px: int, scale: float, thickness: int) -> list[str]:
    """Greedy word wrap measured with the real font metrics; words longer than a line are split."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if cv2.getTextSize(candidate, font, scale, thickness)[0][0] <= width_px:
                line = candidate
                continue
            if line:
                lines.append(line)
            while cv2.getTextSize(word, font, scale, thickness)[0][0] > width_px and len(word) > 1:
                cut = len(word) - 1
                while cut > 1 and cv2.getTextSize(word[:cut], font, scale, thickness)[0][0] > width_px:
                    cut -= 1
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def _panel(frame: np.ndarray, x: int, y: int, w: int, h: int, style: OverlayStyle) -> None:
    H, W = frame.shape[:2]
    x0, y0, x1, y1 = max(0, x), max(0, y), min(W, x + w), min(H, y + h)
    if x1 <= x0 or y1 <= y0:
        return
    roi = frame[y0:y1, x0:x1]
    bg = np.empty_like(roi)
    bg[:] = style.panel_colour
    cv2.addWeighted(bg, style.panel_alpha, roi, 1 - style.panel_alpha, 0, dst=roi)


def draw_face(frame: np.ndarray, face: Face, text: str = "", style: OverlayStyle = OverlayStyle()) -> None:
    """Draw one face onto ``frame`` in place."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    x1, y1, x2, y2 = (int(round(v)) for v in face.box)
    cv2.rectangle(frame, (x1, y1), (x2, y2), style.box_colour, 2)
    for (px, py), colour in zip(face.landmarks, LANDMARK_COLOURS):
        cv2.circle(frame, (int(round(px)), int(round(py))), 2, colour, -1)
    label = f"#{face.track_id}" if face.track_id is not None else f"{face.score:.2f}"
    (lw, lh), _ = cv2.getTextSize(label, font, style.font_scale, style.thickness)
    _panel(frame, x1, y1 - lh - 8, lw + 8, lh + 8, style)
    cv2.putText(frame, label, (x1 + 4, y1 - 5), font, style.font_scale, style.box_colour, style.thickness,
                cv2.LINE_AA)
    if not text:
        return
    H, W = frame.shape[:2]
    right, left = W - x2 - 8, x1 - 8
    side = max(right, left)
    if side >= style.min_panel_width:  # beside the face, on the roomier side, narrowed to fit
        pw = min(style.panel_width, side)
        px = x2 + 8 if right >= left else x1 - 8 - pw
    else:  # no room beside it: below the face
        pw = min(style.panel_width, W)
        px = min(max(0, x1), W - pw)
    lines = wrap_text(text, pw - 12, style.font_scale, style.thickness)
    if len(lines) > style.max_lines:  # keep the newest text visible while streaming
        lines = ["..."] + lines[-(style.max_lines - 1):]
    line_h = cv2.getTextSize("Ag", font, style.font_scale, style.thickness)[0][1] + 8
    ph = line_h * len(lines) + 8
    top = y1 if side >= style.min_panel_width else y2 + 8
    py = min(max(0, top), max(0, H - ph))
    _panel(frame, px, py, pw, ph, style)
    for i, line in enumerate(lines):
        cv2.putText(frame, line, (px + 6, py + (i + 1) * line_h), font, style.font_scale, style.text_colour,
                    style.thickness, cv2.LINE_AA)


def draw(frame: np.ndarray, faces: list[Face], answers: dict[int, str] | None = None,
         style: OverlayStyle = OverlayStyle(), status: str = "") -> np.ndarray:
    """An annotated copy of ``frame``; ``answers`` maps track id -> (partial) answer text."""
    out = frame.copy()
    answers = answers or {}
    for face in faces:
        text = answers.get(face.track_id, "")
        draw_face(out, face, text, style)
    if status:
        cv2.putText(out, status, (8, out.shape[0] - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 255, 255), 1,
                    cv2.LINE_AA)
    return out
