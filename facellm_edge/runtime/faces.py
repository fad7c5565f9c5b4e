"""The ``Face`` record: one detected face, enriched by each runtime stage in turn.

detect -> box, score, landmarks; track -> track_id; align -> crop; encode -> embeds;
every stage adds its wall time (milliseconds) to ``timings``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from facellm_edge.timings import rounded

# The order of the five landmarks everywhere in facellm-edge (InsightFace's ``norm_crop`` order).
LANDMARK_NAMES = ("right_eye", "left_eye", "nose", "right_mouth", "left_mouth")


@dataclass
class Face:
    """A face in one image. ``box`` is x1, y1, x2, y2 in pixels; ``landmarks`` is 5x2 (x, y), InsightFace order."""

    box: np.ndarray
    score: float
    landmarks: np.ndarray
    crop: np.ndarray | None = None  # aligned BGR crop the model sees
    track_id: int | None = None
    embeds: np.ndarray | None = None  # [num_image_tokens, llm_hidden]
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.box = np.asarray(self.box, dtype=np.float32).reshape(4)
        self.landmarks = np.asarray(self.landmarks, dtype=np.float32).reshape(5, 2)
        self.score = float(self.score)

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    @property
    def height(self) -> float:
        return float(self.box[3] - self.box[1])

    def box_json(self) -> list[float]:
        """The box in JSON: x1, y1, x2, y2 to a tenth of a pixel (in :meth:`to_dict` and the live tracks' events)."""
        return [round(float(v), 1) for v in self.box]

    def to_dict(self) -> dict:
        """The one JSON form of a face (``ask --json``, ``run --jsonl``, the server): no pixels, no embeddings."""
        return {
            "track_id": self.track_id,
            "box": self.box_json(),
            "score": round(self.score, 4),
            "landmarks": [[round(float(x), 1), round(float(y), 1)] for x, y in self.landmarks],
            "timings_ms": rounded(self.timings),
        }
