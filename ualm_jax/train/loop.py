"""`ualm train`: a short loop. Set-up, then per step: batch -> jitted step -> log the previous
step's metrics -> maybe eval -> maybe checkpoint. SIGTERM saves and exits cleanly."""
from __future__ import annotations

import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ualm_jax import sigterm
from ualm_jax.checkpoint import Checkpointer, load_params, with_shardings
from ualm_jax.config import Config
from ualm_jax.model.flops import flops_per_token
from ualm_jax.model.loss import LossSums
from ualm_jax.model.params import abstract_params, build_model, param_table
from ualm_jax.sharding import make_mesh
from ualm_jax.train import data as data_lib
from ualm_jax.train import freeze, lease, rundir
from ualm_jax.train.metrics import MetricsWriter
from ualm_jax.train.mfu import mfu, peak_flops_per_device
from ualm_jax.train.optim import learning_rate_schedule, make_optimizer
from ualm_jax.train.state import abstract_state, create_state, state_from_params, state_shardings
from ualm_jax.train.step import (jit_train_step, make_eval_step, make_train_step, sums_metrics,
                                 with_mesh_context)


class NonFiniteLoss(RuntimeError):
    pass


class _Preemption:
    """SIGTERM sets a flag; the loop saves at the current step and exits 0. A SIGTERM recorded
    earlier (ualm_jax.sigterm, installed first thing by `ualm train`) counts as already set."""

    def __init__(self):
        self.requested = sigterm.requested()
        self._old = None

    def __enter__(self):
        def handler(signum, frame):
            self.requested = True
        try:
            self._old = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread: rely on Orbax's preemption check only
            self._old = None
        # Read after taking over: a SIGTERM in between lands in one of the two flags.
        self.requested = self.requested or sigterm.requested()
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _scalars(metrics: dict, names) -> dict:
    """Device metrics -> flat JSON-able dict (per-stream and per-task vectors spelled out)."""
    m = jax.device_get(metrics)
    out = {}
    for key, v in m.items():
        v = np.asarray(v)
        if key == "stream_loss":
            out.update({f"loss/stream_{k}": float(x) for k, x in enumerate(v)})
        elif key == "task_loss":
            out.update({f"loss/{n}": float(x) for n, x, c in zip(names, v, m["task_targets"]) if c > 0})
        elif key == "task_accuracy":
            out.update({f"accuracy/{n}": float(x) for n, x, c in zip(names, v, m["task_targets"])
                        if c > 0})
        elif key != "task_targets":
            out[key] = int(v) if v.dtype.kind in "iu" else float(v)
    return out


def build_components(cfg: Config):
    """(model, optimiser, trainable spec, lr schedule) exactly as training builds them; restoring a
    train-state checkpoint needs the same optimiser tree."""
    model = build_model(cfg.model)
    params_shapes, _ = abstract_params(model)
    spec = freeze.trainable_spec(params_shapes, cfg.model, cfg.train)
    tx = make_optimizer(cfg.optim, cfg.train.steps, trainable=freeze.whole_tensor_trainable(spec))
    return model, tx, spec, learning_rate_schedule(cfg.optim, cfg.train.steps)


def train(cfg: Config, run_dir: str | Path, max_steps_this_run: int | None = None) -> dict:
    """Trains to cfg.train.steps (resuming from the run dir's latest checkpoint). Returns a
    summary. `max_steps_this_run` stops early as if preempted (used by tests). The run dir is
    probed, then leased to this job for the whole run (train/lease.py)."""
    if sigterm.requested():  # terminated during imports: nothing to set up, nothing to save
        return _nothing_trained(run_dir, None)
    path = rundir.prepare(run_dir, cfg.train.probe_timeout_s)
    with lease.hold(path):
        return _train(cfg, path, max_steps_this_run)


def _train(cfg: Config, path, max_steps_this_run: int | None) -> dict:
    t = cfg.train
    rundir.check_same_model(path, cfg)
    is_main = jax.process_index() == 0

    # Model, optimiser, shardings.
    mesh = make_mesh(cfg.mesh)
    rules = cfg.mesh.rules
    model, tx, spec, schedule = build_components(cfg)
    names = data_lib.task_names(cfg)
    shardings, info = state_shardings(model, tx, mesh, rules)
    abstract = with_shardings(abstract_state(model, tx), shardings)
    rundir.check_free_disk(path, rundir.state_bytes(abstract), t.min_free_disk_factor)
    if is_main:
        rows = param_table(info["params"], info["logical"], shardings["params"])
        rundir.write_start_files(path, cfg, rows, freeze.count_trainable(spec, info["params"]))

    # State: resume from the latest complete checkpoint, else initialise.
    ckpt = Checkpointer(path / "checkpoints", t.keep_last, t.keep_every, t.async_checkpoint)
    train_iter = data_lib.make_train_iterator(cfg)
    if ckpt.latest_step() is not None:
        state, data_state, start = ckpt.restore(abstract)
        if data_state is not None:
            train_iter.set_state(data_lib.local_data_state(data_state))
        print(f"resumed from step {start} ({ckpt.directory})", flush=True)
    elif t.init_from:
        params = load_params(t.init_from, info["params"], shardings["params"])
        state, start = state_from_params(tx, params, shardings), 0
        print(f"initialised parameters from {t.init_from}", flush=True)
    else:
        state, start = create_state(model, tx, shardings, jax.random.key(cfg.seed)), 0

    # Compiled steps.
    # Batch shapes from the first batch, then rewind: no second pipeline is opened.
    position = train_iter.get_state()
    example = next(train_iter)
    train_iter.set_state(position)
    b_shard = data_lib.batch_shardings_for(cfg, mesh, data_lib.process_rows(
        example, getattr(train_iter, "per_host", False)))
    if t.objective == "dpo":
        step_fn = _dpo_step_fn(cfg, model, tx, schedule, shardings, b_shard, mesh, info)
    else:
        step_fn = jit_train_step(
            make_train_step(model, tx, schedule, t.microbatches, len(names), freeze.row_masks(spec)),
            shardings, b_shard, mesh, rules)
    eval_fn = jax.jit(with_mesh_context(make_eval_step(model, len(names)), mesh, rules),
                      in_shardings=(shardings["params"], b_shard))

    fpt = flops_per_token(cfg.model, t.seq_len)
    peak = peak_flops_per_device()
    tokens_per_step = t.batch_size * t.seq_len
    writer = MetricsWriter(path, t.tensorboard, is_main)
    gen_hook = GenerationHook(cfg)
    held_out = HeldOut(cfg)
    prefetch = data_lib.Prefetcher(train_iter, mesh, rules, names)
    step, skipped, preempted, nothing_trained = start, 0, False, False
    pending = None  # (step, device metrics, task mix): logged one step later, never blocking
    last_eval = first_loss = None
    data_state = train_iter.get_state()
    started = last_log_time = time.perf_counter()
    last_log_step = start
    stop_at = t.steps if max_steps_this_run is None else min(t.steps, start + max_steps_this_run)

    def flush(item):
        nonlocal skipped, last_log_time, last_log_step, first_loss
        s, metrics, mix = item
        rec = _scalars(metrics, names)
        if first_loss is None:
            first_loss = rec
        skipped += rec["skipped"]
        if rec["skipped"] and t.nan_policy == "stop":
            raise NonFiniteLoss(f"non-finite loss, gradient or update at step {s} "
                                f"(loss={rec['loss']}, "
                                f"grad_norm={rec['grad_norm']}); batch task mix (tokens): {mix}")
        if s % t.log_every == 0 or s == stop_at:
            now = time.perf_counter()
            tps = tokens_per_step * (s - last_log_step) / max(now - last_log_time, 1e-9)
            last_log_time, last_log_step = now, s
            rec.update(step=s, tokens_per_s=tps, mfu=mfu(tps, fpt, jax.device_count(), peak),
                       skipped_steps=skipped, task_mix=mix)
            writer.write(rec)
            writer.console(rec, t.steps, started, start)

    try:
        with _Preemption() as preemption:
            while step < stop_at:
                if step == start and preemption.requested:  # SIGTERM during set-up
                    nothing_trained = True
                    break
                batch, data_state, mix = next(prefetch)
                state, metrics = step_fn(state, batch)
                step += 1
                if pending is not None:
                    flush(pending)
                pending = (step, metrics, mix)
                if t.eval_every and step % t.eval_every == 0 and t.objective == "lm":
                    flush(pending)
                    pending = None
                    last_eval = evaluate(eval_fn, state["params"], cfg, mesh, names, step, held_out)
                    last_eval.update(gen_hook(state["params"], step))
                    writer.write(last_eval, flush=True)
                if preemption.requested or ckpt.reached_preemption(step):
                    preempted = True
                    break
                if t.checkpoint_every and step % t.checkpoint_every == 0:
                    ckpt.save(step, state, data_lib.gather_data_state(data_state))
            if pending is not None:
                flush(pending)
            stopped_early = step < t.steps
            if nothing_trained:
                pass  # no eval, no checkpoint: the run dir's latest step (if any) is unchanged
            elif step == t.steps and t.eval_batches and t.objective == "lm" and not (t.eval_every and step % t.eval_every == 0):
                last_eval = evaluate(eval_fn, state["params"], cfg, mesh, names, step, held_out)
                last_eval.update(gen_hook(state["params"], step))
                writer.write(last_eval, flush=True)
            if not nothing_trained and ckpt.latest_step() != step:
                ckpt.save(step, state, data_lib.gather_data_state(data_state), force=True)
    finally:
        prefetch.close()
        ckpt.close()
        writer.close()
    if nothing_trained:
        return _nothing_trained(path, state, step)
    if preempted:
        print(f"preempted: saved step {step}, exiting cleanly", flush=True)
    return {"step": step, "preempted": preempted or stopped_early, "skipped_steps": skipped,
            "state": state, "run_dir": str(path), "eval": last_eval, "first_loss": first_loss}


def _nothing_trained(run_dir, state, step: int = 0) -> dict:
    """The summary of a run stopped by SIGTERM before its first step (no checkpoint written)."""
    print("stopped before the first step: nothing was trained", flush=True)
    return {"step": step, "preempted": True, "nothing_trained": True, "skipped_steps": 0,
            "state": state, "run_dir": str(run_dir), "eval": None, "first_loss": None}


def _dpo_step_fn(cfg, model, tx, schedule, shardings, b_shard, mesh, info):
    """The DPO step with its reference: frozen init_from params (sharded like the policy) or the
    pairs' stored log-probs."""
    from ualm_jax.train.dpo import make_dpo_step

    step = make_dpo_step(model, tx, cfg.dpo.beta, cfg.dpo.ce_weight, schedule)
    if cfg.dpo.reference == "offline":
        jitted = jax.jit(with_mesh_context(lambda st, b: step(st, b), mesh, cfg.mesh.rules),
                         in_shardings=(shardings, b_shard), out_shardings=(shardings, None),
                         donate_argnums=(0,))
        return jitted
    ref = load_params(cfg.train.init_from, info["params"], shardings["params"])
    jitted = jax.jit(with_mesh_context(step, mesh, cfg.mesh.rules),
                     in_shardings=(shardings, b_shard, shardings["params"]),
                     out_shardings=(shardings, None), donate_argnums=(0,))
    return lambda st, b: jitted(st, b, ref)


class GenerationHook:
    """eval.prompts set: generation metrics (CLAP, FD, world match; each names its model) on
    the live parameters at every eval, logged as gen/* next to the held-out losses."""

    def __init__(self, cfg: Config):
        self.cfg, self.loaded = cfg, None
        self.enabled = bool(cfg.eval.prompts)
        if self.enabled and jax.process_count() > 1:  # generation runs on one host's copy
            print("eval.prompts: generation metrics are computed by `ualm eval` on multi-host "
                  "runs, not in the loop", flush=True)
            self.enabled = False
        if self.enabled:
            from ualm_jax.eval.cli_eval import make_clap, make_fd_embedder
            from ualm_jax.infer.make_pairs import read_prompts

            self.prompts = read_prompts(cfg.eval.prompts)  # a bad file fails before training
            self.clap = make_clap(cfg.eval.clap or None)
            self.fd = make_fd_embedder(cfg.eval.fd_model or None)

    def __call__(self, params, step: int) -> dict:
        if not self.enabled:
            return {}
        from ualm_jax.eval.cli_eval import generation_eval
        from ualm_jax.infer.tasks import from_params, set_params

        host = jax.device_get(params)
        if self.loaded is None:
            self.loaded = from_params(self.cfg, host)
        set_params(self.loaded, host)
        e = self.cfg.eval
        ev = generation_eval(self.loaded, self.prompts, Path(e.prompts).resolve().parent,
                             self.clap, self.fd, e.cfg_scale, e.max_prompts, self.cfg.seed)
        rec = {f"eval/{k}": float(r.value) for k, r in ev.results.items()}
        rec["eval/gen_models"] = {k: r.model for k, r in ev.results.items()}
        print("eval step {} generation: {}".format(step, " ".join(
            f"{k}={r.value:.4f} ({r.model})" for k, r in ev.results.items())), flush=True)
        return rec


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
    per_host = getattr(it, "per_host", False)
    total = None
    for _ in range(batches):
        batch = data_lib.to_global_arrays(data_lib.process_rows(next(it), per_host), mesh,
                                          cfg.mesh.rules)
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
