"""What the Python API answers: :class:`FaceAnswer` per face, :class:`ImagesAnswer` per question about whole
images (each carrying the :class:`~facellm_edge.runtime.session.FaceSession` to follow up in), and
:func:`save_face_crops`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from facellm_edge.errors import OutputError
from facellm_edge.runtime.faces import Face
from facellm_edge.timings import rounded

if TYPE_CHECKING:
    from facellm_edge.runtime.session import FaceSession


@dataclass(frozen=True)
class FaceAnswer:
    """One face's answer. ``timings`` in ms (:mod:`facellm_edge.timings`): detect, align, preprocess, encode,
    image_prefill (the face's first question), question_prefill, ttft, decode. ``session`` continues the conversation:
    ``answer.session.ask("and ...?")`` (or :meth:`FaceLLM.chat <facellm_edge.runtime.pipeline.FaceLLM.chat>`)."""

    index: int
    box: tuple[float, float, float, float]
    score: float
    landmarks: tuple[tuple[float, float], ...]
    text: str
    token_ids: tuple[int, ...]
    stop_reason: str
    timings: dict[str, float]
    session: "FaceSession"
    track_id: int | None = None

    @property
    def key(self) -> str:
        """The session id (the conversation's key in the KV cache)."""
        return self.session.id

    def to_dict(self) -> dict:
        face = Face(box=self.box, score=self.score, landmarks=self.landmarks, track_id=self.track_id,
                    timings=self.timings)
        return {"face": self.index, **face.to_dict(), "answer": self.text, "stop_reason": self.stop_reason,
                "n_tokens": len(self.token_ids), "session": self.session.id}


@dataclass(frozen=True)
class ImagesAnswer:
    """The answer to one question about whole images (:meth:`FaceLLM.ask_images`). ``tiles``: tiles per image, in
    order (thumbnail included); ``n_prompt``: tokens of the whole prompt (image blocks + question), what the
    checkpoint's processor makes ``input_ids`` of for the same images and question; ``timings`` in ms: preprocess,
    encode, image_prefill, question_prefill, ttft, decode; ``session`` continues the conversation."""

    text: str
    token_ids: tuple[int, ...]
    stop_reason: str
    tiles: tuple[int, ...]
    n_prompt: int
    timings: dict[str, float]
    session: "FaceSession"

    @property
    def key(self) -> str:
        return self.session.id

    def to_dict(self) -> dict:
        return {"answer": self.text, "stop_reason": self.stop_reason, "n_tokens": len(self.token_ids),
                "tiles": list(self.tiles), "n_prompt": self.n_prompt, "timings_ms": rounded(self.timings),
                "session": self.session.id}


def save_face_crops(faces: list[Face], out_dir: Path, prefix: str = "face") -> list[Path]:
    """Write the aligned crops the model saw as PNGs (only when the user asked: faces are biometric data)."""
    import os

    import cv2

    from facellm_edge.io import atomic_file

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create --save-crops folder {out_dir}: {exc.strerror or exc}") from exc
    named = [(i, f, out_dir / (f"{prefix}{i}.png" if f.track_id is None else f"{prefix}_track{f.track_id}.png"))
             for i, f in enumerate(faces) if f.crop is not None]
    taken = [dest for _, _, dest in named if os.path.lexists(dest)]
    if taken:  # never replace a file we cannot prove is ours: the user's picture may carry that name
        raise OutputError(f"--save-crops: {taken[0]} already exists; choose an empty folder")
    paths = []
    for i, f, dest in named:
        ok, data = cv2.imencode(".png", f.crop)
        if not ok:
            raise OutputError(f"cannot encode crop {i} as PNG")
        try:  # an error or Ctrl-C: the temporary file goes, no hidden copy of a face is left behind
            with atomic_file(dest, replace=False) as tmp:
                tmp.write_bytes(data.tobytes())
        except FileExistsError as exc:  # created by someone else since the check above
            raise OutputError(f"--save-crops: {dest} already exists; choose an empty folder") from exc
        except OSError as exc:
            raise OutputError(f"cannot write {dest}: {exc.strerror or exc}") from exc
        paths.append(dest)
    return paths
