"""The train step, top to bottom: forward -> weighted multi-stream loss -> grads (accumulated
over microbatches) -> clip + AdamW -> skip the update if the loss, gradient or update is
non-finite."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ualm_jax.model.loss import LossSums, loss_sums
from ualm_jax.model.paths import path_name
from ualm_jax.model.ualm import UALM
from ualm_jax.sharding import activation_sharding


def make_loss_fn(model: UALM, num_tasks: int = 0):
    cfg = model.cfg
    vocab = model.vocab

    def loss_fn(params, batch):
        h, head, emb = model.apply({"params": params}, batch, method=UALM.hidden_and_output)
        sums = loss_sums(h, head, emb, batch, vocab, cfg.loss_objective, cfg.loss_chunk_size,
                         num_tasks, cfg.max_loss_interval)
        return sums.total, sums

    return loss_fn


def _split_microbatches(batch, n):
    def split(x):
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])
    return jax.tree.map(split, batch)


def grads_and_sums(loss_fn, params, batch, microbatches: int = 1, num_tasks: int = 0):
    """Gradient of the summed loss and the loss sums; microbatches are scanned, so the result
    equals one large batch (the normaliser is the global count, applied afterwards)."""
    grad_fn = jax.grad(loss_fn, has_aux=True)
    if microbatches <= 1:
        return grad_fn(params, batch)

    def body(carry, mb):
        g_acc, s_acc = carry
        g, s = grad_fn(params, mb)
        return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, s_acc, s)), None

    mbs = _split_microbatches(batch, microbatches)
    zero_g = jax.tree.map(jnp.zeros_like, params)
    zero_s = LossSums.zeros(batch["tokens"].shape[-1], num_tasks,
                            batch["tokens"].shape[0] // microbatches)
    (g, s), _ = jax.lax.scan(body, (zero_g, zero_s), mbs)
    return g, s


def _apply_row_masks(tree, masks: dict | None):
    """Multiplies the named leaves by their [rows,1] masks (partially frozen tables)."""
    if not masks:
        return tree

    def one(path, x):
        m = masks.get(path_name(path))
        return x if m is None else x * jnp.asarray(m, x.dtype)

    return jax.tree_util.tree_map_with_path(one, tree)


def all_finite(tree) -> jax.Array:
    """True iff every element of every leaf is finite (exact: no norm that could overflow)."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.asarray(True)
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]).all()


def make_train_step(model: UALM, tx: optax.GradientTransformation, schedule=None,
                    microbatches: int = 1, num_tasks: int = 0, row_masks=None):
    """`row_masks`: {parameter name: [rows,1] mask} for partially frozen tables."""
    loss_fn = make_loss_fn(model, num_tasks)

    def train_step(state, batch):
        params = state["params"]
        grads, sums = grads_and_sums(loss_fn, params, batch, microbatches, num_tasks)
        count = jnp.maximum(sums.count, 1.0)
        grads = _apply_row_masks(jax.tree.map(lambda g: g / count, grads), row_masks)
        loss = sums.total / count
        grad_norm = optax.global_norm(grads)
        updates, new_opt = tx.update(grads, state["opt_state"], params)
        updates = _apply_row_masks(updates, row_masks)
        new_params = optax.apply_updates(params, updates)
        # A non-finite loss, gradient or update (a finite gradient through a broken optimiser
        # state) never reaches the weights: keep the old state.
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
        new_state = {
            "step": state["step"] + 1,
            "params": keep(new_params, params),
            "opt_state": keep(new_opt, state["opt_state"]),
        }
        metrics = {"loss": loss, "grad_norm": grad_norm, "skipped": (~ok).astype(jnp.int32)}
        metrics.update(sums_metrics(sums))
        if schedule is not None:
            metrics["lr"] = schedule(state["step"])
        return new_state, metrics

    return train_step


def sums_metrics(sums: LossSums) -> dict:
    return {
        "stream_loss": sums.per_stream / jnp.maximum(sums.per_stream_weight, 1e-9),
        "task_loss": sums.per_task / jnp.maximum(sums.per_task_count, 1.0),
        "task_targets": sums.per_task_count,
        "target_tokens": sums.count,
        "accuracy": sums.correct / jnp.maximum(sums.count, 1.0),
        "task_accuracy": sums.per_task_correct / jnp.maximum(sums.per_task_count, 1.0),
    }


def make_eval_step(model: UALM, num_tasks: int = 0):
    """Forward only: loss sums for held-out batches (summed over batches by the caller)."""
    loss_fn = make_loss_fn(model, num_tasks)

    def eval_step(params, batch):
        return loss_fn(params, batch)[1]

    return eval_step


def with_mesh_context(fn, mesh, rules):
    """Traces `fn` with activation sharding constraints for `mesh` active."""
    def wrapped(*args):
        with activation_sharding(mesh, rules):
            return fn(*args)
    return wrapped


def jit_train_step(step_fn, state_shardings, batch_shardings, mesh, rules):
    return jax.jit(with_mesh_context(step_fn, mesh, rules),
                   in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, None), donate_argnums=(0,))
