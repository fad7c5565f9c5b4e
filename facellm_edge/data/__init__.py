"""FairFaceGPT-style data generation: attribute labels -> prompts -> multimodal LLM -> ShareGPT JSONL.

Modules: ``labels`` (label CSV), ``prompts`` (prompt families + response validation), ``backends`` (OpenAI-compatible
HTTP client, local GGUF via llama-cpp-python), ``build`` (resumable, concurrent, rate-limited builder),
``fairfacegpt`` (import of the published dataset.json).
"""
