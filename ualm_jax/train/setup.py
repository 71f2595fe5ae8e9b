"""One training setup: (model, optimiser, trainable mask, mesh, state shardings, abstract state,
batch spec and shardings, jitted train and eval steps) built once from a config, for `ualm train`,
DPO, `ualm bench step`, `ualm bench compile` and `ualm mixture eval`. What a bench measures or
compiles is therefore literally the step training runs: same freeze masks, same task ids, same
batch contract (ualm_jax/format/batch.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from ualm_jax.checkpoint import load_params, with_shardings
from ualm_jax.config import Config
from ualm_jax.format.batch import batch_spec
from ualm_jax.model.params import abstract_params, build_model
from ualm_jax.model.ualm import UALM
from ualm_jax.sharding import batch_sharding, make_mesh
from ualm_jax.train import freeze
from ualm_jax.train.dpo import make_dpo_step
from ualm_jax.train.optim import learning_rate_schedule, make_optimizer
from ualm_jax.train.state import abstract_state, state_shardings
from ualm_jax.train.step import jit_train_step, make_eval_step, make_train_step, with_mesh_context


@dataclass
class TrainSetup:
    cfg: Config
    mesh: Any
    model: UALM
    tx: Any
    schedule: Callable
    trainable: Any                # freeze.trainable_spec: per-parameter bool / row mask
    task_names: tuple
    shardings: dict               # train-state shardings {'step', 'params', 'opt_state'}
    params_info: dict             # {'params': shapes, 'logical': logical axes}
    abstract_state: Any           # ShapeDtypeStructs carrying the shardings (restore target)
    batch_spec: dict              # global batch: ShapeDtypeStructs carrying the shardings
    step_fn: Optional[Callable]   # jitted (state, batch) -> (state, metrics)
    eval_fn: Optional[Callable]   # jitted (params, batch) -> LossSums

    @property
    def batch_shardings(self) -> dict:
        return {k: v.sharding for k, v in self.batch_spec.items()}


def model_and_optimizer(cfg: Config):
    """(model, optimiser, trainable spec, lr schedule) exactly as training builds them; restoring a
    train-state checkpoint needs the same optimiser tree."""
    model = build_model(cfg.model)
    params_shapes, _ = abstract_params(model)
    spec = freeze.trainable_spec(params_shapes, cfg.model, cfg.train)
    tx = make_optimizer(cfg.optim, cfg.train.steps, trainable=freeze.whole_tensor_trainable(spec))
    return model, tx, spec, learning_rate_schedule(cfg.optim, cfg.train.steps)


def sharded_batch_spec(cfg: Config, mesh, rows: int | None = None) -> dict:
    """batch_spec(cfg, rows) with each key's sharding over `mesh` (rows over data x fsdp)."""
    return {k: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                    sharding=batch_sharding(mesh, cfg.mesh.rules, len(s.shape),
                                                            s.shape))
            for k, s in batch_spec(cfg, rows).items()}


def setup_training(cfg: Config, task_names: Sequence[str], devices=None, rows: int | None = None,
                   steps: bool = True) -> TrainSetup:
    """Everything a train step needs, nothing allocated. task_names: the names of the batches'
    task ids (train.data.task_names); rows: the global batch (default train.batch_size);
    devices: the mesh's devices (default all; `bench compile` passes a TPU topology's);
    steps=False skips the jitted steps."""
    mesh = make_mesh(cfg.mesh, devices)
    model, tx, spec, schedule = model_and_optimizer(cfg)
    shardings, info = state_shardings(model, tx, mesh, cfg.mesh.rules)
    abstract = with_shardings(abstract_state(model, tx), shardings)
    setup = TrainSetup(cfg, mesh, model, tx, schedule, spec, tuple(task_names), shardings, info,
                       abstract, sharded_batch_spec(cfg, mesh, rows), None, None)
    if steps:
        setup.step_fn = _train_step(setup)
        setup.eval_fn = jax.jit(with_mesh_context(make_eval_step(model, len(task_names)), mesh,
                                                  cfg.mesh.rules),
                                in_shardings=(shardings["params"], setup.batch_shardings),
                                # Sums replicated: every process reads them (multi-host eval).
                                out_shardings=NamedSharding(mesh, P()))
    return setup


def _train_step(s: TrainSetup):
    cfg = s.cfg
    if cfg.train.mode == "dpo":
        return _dpo_step(s)
    step = make_train_step(s.model, s.tx, s.schedule, cfg.train.microbatches, len(s.task_names),
                           freeze.row_masks(s.trainable))
    return jit_train_step(step, s.shardings, s.batch_shardings, s.mesh, cfg.mesh.rules)


def _dpo_step(s: TrainSetup):
    """The DPO step with its reference: the pairs' stored log-probs, or frozen train.init_from
    parameters sharded like the policy (loaded here)."""
    cfg = s.cfg
    step = make_dpo_step(s.model, s.tx, cfg.dpo.beta, cfg.dpo.ce_weight, s.schedule)
    if cfg.dpo.reference == "offline":
        return jax.jit(with_mesh_context(step, s.mesh, cfg.mesh.rules),
                       in_shardings=(s.shardings, s.batch_shardings),
                       out_shardings=(s.shardings, None), donate_argnums=(0,))
    ref = load_params(cfg.train.init_from, s.params_info["params"], s.shardings["params"])
    jitted = jax.jit(with_mesh_context(step, s.mesh, cfg.mesh.rules),
                     in_shardings=(s.shardings, s.batch_shardings, s.shardings["params"]),
                     out_shardings=(s.shardings, None), donate_argnums=(0,))
    return lambda st, b: jitted(st, b, ref)
