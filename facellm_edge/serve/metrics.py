"""The service's Prometheus metrics (``GET /metrics``), in a registry of their own: several servers (or tests) in one
process never share counters, and nothing of the host process leaks into them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

_TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)
_RATE_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 50.0, 75.0, 100.0, 150.0, 250.0, 500.0)


class Metrics:
    """One server's metrics. Route labels are route templates (``/v1/faces/{session}``), never raw paths, so the
    label set stays bounded whatever clients send."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("facellm_http_requests", "HTTP requests answered, by route template and status.",
                                ("route", "status"), registry=r)
        self.queue_depth = Gauge("facellm_queue_depth", "Requests waiting for the model (not counting the one "
                                 "running).", registry=r)
        self.ttft_seconds = Histogram("facellm_ttft_seconds", "Time from a request's arrival to its first answer "
                                      "token.", buckets=_TTFT_BUCKETS, registry=r)
        self.decode_tokens_per_s = Histogram("facellm_decode_tokens_per_second", "Decode rate of each answer.",
                                             buckets=_RATE_BUCKETS, registry=r)
        self.live_fps = Gauge("facellm_live_fps", "Frames per second of the live loop.", registry=r)
        self.live_dropped_frames = Gauge("facellm_live_dropped_frames", "Frames the live loop dropped or could not "
                                         "read so far.", registry=r)
        self.live_tracked_faces = Gauge("facellm_live_tracked_faces", "Faces tracked in the latest live frame.",
                                        registry=r)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric (``CONTENT_TYPE``)."""
        return generate_latest(self.registry)
