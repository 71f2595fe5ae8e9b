"""Optimiser: AdamW (fp32 moments), warmup + cosine schedule, global-norm clipping, and masks
that freeze parameters (the frozen ones get no update and no optimiser state)."""
from __future__ import annotations

import jax
import optax

from ualm_jax.config import OptimConfig


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    warmup = max(int(cfg.warmup_steps), 0)
    if cfg.schedule == "constant":
        if warmup == 0:
            return optax.constant_schedule(cfg.learning_rate)
        return optax.linear_schedule(0.0, cfg.learning_rate, warmup)
    decay = max(total_steps - warmup, 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
        decay_steps=warmup + decay, end_value=cfg.learning_rate * cfg.end_learning_rate_ratio)


def decay_mask(params):
    """Weight decay on matrices only (not norms, biases, or stream embeddings)."""
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(cfg: OptimConfig, total_steps: int,
                   trainable=None) -> optax.GradientTransformation:
    """`trainable`: a tree of bools like the params; False = frozen (no update, no state)."""
    schedule = learning_rate_schedule(cfg, total_steps)
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity(),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                    mask=decay_mask),
    )
    if trainable is None:
        return tx
    labels = jax.tree.map(lambda t: "train" if t else "freeze", trainable)
    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
