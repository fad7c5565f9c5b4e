"""Vision tower + pixel shuffle + projector -> one ONNX graph (``pixel_values`` -> ``image_embeds``).

:class:`VisionEncoder` computes exactly what ``InternVLModel.get_image_features`` computes, by calling the model's
own submodules (``vision_tower``, ``pixel_shuffle``, ``multi_modal_projector``) with the selection read from the
config. It is exported with the dynamo-based ``torch.onnx.export`` (the maintained exporter; the example input has
batch 2 so that the batch dimension stays dynamic). Weights larger than ONNX's 2 GB protobuf limit go to one external
data file beside the graph; :func:`onnx_files` lists every file a graph needs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from facellm_edge import __version__
from facellm_edge.errors import ExportError, require
from facellm_edge.onnxrt import onnxruntime_module

log = logging.getLogger(__name__)

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "image_embeds"
DEFAULT_OPSET = 18
# Weights above this go to external data (protobuf's hard limit is 2 GiB; leave room for the graph itself).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# The dynamo exporter specialises a batch of 1; an example batch of 2 keeps the batch dimension symbolic.
EXAMPLE_BATCH = 2

torch = require("torch", "export")


class VisionEncoder(torch.nn.Module):
    """``pixel_values [B,3,H,W] float32 -> image_embeds [B, T, llm_hidden]`` as ``get_image_features`` computes it."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        inner = getattr(model, "model", model)  # InternVLForConditionalGeneration -> InternVLModel
        for name in ("vision_tower", "multi_modal_projector", "pixel_shuffle"):
            if not hasattr(inner, name):
                raise ExportError(f"{type(model).__name__} has no {name}: not a transformers InternVL model")
        config = inner.config
        layer = config.vision_feature_layer
        if not isinstance(layer, int):
            raise ExportError(f"vision_feature_layer={layer!r}: only a single feature layer is supported")
        if config.vision_feature_select_strategy not in ("default", "full"):
            raise ExportError(f"unknown vision_feature_select_strategy {config.vision_feature_select_strategy!r}")
        self.vision_tower = inner.vision_tower
        self.multi_modal_projector = inner.multi_modal_projector
        # A bound method stored as a plain attribute: the LLM is not registered as a submodule of the encoder.
        object.__setattr__(self, "_pixel_shuffle", inner.pixel_shuffle)
        self.feature_layer = layer
        self.drop_cls = config.vision_feature_select_strategy == "default"
        self.downsample_ratio = float(config.downsample_ratio)
        vc = config.vision_config
        self.patches_per_side = int(vc.image_size[0]) // int(vc.patch_size[0])
        self.tokens_per_tile = int(round(self.patches_per_side**2 * self.downsample_ratio**2))
        self.hidden_size = int(config.text_config.hidden_size)
        self.image_size = int(vc.image_size[0])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        want_hidden = self.feature_layer != -1
        out = self.vision_tower(pixel_values=pixel_values, output_hidden_states=want_hidden, return_dict=True)
        features = out.hidden_states[self.feature_layer] if want_hidden else out.last_hidden_state
        if self.drop_cls:
            features = features[:, 1:, :]
        side = self.patches_per_side
        features = features.reshape(features.shape[0], side, side, features.shape[-1])
        features = self._pixel_shuffle(features, scale_factor=self.downsample_ratio)
        features = features.reshape(features.shape[0], -1, features.shape[-1])
        return self.multi_modal_projector(features)


def _param_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def export_vision_onnx(model: Any, out_path: Path, image_size: int, *, mean: Sequence[float] | None = None,
                       std: Sequence[float] | None = None, source_model: str | None = None,
                       opset: int = DEFAULT_OPSET) -> Path:
    """Export the vision encoder of ``model`` to ``out_path`` (one graph, dynamic batch); return ``out_path``.

    ``mean``/``std``/``source_model`` are written into the graph's ``metadata_props`` when given (the bundle's
    manifest is the authoritative copy; the metadata makes a lone .onnx file self-describing).
    """
    out_path = Path(out_path)
    encoder = VisionEncoder(model).eval()
    if image_size != encoder.image_size:
        raise ExportError(f"image size {image_size} differs from the vision config's {encoder.image_size}; "
                          "the position embeddings are trained for the config's size")
    if _param_dtype(encoder) != torch.float32:
        raise ExportError(f"the vision tower is {_param_dtype(encoder)}; load the checkpoint in float32 to export")
    example = torch.randn(EXAMPLE_BATCH, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=1024)
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                encoder, (example,), None, dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                opset_version=opset, dynamic_shapes={"pixel_values": {0: batch}}, optimize=True,
                verbose=False,
            )
    except Exception as exc:  # torch.export / onnxscript raise many unrelated types
        raise ExportError(f"torch.onnx export of the vision encoder failed: {type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc
    metadata = {
        "producer": f"facellm-edge {__version__}",
        "image_size": str(image_size),
        "tokens_per_tile": str(encoder.tokens_per_tile),
        "hidden_size": str(encoder.hidden_size),
        "downsample_ratio": str(encoder.downsample_ratio),
        "input": f"{INPUT_NAME} [batch,3,{image_size},{image_size}] float32, normalised RGB",
        "output": f"{OUTPUT_NAME} [batch,{encoder.tokens_per_tile},{encoder.hidden_size}] float32",
    }
    if mean is not None:
        metadata["mean"] = ",".join(f"{float(x):.6g}" for x in mean)
    if std is not None:
        metadata["std"] = ",".join(f"{float(x):.6g}" for x in std)
    if source_model is not None:
        metadata["source_model"] = str(source_model)
    program.model.metadata_props.update(metadata)
    weight_bytes = sum(p.numel() * p.element_size() for p in encoder.parameters())
    external = weight_bytes > EXTERNAL_DATA_THRESHOLD
    out_path.parent.mkdir(parents=True, exist_ok=True)
    program.save(out_path, external_data=external)
    log.info("vision ONNX fp32 -> %s (%.1f MB weights%s)", out_path, weight_bytes / 1e6,
             ", external data" if external else "")
    return out_path


def read_metadata(onnx_path: Path) -> dict[str, str]:
    onnx = require("onnx", "export")
    model = onnx.load(str(onnx_path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def onnx_files(onnx_path: Path) -> list[Path]:
    """``onnx_path`` plus every external data file it references (to record in the manifest)."""
    onnx = require("onnx", "export")
    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path), load_external_data=False)
    locations: set[str] = set()
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if onnx.external_data_helper.uses_external_data(tensor):
            info = onnx.external_data_helper.ExternalDataInfo(tensor)
            locations.add(info.location)
    return [onnx_path, *(onnx_path.parent / loc for loc in sorted(locations))]


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quantize_vision_int8(fp32_path: Path, int8_path: Path) -> Path:
    """ONNX Runtime dynamic quantisation: QInt8 weights, MatMul only; attention fused into ORT's CPU kernel;
    keeps the fp32 graph's metadata_props."""
    from facellm_edge.export.onnx_fuse import fuse_attention

    onnx = require("onnx", "export")
    quantization = onnxruntime_module("export", "onnxruntime.quantization")
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    external = len(onnx_files(fp32_path)) > 1
    metadata = read_metadata(fp32_path)
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    # The quantiser advises "pre-processing" on the root logger; for dynamic MatMul quantisation it changes nothing.
    advice = _DropMessage("Please consider to run pre-processing before quantization")
    logging.getLogger().addFilter(advice)
    try:
        quantization.quantize_dynamic(
            fp32_path, int8_path, weight_type=quantization.QuantType.QInt8, op_types_to_quantize=["MatMul"],
            use_external_data_format=external,
        )
    except Exception as exc:  # onnxruntime.quantization raises plain Exceptions
        raise ExportError(f"int8 quantisation of {fp32_path.name} failed: {exc}") from exc
    finally:
        logging.getLogger().removeFilter(advice)
    model = onnx.load(str(int8_path), load_external_data=False)
    # The int8 graph only ever runs on CPUs: give it ONNX Runtime's fused CPU attention (see onnx_fuse).
    fusion = fuse_attention(model, base_dir=int8_path.parent)
    del model.metadata_props[:]
    for key, value in {**metadata, "quantization": "onnxruntime dynamic QInt8 (MatMul)",
                       "attention": f"com.microsoft.MultiHeadAttention x{fusion.fused}"
                                    + (f", {fusion.skipped} unfused" if fusion.skipped else "")}.items():
        model.metadata_props.add(key=key, value=value)
    # External tensors keep their relative locations: only the graph file is rewritten.
    onnx.save(model, str(int8_path))
    log.info("vision ONNX int8 -> %s", int8_path)
    return int8_path


def _session(onnx_path: Path) -> Any:
    ort = onnxruntime_module("export")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's errors are not a public class hierarchy
        raise ExportError(f"ONNX Runtime cannot load {onnx_path}: {exc}") from exc


def verify_vision(model: Any, onnx_path: Path, batch_sizes: Sequence[int] = (1, 3), seed: int = 0) -> dict[str, Any]:
    """Run the ONNX graph (ORT CPU) and torch on the same random pixels; report the differences per batch size.

    Returns ``{"batch_<n>": {max_abs_diff, max_rel_diff, cosine}, ..., "max_abs_diff", "max_rel_diff",
    "cosine_min", "seed"}``; ``max_rel_diff`` is relative to ``max |torch|``, ``cosine`` is over the flattened
    outputs.
    """
    import numpy as np

    encoder = VisionEncoder(model).eval()
    session = _session(onnx_path)
    generator = torch.Generator().manual_seed(seed)
    report: dict[str, Any] = {}
    for b in batch_sizes:
        pixels = torch.randn(b, 3, encoder.image_size, encoder.image_size, generator=generator)
        with torch.no_grad():
            expected = encoder(pixels.to(_param_dtype(encoder))).float().numpy().astype(np.float64)
        got = session.run([OUTPUT_NAME], {INPUT_NAME: pixels.numpy()})[0].astype(np.float64)
        if got.shape != expected.shape:
            raise ExportError(f"ONNX output shape {got.shape} != torch {expected.shape} for batch {b}")
        diff = np.abs(got - expected)
        scale = float(np.abs(expected).max())
        cosine = float(np.dot(got.ravel(), expected.ravel())
                       / (np.linalg.norm(got.ravel()) * np.linalg.norm(expected.ravel()) + 1e-30))
        report[f"batch_{b}"] = {"max_abs_diff": float(diff.max()),
                                "max_rel_diff": float(diff.max() / scale) if scale > 0 else float(diff.max()),
                                "cosine": cosine}
    per_batch = [v for v in report.values()]
    report["max_abs_diff"] = max(v["max_abs_diff"] for v in per_batch)
    report["max_rel_diff"] = max(v["max_rel_diff"] for v in per_batch)
    report["cosine_min"] = min(v["cosine"] for v in per_batch)
    report["seed"] = seed
    log.info("verified %s: max abs %.3g, cosine %.6f", Path(onnx_path).name, report["max_abs_diff"],
             report["cosine_min"])
    return report
