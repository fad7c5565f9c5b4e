"""A face's box in JSON, written once (``Face.box_json``): the answer records and the live loop's track events agree."""

from __future__ import annotations

import json

import numpy as np

from facellm_edge.runtime.faces import Face
from facellm_edge.runtime.live.control import LiveControl
from facellm_edge.runtime.live.loop import _emit_tracks


def test_box_json_is_plain_floats_to_a_tenth_of_a_pixel_everywhere():
    face = Face(box=np.array([10.04, 20.06, 110.56, 140.0]), score=0.912345, landmarks=np.zeros((5, 2)), track_id=3)
    assert face.box_json() == [10.0, 20.1, 110.6, 140.0]
    assert json.loads(json.dumps(face.to_dict()))["box"] == face.box_json()
    events: list[tuple[str, dict]] = []
    _emit_tracks(LiveControl(on_event=lambda kind, payload: events.append((kind, payload))), "cam", 7, [face], [2], 2)
    assert [kind for kind, _ in events] == ["track_lost", "track_appeared", "tracks"]
    assert events[1][1]["box"] == face.box_json()
    assert events[2][1]["tracks"] == [{"track_id": 3, "box": face.box_json(), "score": 0.9123}]
