"""A minimal GVPO trainer on transformers: rollout with ``generate``, verifiable rewards, and an update whose loss is
``linear_gvpo_loss`` on the last hidden state and the LM head (the full logits are never built).

    from gvpo_kernels.trainer import TrainConfig, train
    metrics = train(TrainConfig(steps=50, output_dir="out/run"))      # list of per-step metric dicts

Files: config (TrainConfig), cli (gvpo-train), checks (everything checked before a model loads), loop (train),
parallel (torchrun: DDP / FSDP2, sums over ranks), rollout, rewards, update, offpolicy (replay buffer,
demonstrations, lagged sampler), data, models, tiny (the embedded default), checkpoint, report. Needs the ``train`` extra (transformers, tqdm, matplotlib).
"""

from .config import TrainConfig


def train(config: TrainConfig) -> list[dict]:
    """Run ``config``; see :func:`gvpo_kernels.trainer.loop.train`."""
    from .loop import train as _train

    return _train(config)


__all__ = ["TrainConfig", "train"]
