"""Held-out evaluation with the sharded eval step: loss sums over the same held-out batches every
time (the iterator is opened once and rewound), then per-task loss and stream-0 accuracy. Used by
the train loop's evals and by `ualm mixture eval`."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ualm_jax.config import Config
from ualm_jax.format.batch import check_batch, host_batch_spec
from ualm_jax.model.loss import LossSums
from ualm_jax.train import data as data_lib
from ualm_jax.train.step import sums_metrics


class HeldOut:
    """The held-out iterator, opened once (on first use) and rewound before every eval, so each
    eval sees the same batches without re-opening the sources."""

    def __init__(self, cfg: Config):
        self.cfg, self.it, self.start = cfg, None, None

    def batches(self):
        if self.it is None:
            self.it = data_lib.make_eval_iterator(self.cfg)
            self.start = self.it.get_state()
        self.it.set_state(self.start)
        return self.it


def eval_sums(eval_fn, params, cfg, mesh, batches: int, held_out: HeldOut | None = None) -> LossSums:
    """Loss sums (on the host) over `batches` held-out batches; the same batches every call."""
    it = (held_out or HeldOut(cfg)).batches()
    per_host = it.per_host
    spec = host_batch_spec(cfg, jax.process_count())
    total = None
    for i in range(batches):
        local = data_lib.process_rows(next(it), per_host)
        if i == 0:
            check_batch(local, spec, f"held-out {type(it).__name__} batch")
        batch = data_lib.to_global_arrays(local, mesh, cfg.mesh.rules)
        sums = eval_fn(params, batch)
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    return LossSums(*jax.device_get(total))


def eval_record(total: LossSums, names, step: int) -> dict:
    """Held-out loss and stream-0 token accuracy, overall and per task."""
    m = sums_metrics(total)
    rec = {"step": step, "eval/loss": float(total.total / max(total.count, 1.0)),
           "eval/accuracy": float(m["accuracy"])}
    for name, loss, acc, n in zip(names, m["task_loss"], m["task_accuracy"], m["task_targets"]):
        if n > 0:
            rec[f"eval/loss/{name}"] = float(loss)
            rec[f"eval/accuracy/{name}"] = float(acc)
            rec[f"eval/targets/{name}"] = int(n)
    return rec


def evaluate(eval_fn, params, cfg, mesh, names, step: int, held_out: HeldOut | None = None) -> dict:
    """Per-task loss and stream-0 accuracy over cfg.train.eval_batches held-out batches."""
    rec = eval_record(eval_sums(eval_fn, params, cfg, mesh, cfg.train.eval_batches, held_out),
                      names, step)
    print("eval step {}: {}".format(step, " ".join(
        f"{k[5:]}={v:.4f}" for k, v in rec.items() if k.startswith(("eval/loss", "eval/acc")))),
        flush=True)
    return rec
