"""`ualm bench step`: the real train step on whatever devices exist; one JSON line per run."""
from __future__ import annotations

import json
import time

import jax
import numpy as np

from ualm_jax.config import Config, ConfigError, load_config
from ualm_jax.model.flops import FORMULA, flops_per_token
from ualm_jax.model.params import build_model
from ualm_jax.sharding import make_mesh, parse_mesh_arg, shard_batch
from ualm_jax.train.mfu import mfu, peak_flops_per_device
from ualm_jax.train.optim import learning_rate_schedule, make_optimizer
from ualm_jax.train.state import create_state, state_shardings
from ualm_jax.train.step import jit_train_step, make_train_step
from ualm_jax.train.synthetic import stream_for_model


def bench_config(model: str, mesh: str | None, text_only: bool = False, overrides=()) -> Config:
    """The config every bench builds its step from: the preset, overrides, and `--mesh`."""
    over = [f"model.preset={model}"] + list(overrides)
    if text_only:
        over += ["model.num_codebooks=0", "model.audio_encoder.enabled=false"]
    cfg: Config = load_config(None, over)
    if mesh:
        cfg.mesh.ici = parse_mesh_arg(mesh)
    return cfg


def bench_host_batch(cfg: Config, batch: int, seq: int, text_only: bool = False) -> dict:
    """One synthetic host batch in the train-step format, every position supervised."""
    stream = stream_for_model(cfg.model, batch, seq, seed=cfg.seed, text_only=text_only)
    host_batch = next(stream)
    host_batch.pop("task_ids")
    if text_only or not cfg.model.audio_encoder.enabled:
        host_batch.pop("audio_features", None)
        host_batch.pop("audio_slots", None)
    # Every position supervised: the bench measures the step, not the data.
    host_batch["loss_weights"] = np.where(host_batch["tokens"] > 0, 1.0, 0.0).astype(np.float32)
    return host_batch


def bench_train_step(cfg: Config, dev_mesh, batch_shardings: dict, steps: int, warmup: int = 0,
                     microbatches: int = 1):
    """(jitted train step, state shardings, model, optimiser) exactly as `bench step` runs it."""
    m = build_model(cfg.model)
    tx = make_optimizer(cfg.optim, total_steps=max(steps + warmup, 1))
    shardings, _ = state_shardings(m, tx, dev_mesh, cfg.mesh.rules)
    step_fn = jit_train_step(
        make_train_step(m, tx, learning_rate_schedule(cfg.optim, steps), microbatches),
        shardings, batch_shardings, dev_mesh, cfg.mesh.rules)
    return step_fn, shardings, m, tx


def bench_step(model: str, batch: int, seq: int, mesh: str | None, steps: int, warmup: int = 2,
               text_only: bool = False, microbatches: int = 1, overrides=(),
               peak_tflops: float | None = None) -> dict:
    cfg = bench_config(model, mesh, text_only, overrides)
    if batch % microbatches:
        raise ConfigError(f"--batch={batch} must be divisible by --microbatches={microbatches}")
    dev_mesh = make_mesh(cfg.mesh)
    t0 = time.perf_counter()
    dev_batch = shard_batch(bench_host_batch(cfg, batch, seq, text_only), dev_mesh, cfg.mesh.rules)
    b_shard = {k: v.sharding for k, v in dev_batch.items()}
    step_fn, shardings, m, tx = bench_train_step(cfg, dev_mesh, b_shard, steps, warmup,
                                                 microbatches)
    state = create_state(m, tx, shardings, jax.random.key(cfg.seed))
    compiled = step_fn.lower(state, dev_batch).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, metrics = compiled(state, dev_batch)
    jax.block_until_ready(state)
    t1 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, dev_batch)
    jax.block_until_ready(state)
    step_s = (time.perf_counter() - t1) / max(steps, 1)
    tokens_per_s = batch * seq / step_s
    fpt = flops_per_token(cfg.model, seq)
    n_dev = dev_mesh.devices.size
    peak = peak_tflops * 1e12 if peak_tflops else peak_flops_per_device()
    return {
        "bench": "step", "model": model, "text_only": text_only, "batch": batch, "seq": seq,
        "microbatches": microbatches, "objective": cfg.model.loss_objective,
        "remat": cfg.model.remat, "dtype": cfg.model.dtype,
        "mesh": {k: int(v) for k, v in dev_mesh.shape.items()}, "devices": n_dev,
        "device_kind": jax.devices()[0].device_kind, "backend": jax.default_backend(),
        "steps": steps, "step_s": step_s, "tokens_per_s": tokens_per_s,
        "flops_per_token": fpt, "flop_formula": FORMULA,
        "peak_flops_per_device": peak, "mfu": mfu(tokens_per_s, fpt, n_dev, peak),
        "compile_s": compile_s, "loss": float(metrics["loss"]),
    }


def print_json(record: dict) -> None:
    print(json.dumps(record), flush=True)


def _dir_bytes(path) -> int:
    from pathlib import Path

    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def bench_export(model: str, workdir: str, fmt: str = "pytorch") -> dict:
    """Writes a random params checkpoint of `model`, exports it in a child process and reports
    the child's peak resident memory against the checkpoint's size on disk."""
    import os
    import resource
    import subprocess
    import sys
    from pathlib import Path

    from ualm_jax.checkpoint import save_params
    from ualm_jax.model.params import init_params

    work = Path(workdir)
    ckpt = work / f"ckpt-{model}"
    if not (ckpt / "checkpoints").exists():
        cfg = load_config(None, [f"model.preset={model}"])
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / "config.yaml").write_text(cfg.to_yaml())
        params = init_params(build_model(cfg.model), jax.random.key(0))
        save_params(ckpt / "checkpoints", params)
        del params
    out = work / f"export-{model}-{fmt}"
    code = ("import sys; from ualm_jax.convert.export import export; "
            "export(sys.argv[1], sys.argv[2], sys.argv[3], overwrite=True)")
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    subprocess.run([sys.executable, "-c", code, str(ckpt), str(out), fmt], check=True, env=env)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    ckpt_bytes = _dir_bytes(ckpt / "checkpoints")
    return {"bench": "export", "model": model, "format": fmt, "checkpoint_bytes": ckpt_bytes,
            "export_bytes": _dir_bytes(out), "peak_rss_bytes": peak,
            "peak_over_checkpoint": peak / ckpt_bytes, "seconds": seconds,
            "note": None if before == 0 else "peak includes earlier children of this process"}
