"""numpy/OpenCV preprocessing vs transformers' own InternVL image processor (GotOcr2ImageProcessor)."""

from __future__ import annotations

import numpy as np
import pytest

from facellm_edge.align import CropConfig, align_face
from facellm_edge.bundle import ImageSpec
from facellm_edge.preprocess import crop_to_pixels, crops_to_pixels, optimal_grid, tile_image

# cv2 INTER_CUBIC vs torchvision's antialiased bicubic, in normalised units (1 unit = std * 255 ~ 57-58 grey
# levels). Measured: astronaut (1 tile) mean |diff| 0.012 (p99 0.11); t1 (3x2 + thumbnail) 0.0096 (p99 0.12);
# t1 twice side by side (6x2 + thumbnail) 0.010 (p99 0.14, max 1.6 on aliased edges of the 5.7x thumbnail).
TILED_MEAN_ABS_TOL = 0.03


@pytest.fixture(scope="module")
def full_processor(tiny_checkpoint):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def processor(full_processor):
    return full_processor.image_processor


@pytest.fixture(scope="module")
def spec(full_processor) -> ImageSpec:
    from facellm_edge.export.prompt import image_spec  # the same ImageSpec the exporter writes into bundles

    return image_spec(full_processor)


def _hf(processor, image_bgr, crop_to_patches):
    out = processor(images=[np.ascontiguousarray(image_bgr[..., ::-1])], crop_to_patches=crop_to_patches,
                    return_tensors="np")
    return np.asarray(out["pixel_values"], dtype=np.float32)


def test_face_crop_is_exact(processor, spec, astronaut_bgr, yunet_model):
    from facellm_edge.detect import DetectorConfig, create_detector

    face = create_detector(DetectorConfig(model_path=yunet_model)).detect(astronaut_bgr)[0]
    crop = align_face(astronaut_bgr, face.landmarks, CropConfig(size=spec.size))
    ours = crop_to_pixels(crop, spec)
    ref = _hf(processor, crop, crop_to_patches=False)
    assert ours.shape == ref.shape == (1, 3, spec.size, spec.size)
    assert np.abs(ours - ref).max() <= 1e-5
    # a batch of crops is the same thing stacked
    batch = crops_to_pixels([crop, crop[:, ::-1]], spec)
    assert batch.shape[0] == 2 and np.array_equal(batch[0], ours[0])


@pytest.mark.parametrize("hw", [(512, 512), (480, 640), (300, 1400), (1000, 420), (1080, 1920)])
def test_grid_matches_transformers(processor, spec, hw):
    from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

    ref = get_optimal_tiled_canvas(hw, (spec.size, spec.size), spec.min_tiles, spec.max_tiles)
    assert optimal_grid(hw[0], hw[1], spec.size, spec.min_tiles, spec.max_tiles) == tuple(ref)


@pytest.mark.parametrize("which", ["astronaut", "t1", "wide"])
def test_tiled_frame_close_to_transformers(processor, spec, astronaut_bgr, t1_bgr, which):
    image = {"astronaut": astronaut_bgr, "t1": t1_bgr, "wide": np.concatenate([t1_bgr, t1_bgr], axis=1)}[which]
    ours, (cols, rows) = tile_image(image, spec)
    ref = _hf(processor, image, crop_to_patches=True)
    assert ours.shape == ref.shape  # same tile count (+ thumbnail), same order
    n = cols * rows
    assert ours.shape[0] == (n + 1 if n > 1 else 1)
    diff = np.abs(ours - ref)
    assert diff.mean() < TILED_MEAN_ABS_TOL, f"mean |diff| {diff.mean():.4f}"
    # per tile, the content matches (not a shifted/misordered tile)
    for i in range(ours.shape[0]):
        c = np.corrcoef(ours[i].ravel(), ref[i].ravel())[0, 1]
        assert c > 0.99, f"tile {i}: correlation {c:.4f}"
