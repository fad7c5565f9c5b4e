"""``facellm-edge bench``: per-stage latency and memory of the edge path, side by side with the naive path.

Modules: ``config`` (what to measure), ``system`` (machine and versions), ``stages`` (timers, memory, isolated
subprocess runs), ``naive`` (transformers baseline), ``edge`` (the runtime, ``FaceLLM``, per vision precision x GGUF
quant, and the llama.cpp peer), ``live`` (the runtime's live loop, ``run_live``), ``profiles``, ``roofline``,
``report`` (JSON / Markdown / PNG), ``runner`` (orchestration). Stage names: :mod:`facellm_edge.timings`.
"""
