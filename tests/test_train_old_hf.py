"""Training on an older InternVL3-hf conversion (no video token, no BOS): needs trainer.py to build its processor
with facellm_edge.export.checkpoint.load_processor instead of AutoProcessor.from_pretrained."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]  # trains


def test_train_and_merge_a_checkpoint_without_video_token(tmp_path, qwen_tokenizer_dir, face_dataset):
    from facellm_edge.export.checkpoint import load_processor
    from facellm_edge.export.synthetic import SyntheticSpec, build_checkpoint
    from facellm_edge.train import TrainConfig, train

    ckpt = build_checkpoint(tmp_path / "ckpt", qwen_tokenizer_dir,
                            SyntheticSpec(image_size=224, seed=5, video_token=False, text_bos=False))
    data, images, _ = face_dataset
    result = train(TrainConfig(base=str(ckpt), data=data, images=images, out=tmp_path / "run", max_steps=2,
                               save_every=0, merge=True))
    assert result.global_step == 2
    merged = load_processor(tmp_path / "run" / "merged")
    assert merged.video_token is None and merged.image_token == "<IMG_CONTEXT>"
