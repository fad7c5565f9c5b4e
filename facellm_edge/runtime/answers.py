"""What the Python API answers (:class:`FaceAnswer` per face, :class:`ImagesAnswer` per question about whole
images) and :func:`save_face_crops`. Re-exported by :mod:`facellm_edge.runtime.pipeline`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Hashable

from facellm_edge.errors import OutputError
from facellm_edge.runtime.faces import Face


@dataclass(frozen=True)
class FaceAnswer:
    """One face's answer. ``timings`` in ms: detect, align, encode (the batched call), prefill (image prefix),
    ttft (question prefill + first token), decode. ``key`` names its cached conversation for :meth:`FaceLLM.chat`."""

    index: int
    box: tuple[float, float, float, float]
    score: float
    landmarks: tuple[tuple[float, float], ...]
    text: str
    token_ids: tuple[int, ...]
    stop_reason: str
    timings: dict[str, float]
    key: Hashable
    track_id: int | None = None

    def to_dict(self) -> dict:
        return {
            "face": self.index, "track_id": self.track_id,
            "box": [round(v, 1) for v in self.box], "score": round(self.score, 4),
            "landmarks": [[round(x, 1), round(y, 1)] for x, y in self.landmarks],
            "answer": self.text, "stop_reason": self.stop_reason, "n_tokens": len(self.token_ids),
            "timings_ms": {k: round(v, 2) for k, v in self.timings.items()},
        }


@dataclass(frozen=True)
class ImagesAnswer:
    """The answer to one question about whole images (:meth:`FaceLLM.ask_images`). ``tiles``: tiles per image, in
    order (thumbnail included); ``n_prompt``: tokens of the whole prompt (image blocks + question), what the
    checkpoint's processor makes ``input_ids`` of for the same images and question; ``timings`` in ms: preprocess,
    encode, prefill, ttft, decode; ``key`` names the cached conversation for :meth:`FaceLLM.chat`."""

    text: str
    token_ids: tuple[int, ...]
    stop_reason: str
    tiles: tuple[int, ...]
    n_prompt: int
    timings: dict[str, float]
    key: Hashable

    def to_dict(self) -> dict:
        return {"answer": self.text, "stop_reason": self.stop_reason, "n_tokens": len(self.token_ids),
                "tiles": list(self.tiles), "n_prompt": self.n_prompt,
                "timings_ms": {k: round(v, 2) for k, v in self.timings.items()}}



def save_face_crops(faces: list[Face], out_dir: Path, prefix: str = "face") -> list[Path]:
    """Write the aligned crops the model saw as PNGs (only when the user asked: faces are biometric data)."""
    import os

    import cv2

    from facellm_edge.io import commit_temp_file, temp_file_beside

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
        tmp = temp_file_beside(dest)
        try:
            tmp.write_bytes(data.tobytes())
            commit_temp_file(tmp, dest, replace=False)
        except FileExistsError as exc:  # created by someone else since the check above
            raise OutputError(f"--save-crops: {dest} already exists; choose an empty folder") from exc
        except OSError as exc:
            raise OutputError(f"cannot write {dest}: {exc.strerror or exc}") from exc
        finally:  # an error or Ctrl-C: no hidden copy of a face is left behind
            tmp.unlink(missing_ok=True)
        paths.append(dest)
    return paths
