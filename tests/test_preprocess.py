"""numpy preprocessing vs transformers' own InternVL processor (InternVLProcessor + GotOcr2ImageProcessor).

The runtime resizes with a reimplementation of torchvision's antialiased uint8 bicubic, so its pixel values are the
processor's exactly (float32 normalisation rounding aside: <= 1e-5), tiled or not.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from transformers.processing_utils import ProcessingKwargs

from facellm_edge.runtime.align import CropConfig, align_face
from facellm_edge.bundle import ImageSpec
from facellm_edge.runtime.preprocess import (
    crop_to_pixels, crops_to_pixels, image_to_pixels, optimal_grid, resize_bicubic, tile_image,
)

EXACT = 1e-5  # float32 normalisation of identical uint8 pixels


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
    from facellm_edge.runtime.detect import DetectorConfig, create_detector

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
def test_tiled_frame_equals_transformers(processor, spec, astronaut_bgr, t1_bgr, which):
    image = {"astronaut": astronaut_bgr, "t1": t1_bgr, "wide": np.concatenate([t1_bgr, t1_bgr], axis=1)}[which]
    ours, (cols, rows) = tile_image(image, spec)
    ref = _hf(processor, image, crop_to_patches=True)
    assert ours.shape == ref.shape  # same tile count (+ thumbnail), same order
    n = cols * rows
    assert ours.shape[0] == (n + 1 if n > 1 else 1)
    assert np.abs(ours - ref).max() <= EXACT


def _photos(astronaut_bgr, t1_bgr) -> dict[str, np.ndarray]:
    import cv2

    return {"1024x1024": cv2.resize(astronaut_bgr, (1024, 1024), interpolation=cv2.INTER_LINEAR),
            "1280x886": t1_bgr, "420x886": np.ascontiguousarray(t1_bgr[:, 300:720]), "37x53": t1_bgr[:53, :37]}


@pytest.mark.parametrize("crop_to_patches", [True, False])
@pytest.mark.parametrize("which", ["1024x1024", "1280x886", "420x886", "37x53"])
def test_whole_image_equals_the_processor(full_processor, spec, astronaut_bgr, t1_bgr, which, crop_to_patches):
    """What the checkpoint's processor feeds the model for a whole image (the InternVLProcessor, as eval and
    generation call it), pixel for pixel, with its tiling on (its default) and off."""
    image = _photos(astronaut_bgr, t1_bgr)[which]
    kwargs = {} if crop_to_patches else {"crop_to_patches": False}
    ref = np.asarray(full_processor(text=[full_processor.image_token], images=[np.ascontiguousarray(image[..., ::-1])],
                                    return_tensors="np", **kwargs)["pixel_values"], dtype=np.float32)
    ours = image_to_pixels(image, replace(spec, crop_to_patches=crop_to_patches))
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= EXACT
    if which == "1024x1024":
        assert ours.shape[0] == (10 if crop_to_patches else 1)  # 3x3 tiles + thumbnail, or one tile


def test_bundle_spec_follows_the_processor_not_its_image_processor_config(full_processor, spec):
    """The tiny checkpoint's image processor config says crop_to_patches false, like InternVL3-hf's; the
    InternVLProcessor tiles anyway, and the exported spec says what the processor does."""
    from facellm_edge.export.prompt import processor_tiling, tiles_for

    assert full_processor.image_processor.crop_to_patches is False
    assert spec.crop_to_patches is True and (spec.min_tiles, spec.max_tiles) == (1, 12)
    assert tiles_for(1024, 1024, spec) == 10 and tiles_for(600, 1300, spec) == 3
    assert tiles_for(1024, 1024, replace(spec, crop_to_patches=False)) == 1
    import copy

    not_tiling = copy.copy(full_processor)
    not_tiling.images_kwargs = {"crop_to_patches": False}  # a processor configured not to tile
    assert processor_tiling(not_tiling)[0] is False


class OlderSignatureKwargs(ProcessingKwargs, total=False):  # found by name, as InternVLProcessorKwargs is up to 5.17
    _defaults = {"images_kwargs": {"crop_to_patches": True, "max_patches": 6}}


@pytest.mark.parametrize("found_by", ["valid_processor_kwargs", "module name"])
def test_tiling_is_read_through_the_older_merge_kwargs_signature(full_processor, found_by):
    """Up to transformers 5.17 ``ProcessorMixin._merge_kwargs`` takes the model's kwargs class first (5.24 finds it
    itself); with only the newer call, export on 5.5-5.17 read crop_to_patches False and refused the checkpoint
    (seen on the GPU machine's 5.17). The class is the processor's ``valid_processor_kwargs`` (5.17) or its
    module's ``<Processor>Kwargs`` (5.5-5.14), and the merged kwargs come from it."""
    import copy

    from facellm_edge.export.prompt import processor_tiling

    def merge(self, ModelProcessorKwargs, tokenizer_init_kwargs=None, **kwargs):  # noqa: N803 - transformers' name
        return type(full_processor)._merge_kwargs(self, ModelProcessorKwargs, tokenizer_init_kwargs=tokenizer_init_kwargs,
                                                 **kwargs)

    attrs = {"_merge_kwargs": merge, "images_kwargs": {}, "__module__": __name__}  # no class images_kwargs (5.17)
    if found_by == "valid_processor_kwargs":
        attrs["valid_processor_kwargs"] = OlderSignatureKwargs
    name = "OlderSignature" if found_by == "module name" else "NoModuleKwargs"  # no NoModuleKwargsKwargs here
    older = copy.copy(full_processor)
    older.__class__ = type(name, (type(full_processor),), attrs)
    assert processor_tiling(older) == (True, 1, 6)


@pytest.mark.parametrize("src, dst", [((512, 512), (448, 448)), ((886, 1280), (896, 1344)), ((37, 53), (448, 448)),
                                      ((1000, 420), (2240, 896)), ((300, 1400), (448, 2240))])
def test_resize_is_torchvisions_antialiased_bicubic(src, dst):
    import torch
    from torchvision.transforms.v2 import functional as F

    image = np.random.default_rng(sum(src)).integers(0, 256, src + (3,), dtype=np.uint8)
    ref = F.resize(torch.from_numpy(image).permute(2, 0, 1), list(dst), interpolation=F.InterpolationMode.BICUBIC,
                   antialias=True).permute(1, 2, 0).numpy()
    assert np.array_equal(resize_bicubic(image, dst[1], dst[0]), ref)
