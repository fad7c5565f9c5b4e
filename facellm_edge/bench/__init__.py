"""``facellm-edge bench``: per-stage latency and memory of the edge path, side by side with the naive path.

Modules: ``config`` (what to measure), ``system`` (machine and versions), ``stages`` (timers, memory, isolated
subprocess runs), ``naive`` (transformers baseline), ``edge`` (ONNX Runtime + llama.cpp per precision), ``live``
(frame loop), ``report`` (JSON / Markdown / PNG), ``runner`` (orchestration).
"""
