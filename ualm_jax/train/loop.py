"""`ualm train`: a short loop. Set-up, then per step: batch -> jitted step -> log the previous
step's metrics -> maybe eval -> maybe checkpoint. SIGTERM saves and exits cleanly."""
from __future__ import annotations

import functools
import signal
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np

import ualm_jax.sigterm as sigterm
import ualm_jax.storage as storage
from ualm_jax.checkpoint import Checkpointer, load_params
from ualm_jax.config import Config
from ualm_jax.format.batch import host_batch_spec
from ualm_jax.model.flops import batch_step_flops
from ualm_jax.model.params import param_table
from ualm_jax.train import data as data_lib
from ualm_jax.train import freeze, lease, rundir
from ualm_jax.train.evaluation import HeldOut, evaluate
from ualm_jax.train.metrics import MetricsWriter, StepTrace, WindowMeans
from ualm_jax.train.mfu import mfu, peak_flops_per_device
from ualm_jax.train.setup import setup_training
from ualm_jax.train.state import create_state, state_from_params


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


def train(cfg: Config, run_dir: str | Path, max_steps_this_run: int | None = None,
          hooks: Sequence[Callable] = (), reset_data_state: bool = False) -> dict:
    """Trains to cfg.train.steps (resuming from the run dir's latest checkpoint). Returns a
    summary. `max_steps_this_run` stops early as if preempted (used by tests). `hooks`: callables
    (params, step) -> dict of extra eval metrics, run after every held-out eval (`ualm train`
    passes eval/hooks.py's). `reset_data_state`: resume parameters and optimiser but start the
    data stream afresh (e.g. after changing the global batch). The run dir is probed, then
    leased to this job for the whole run (train/lease.py). Nothing is written into it before the
    set-up succeeded (config, data, checkpoint restore); a new run dir whose start fails before
    the first step is removed again."""
    if sigterm.requested():  # terminated during imports: nothing to set up, nothing to save
        return _nothing_trained(run_dir, None)
    remote = storage.is_url(run_dir)
    fresh = None if remote else rundir.is_new(run_dir)
    path = rundir.prepare(run_dir, cfg.train.probe_timeout_s)
    if remote:  # listed only once the probe has shown the bucket answers
        fresh = rundir.is_new(path)
    progress = {"stepped": False}
    try:
        with lease.hold(path):
            return _train(cfg, path, max_steps_this_run, list(hooks), reset_data_state, progress)
    except BaseException:
        if fresh and not progress["stepped"] and jax.process_index() == 0:
            rundir.remove_failed_start(path, fresh)
        raise


def _train(cfg: Config, path, max_steps_this_run: int | None, hooks: list,
           reset_data_state: bool, progress: dict) -> dict:
    t = cfg.train
    rundir.check_same_model(path, cfg)
    is_main = jax.process_index() == 0
    for note in data_lib.adopt_build_artefacts(cfg):
        if is_main:
            print(note, flush=True)
    warning = freeze.random_frozen_encoder(cfg)
    if warning and is_main and data_lib.reads_encoder_audio(cfg):
        print(f"warning: {warning}", flush=True)

    # Model, optimiser, shardings, batch spec and the jitted steps: one setup (train/setup.py).
    names = data_lib.task_names(cfg)
    setup = setup_training(cfg, names)
    mesh, tx, spec, shardings, info = (setup.mesh, setup.tx, setup.trainable, setup.shardings,
                                       setup.params_info)
    rundir.check_free_disk(path, rundir.state_bytes(setup.abstract_state), t.min_free_disk_factor)
    # State: resume from the latest complete checkpoint, else initialise.
    ckpt = Checkpointer(path / "checkpoints", t.keep_last, t.keep_every, t.async_checkpoint)
    train_iter = data_lib.make_train_iterator(cfg)
    if ckpt.latest_step() is not None:
        state, data_state, start = ckpt.restore(setup.abstract_state)
        if reset_data_state:
            print(f"resumed parameters and optimiser from step {start}; the data stream starts "
                  "afresh (--reset-data-state)", flush=True)
        elif data_state is not None:
            try:
                train_iter.set_state(data_lib.local_data_state(data_state))
            except ValueError as e:
                raise ValueError(f"{e}. Ways out: rerun with --reset-data-state (keep parameters "
                                 "and optimiser, restart the data stream), go back to the run's "
                                 f"settings (config.yaml in {path}), or start a new run dir with "
                                 "train.init_from pointing at this one") from e
        print(f"resumed from step {start} ({ckpt.directory})", flush=True)
    elif t.init_from:
        rundir.check_same_model(t.init_from, cfg, f"train.init_from={t.init_from}")
        params = load_params(t.init_from, info["params"], shardings["params"])
        state, start = state_from_params(tx, params, shardings), 0
        print(f"initialised parameters from {t.init_from}", flush=True)
    else:
        state, start = create_state(setup.model, tx, shardings, jax.random.key(cfg.seed)), 0
    if is_main:  # only now: a refused start leaves the run dir's records as they were
        rows = param_table(info["params"], info["logical"], shardings["params"])
        rundir.write_start_files(path, cfg, rows, freeze.count_trainable(spec, info["params"]),
                                 start)

    step_fn, eval_fn = setup.step_fn, setup.eval_fn
    peak = peak_flops_per_device()
    tokens_per_step = t.batch_size * t.seq_len
    writer = MetricsWriter(path, t.tensorboard, is_main, trackers=t.trackers, config=cfg.to_dict())
    trace = StepTrace(path, t.profile_steps, is_main)
    held_out = HeldOut(cfg)
    prefetch = data_lib.Prefetcher(train_iter, mesh, cfg.mesh.rules, names,
                                   host_spec=host_batch_spec(cfg, jax.process_count()),
                                   flops=functools.partial(batch_step_flops, cfg.model,
                                                           adapter_trained=freeze.adapter_trained(spec)),
                                   depth=cfg.data.prefetch)
    step, skipped, preempted, nothing_trained = start, 0, False, False
    pending = None  # (step, device metrics, task mix, model FLOPs): logged one step later
    last_eval = first_loss = last_logged = None
    data_state = train_iter.get_state()
    started = last_log_time = time.perf_counter()
    last_log_step, window_flops, window = start, 0.0, WindowMeans()
    stop_at = t.steps if max_steps_this_run is None else min(t.steps, start + max_steps_this_run)

    def flush(item):
        nonlocal skipped, last_log_time, last_log_step, first_loss, window_flops, last_logged
        s, metrics, mix, flops = item
        window_flops += flops
        rec = _scalars(metrics, names)
        if first_loss is None:
            first_loss = rec
            if s == 1 and is_main:  # the run's first step, kept for summaries of later resumes
                rundir.write_first_step(path, rec)
        skipped += rec["skipped"]
        if rec["skipped"] and t.nan_policy == "stop":
            raise NonFiniteLoss(f"non-finite loss, gradient or update at step {s} "
                                f"(loss={rec['loss']}, "
                                f"grad_norm={rec['grad_norm']}); batch task mix (tokens): {mix}")
        window.add(rec)
        if s % t.log_every == 0 or s == stop_at:
            now = time.perf_counter()
            seconds = max(now - last_log_time, 1e-9)
            tps = tokens_per_step * (s - last_log_step) / seconds
            rec = window.pop()
            rec.update(step=s, tokens_per_s=tps,
                       mfu=mfu(window_flops / seconds, jax.device_count(), peak),
                       skipped_steps=skipped, task_mix=mix)
            last_log_time, last_log_step, window_flops = now, s, 0.0
            writer.write(rec)
            writer.console(rec, t.steps, started, start)
            last_logged = rec

    def run_eval(params, step):
        rec = evaluate(eval_fn, params, cfg, mesh, names, step, held_out)
        for hook in hooks:
            rec.update(hook(params, step))
        writer.write(rec, flush=True)
        return rec

    try:
        with _Preemption() as preemption:
            while step < stop_at:
                if step == start and preemption.requested:  # SIGTERM during set-up
                    nothing_trained = True
                    break
                batch, data_state, mix, flops = next(prefetch)
                trace.before(step + 1)
                if step == start and is_main:
                    print("compiling the train step ...", flush=True)
                    compile_started = time.perf_counter()
                state, metrics = step_fn(state, batch)
                if step == start and is_main:
                    print(f"compiled in {time.perf_counter() - compile_started:.1f} s; training",
                          flush=True)
                step += 1
                progress["stepped"] = True
                trace.after(step, state)
                if pending is not None:
                    flush(pending)
                pending = (step, metrics, mix, flops)
                if t.eval_every and step % t.eval_every == 0 and t.mode == "lm":
                    flush(pending)
                    pending = None
                    last_eval = run_eval(state["params"], step)
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
            elif (step == t.steps and t.eval_batches and t.mode == "lm"
                  and not (t.eval_every and step % t.eval_every == 0)):
                last_eval = run_eval(state["params"], step)
            if not nothing_trained and ckpt.latest_step() != step:
                ckpt.save(step, state, data_lib.gather_data_state(data_state), force=True)
    finally:
        trace.stop()
        prefetch.close()
        ckpt.close()
        writer.close()
    if nothing_trained:
        return _nothing_trained(path, state, step)
    if preempted:
        print(f"preempted: saved step {step}, exiting cleanly", flush=True)
    if start > 0:  # a resume: the run's first step and, when none ran now, its last eval
        first_loss = rundir.read_first_step(path) or first_loss
        last_eval = last_eval or rundir.last_logged_eval(path)
    return {"step": step, "preempted": preempted or stopped_early, "skipped_steps": skipped,
            "state": state, "run_dir": str(path), "eval": last_eval, "first_loss": first_loss,
            "last_logged": last_logged}


def _nothing_trained(run_dir, state, step: int = 0) -> dict:
    """The summary of a run stopped by SIGTERM before its first step (no checkpoint written)."""
    print("stopped before the first step: nothing was trained", flush=True)
    return {"step": step, "preempted": True, "nothing_trained": True, "skipped_steps": 0,
            "state": state, "run_dir": str(run_dir), "eval": None, "first_loss": None}
