"""Export a FaceLLM / InternVL checkpoint to a bundle (ONNX vision encoder + GGUF LLM).

``checkpoint`` resolves, validates and loads the checkpoint; ``onnx_vision`` exports, quantises and verifies the
vision encoder; ``exporter`` (the orchestrator) ties the steps together into a bundle.
"""
