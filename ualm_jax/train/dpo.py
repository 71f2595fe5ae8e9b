"""Direct preference optimisation for generation (docs/ualm.md: DPO with an added CE term).

A DPO batch stacks B chosen then B rejected sequences (same prompts) in the ordinary batch
format; a sequence's log-prob is minus its weighted CE over supervised targets (the same weights
as pre-training: text 1, audio 1/K per stream). The reference policy's log-probs come either
from the batch (`ref_logp` [2B], computed once offline and stored with the pairs, so the frozen
model need not sit in accelerator memory) or from frozen reference parameters run in the step
(sharded like the policy).

  loss = mean(-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))) + ce_weight * CE(chosen)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ualm_jax.model.loss import loss_sums, shift_targets
from ualm_jax.model.ualm import UALM
from ualm_jax.train.step import all_finite


def dpo_terms(pi_c, pi_r, ref_c, ref_r, beta: float):
    """Per-pair DPO loss and implicit reward margin."""
    margin = beta * ((pi_c - ref_c) - (pi_r - ref_r))
    return -jax.nn.log_sigmoid(margin), margin


def sequence_logprobs(model: UALM, params, batch):
    h, head, emb = model.apply({"params": params}, batch, method=UALM.hidden_and_output)
    sums = loss_sums(h, head, emb, batch, model.vocab, model.cfg.loss_objective,
                     model.cfg.loss_chunk_size, max_interval=model.cfg.max_loss_interval)
    return -sums.per_row


def make_dpo_loss(model: UALM, beta: float, ce_weight: float):
    def loss_fn(params, batch, ref_params=None):
        logp = sequence_logprobs(model, params, batch)
        b = logp.shape[0] // 2
        if "ref_logp" in batch:
            ref = batch["ref_logp"]
        else:
            ref = jax.lax.stop_gradient(sequence_logprobs(model, ref_params, batch))
        losses, margins = dpo_terms(logp[:b], logp[b:], ref[:b], ref[b:], beta)
        _, w = shift_targets(batch["tokens"][:b], batch["loss_weights"][:b], batch["segment_ids"][:b])
        chosen_ce = -logp[:b].sum() / jnp.maximum((w[..., 0] > 0).sum(), 1)
        loss = losses.mean() + ce_weight * chosen_ce
        metrics = {"dpo_loss": losses.mean(), "chosen_ce": chosen_ce,
                   "reward_margin": margins.mean(), "reward_accuracy": (margins > 0).mean()}
        return loss, metrics
    return loss_fn


def make_dpo_step(model: UALM, tx: optax.GradientTransformation, beta: float,
                  ce_weight: float, schedule=None):
    """state as in train/step.py; ref_params may be None when batches carry `ref_logp`."""
    loss_fn = make_dpo_loss(model, beta, ce_weight)

    def dpo_step(state, batch, ref_params=None):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], batch, ref_params)
        grad_norm = optax.global_norm(grads)
        updates, new_opt = tx.update(grads, state["opt_state"], state["params"])
        new_params = optax.apply_updates(state["params"], updates)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
        new_state = {"step": state["step"] + 1, "params": keep(new_params, state["params"]),
                     "opt_state": keep(new_opt, state["opt_state"])}
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, skipped=(~ok).astype(jnp.int32))
        if schedule is not None:
            metrics["lr"] = schedule(state["step"])
        return new_state, metrics

    return dpo_step
