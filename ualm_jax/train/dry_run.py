"""`ualm train --dry-run`: the run's set-up checked and its train step compiled, nothing written.
With a topology the step is compiled for that slice (train/topology_compile.py, the compile
`ualm bench compile --config` runs); without one on this machine's devices, its first batch read
and checked against the batch contract."""
from __future__ import annotations

import time

import jax

from ualm_jax.topology import GiB
from ualm_jax.train import freeze
from ualm_jax.train.topology_compile import (compile_plan, memory_report, plan_for,
                                             print_progress, summary_lines)


def dry_run(cfg, topology: str | None = None, config: str | None = None, overrides=(),
            progress=print_progress) -> dict:
    """`ualm train --dry-run`. With a topology: the resolved config's step compiled for it, the
    same compile as `ualm bench compile --config` (no data read; it may live on the slice's
    hosts). Without: the run's setup (train/setup.py) on this machine's devices, its first batch
    read and checked against the batch contract, the train step compiled ahead of time on
    abstract inputs; per-device memory and the step's model FLOPs. Writes nothing."""
    warnings = [w for w in [freeze.random_frozen_encoder(cfg)] if w]
    if topology:
        return {**compile_plan(plan_for(cfg, topology, config, overrides), progress,
                               summary=False), "warnings": warnings}
    from ualm_jax.format.batch import check_batch, host_batch_spec
    from ualm_jax.model.flops import batch_step_flops
    from ualm_jax.train import data as data_lib
    from ualm_jax.train.setup import setup_training

    say = progress or (lambda line: None)
    t0 = time.perf_counter()
    names = data_lib.task_names(cfg)
    setup = setup_training(cfg, names)
    it = data_lib.make_train_iterator(cfg)
    local = data_lib.process_rows(next(it), it.per_host)
    check_batch(local, host_batch_spec(cfg, jax.process_count()), f"{type(it).__name__} batch")
    say(f"compiling the train step for {jax.device_count()} x {jax.devices()[0].device_kind} ...")
    t1 = time.perf_counter()
    compiled = setup.step_fn.lower(setup.abstract_state, setup.batch_spec).compile()
    compile_s = time.perf_counter() - t1
    say(f"compiled in {compile_s:.1f} s")
    mem = memory_report(compiled)
    flops = batch_step_flops(cfg.model, local, freeze.adapter_trained(setup.trainable))
    return {"devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind,
            "mesh": {k: int(v) for k, v in setup.mesh.shape.items()},
            "tasks": list(names), "source": cfg.data.source,
            "batch_spec": {k: list(v.shape) for k, v in setup.batch_spec.items()},
            "per_device_bytes": mem, "per_device_gib": round(mem["total"] / GiB, 3),
            "state_gib": round(sum(x.size * x.dtype.itemsize
                                   for x in jax.tree.leaves(setup.abstract_state)) / GiB, 3),
            "model_flops_first_batch": flops["total"] * jax.process_count(),
            "setup_s": round(t1 - t0, 2), "compile_s": round(compile_s, 2),
            "warnings": warnings if data_lib.reads_encoder_audio(cfg) else []}


def format_dry_run(r: dict) -> str:
    warnings = [f"warning: {w}" for w in r.get("warnings", [])]
    if r.get("bench") == "compile":
        return "\n".join([_format_topology_dry_run(r), *warnings])
    spec = ", ".join(f"{k} {v}" for k, v in r["batch_spec"].items())
    m = r["per_device_bytes"]
    return "\n".join([
        f"dry run: nothing written. {r['devices']} x {r['device_kind']}, mesh {r['mesh']}",
        f"data: {r['source']} ({', '.join(r['tasks']) or 'no task ids'}); first batch matches "
        f"the batch contract: {spec}",
        f"train state {r['state_gib']} GiB in all; per device at peak {r['per_device_gib']} GiB "
        f"(arguments {m['argument'] / GiB:.3f}, temporaries {m['temp'] / GiB:.3f} GiB)",
        f"model FLOPs of the first batch's step: {r['model_flops_first_batch']:.3e}; "
        f"compiled in {r['compile_s']} s (set-up {r['setup_s']} s)", *warnings])


def _format_topology_dry_run(r: dict) -> str:
    m = r["per_chip_bytes"]
    if m is None:  # XLA:TPU refused: out of HBM
        return "\n".join([
            f"dry run for {r['topology']}: nothing written, no data read (compile only)",
            *summary_lines(r), f"does NOT fit per chip: {r['compile_error']}"])
    hbm = ("" if r["hbm_bytes"] is None else
           f" of {r['hbm_gib']:g} GiB HBM: {'fits' if r['fits'] else 'does NOT fit'}")
    return "\n".join([
        f"dry run for {r['topology']}: nothing written, no data read (compile only)", *summary_lines(r),
        f"per chip at peak {r['per_chip_gib']} GiB{hbm} (arguments {m['argument'] / GiB:.3f}, "
        f"temporaries {m['temp'] / GiB:.3f} GiB)",
        f"model FLOPs per step (upper bound) {r['model_flops_per_step']:.3e}; compiled in "
        f"{r['compile_s']} s"])
