"""LoRA fine-tuning of FaceLLM / InternVL3 (``facellm-edge train``, ``accelerate launch -m facellm_edge.train``).

Heavy libraries (torch, transformers, peft, accelerate) are imported only when training starts.
"""

from facellm_edge.train.config import TrainConfig

__all__ = ["TrainConfig", "train"]


def train(cfg: TrainConfig):
    """Run a training job; see :func:`facellm_edge.train.trainer.train`."""
    from facellm_edge.train.trainer import train as _train

    return _train(cfg)
