"""The train step compiled ahead of time for a topology's devices without running it: TPU
slices through libtpu's compile-only client (no TPU needed), or N host CPU devices, and per-chip
memory from the compiled executable. `ualm train --dry-run --topology` and `ualm bench compile`
(ualm_jax/tools/bench_compile.py) both compile through here.

The state and batch are `ShapeDtypeStruct`s sharded over a mesh of the topology's devices and
XLA compiles `ualm train`'s step (train/setup.py); nothing is allocated, so the 7B step for
v5p-128 compiles in ~5 min on 2 CPU cores. Progress lines go to stderr.
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys
import time
from dataclasses import dataclass

import jax

from ualm_jax.config import ConfigError
from ualm_jax.model.flops import step_flops
from ualm_jax.topology import GiB, Topology, parse_topology
from ualm_jax.train import freeze

LIBTPU_PIN = "libtpu==0.0.42.*"  # what jax[tpu]==0.10.2 requires
INSTALL_HINT = ("pip install -r requirements.lock -r requirements-tpu.txt (no TPU is needed "
                "to compile)")


class TpuCompileUnavailable(RuntimeError):
    """libtpu (the TPU compiler) is not importable, so no TPU topology can be built."""


def _tpu_env(topo: Topology) -> None:
    """libtpu's start-up looks for a Cloud TPU VM (metadata server, worker list); tell it this is
    a lone compile-only host so it neither queries the network nor prints warnings."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_WORKER_ID", "0")
    cores = topo.chips * topo.cores_in_name
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{topo.generation}-{cores}")
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized() and not jax.config.jax_platforms:
        # With libtpu importable JAX would try (and fail) to open a local TPU as the default
        # backend; the host side of compilation only needs the CPU.
        jax.config.update("jax_platforms", "cpu")


def topology_devices(topo: Topology) -> list:
    """The topology's devices: compile-only TPU devices, or the first N host CPU devices."""
    if topo.platform == "cpu":
        from jax._src import xla_bridge

        if (not xla_bridge.backends_are_initialized()
                and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", "")
                and xla_bridge.num_cpu_devices.value < topo.chips):
            jax.config.update("jax_num_cpu_devices", topo.chips)
        devs = jax.devices("cpu")
        if len(devs) < topo.chips:
            raise ConfigError(f"--topology {topo.name} needs {topo.chips} CPU devices but JAX has "
                              f"{len(devs)}: set XLA_FLAGS=--xla_force_host_platform_device_count="
                              f"{topo.chips} before JAX starts")
        return devs[:topo.chips]
    if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
        raise TpuCompileUnavailable(
            f"compiling for TPU topology {topo.name!r} needs libtpu ({LIBTPU_PIN}, the version "
            f"jax[tpu]=={jax.__version__} pins), which is not installed: {INSTALL_HINT}. "
            f"Without it use --topology cpu:N.")
    _tpu_env(topo)
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(topology_name=topo.libtpu_name, platform="tpu",
                                            **topo.libtpu_kwargs)
    except RuntimeError as e:  # JaxRuntimeError: libtpu rejected the name or its options
        raise ConfigError(f"--topology {topo.name} ({topo.libtpu_name}): libtpu: {e}") from None
    devs = list(desc.devices)
    if len(devs) != topo.chips:
        raise RuntimeError(f"libtpu made {len(devs)} devices for {topo.libtpu_name}, expected "
                           f"{topo.chips} (one per chip)")
    return devs


def memory_report(compiled) -> dict:
    """Per-device bytes from the executable's memory analysis; `total` = what must be resident at
    peak: arguments + outputs not aliased to (donated) arguments + temporaries + code."""
    ma = compiled.memory_analysis()
    if ma is None:
        raise RuntimeError("this backend gives no memory analysis for compiled executables")
    arg, out = ma.argument_size_in_bytes, ma.output_size_in_bytes
    alias, temp = ma.alias_size_in_bytes, ma.temp_size_in_bytes
    code = ma.generated_code_size_in_bytes
    return {"argument": int(arg), "output": int(out), "alias": int(alias), "temp": int(temp),
            "generated_code": int(code), "total": int(arg + out - alias + temp + code)}


def _out_of_memory(e: Exception) -> str | None:
    """XLA:TPU's own verdict when the step cannot fit the chip's HBM (it refuses to compile), as
    one line; None for any other failure."""
    text = " ".join(str(e).split())
    if "RESOURCE_EXHAUSTED" not in text:
        return None
    return text.split("RESOURCE_EXHAUSTED:", 1)[-1].strip()[:400]


def _cost_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None and flops >= 0 else None


@dataclass
class CompilePlan:
    """What will be compiled, settled before anything is traced: the resolved config (its
    train.batch_size / seq_len / microbatches are the step's), where it came from, the
    topology's devices and the mesh over them."""
    cfg: object
    topo: Topology
    devices: list
    mesh: dict
    config: str | None = None       # the YAML file, None for a preset
    overrides: tuple = ()


def plan_for(cfg, topology: Topology | str, config: str | None = None, overrides=(),
             auto_batch: bool = False) -> CompilePlan:
    """The plan for an already resolved config (`ualm train --dry-run --topology`); auto_batch:
    one sequence per data x fsdp shard and microbatch instead of train.batch_size."""
    from ualm_jax.sharding import make_mesh

    topo = parse_topology(topology) if isinstance(topology, str) else topology
    if cfg.train.mode == "dpo" and cfg.dpo.reference == "online":
        raise ConfigError("train.mode=dpo with dpo.reference=online cannot be compiled ahead of "
                          "time (its reference parameters are read from train.init_from): use "
                          "dpo.reference=offline, or train.mode=lm to size the policy's step")
    devices = topology_devices(topo)
    shape = {k: int(v) for k, v in make_mesh(cfg.mesh, devices).shape.items()}
    shards = shape["data"] * shape["fsdp"]
    t = cfg.train
    if auto_batch:
        t.batch_size = shards * t.microbatches
        t.validate()
    if t.batch_size % shards:  # it would compile, with every chip holding the whole batch
        raise ConfigError(f"train.batch_size={t.batch_size} (--batch) does not split over the "
                          f"mesh's data x fsdp = {shards} batch shards: use a multiple of {shards}")
    return CompilePlan(cfg, topo, devices, shape, str(config) if config else None,
                       tuple(overrides))


def print_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _billions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def model_dims(m) -> dict:
    """The shape-defining fields of the compiled model, so a wrong model cannot hide."""
    enc = m.audio_encoder
    return {"d_model": m.d_model, "n_layers": m.n_layers, "n_heads": m.n_heads,
            "n_kv_heads": m.n_kv_heads, "head_dim": m.head_dim, "d_ff": m.d_ff,
            "text_vocab_size": m.text_vocab_size, "num_codebooks": m.num_codebooks,
            "codebook_size": m.codebook_size,
            "audio_encoder": ({"d_model": enc.d_model, "n_layers": enc.n_layers,
                               "n_heads": enc.n_heads, "frozen": enc.frozen}
                              if enc.enabled else None)}


def summary_lines(r: dict) -> list[str]:
    d, p = r["model_dims"], r["parameters"]
    enc = d["audio_encoder"]
    src = f"config {r['config']}" if r["config"] else f"preset {r['model']}"
    if r["overrides"]:
        src += f" + {' '.join(r['overrides'])}"
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
    return [f"{src}: model {r['model']} (d_model {d['d_model']}, {d['n_layers']} layers, "
            f"{d['n_heads']} heads / {d['n_kv_heads']} kv, d_ff {d['d_ff']}, "
            f"{d['num_codebooks']} codebooks, encoder "
            f"{'none' if enc is None else str(enc['n_layers']) + ' x ' + str(enc['d_model'])}), "
            f"{_billions(p['total'])} parameters ({_billions(p['trainable'])} trained, stage "
            f"{r['stage']})",
            f"batch {r['batch']} x seq {r['seq']}, microbatches {r['microbatches']}, remat "
            f"{r['remat']}, {r['dtype']}; topology {r['topology']}: {r['chips']} x "
            f"{r['device_kind']}, mesh {mesh}"]


def compile_plan(plan: CompilePlan, progress=print_progress, summary: bool = True) -> dict:
    """Lowers and compiles `ualm train`'s step (train/setup.py: same freeze masks, task ids and
    batch contract) for the plan's devices on abstract inputs; JSON-able report. progress (None:
    silent) gets a line before the compile, which can take minutes, and one after; with
    `summary`, first the lines saying what is compiled (the dry run's report says them itself)."""
    from ualm_jax.train import data as data_lib
    from ualm_jax.train.setup import setup_training

    say = progress or (lambda line: None)
    cfg, topo, devices = plan.cfg, plan.topo, plan.devices
    t = cfg.train
    batch, seq = t.batch_size, t.seq_len
    t0 = time.perf_counter()
    setup = setup_training(cfg, data_lib.task_names(cfg), devices=devices, rows=batch)
    shapes = setup.params_info["params"]
    params = {"total": int(sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))),
              "trainable": int(freeze.count_trainable(setup.trainable, shapes))}
    rec = {
        "bench": "compile", "config": plan.config, "overrides": list(plan.overrides),
        "model": cfg.model.preset, "model_dims": model_dims(cfg.model), "parameters": params,
        "topology": topo.name, "platform": topo.platform,
        "libtpu_topology": topo.libtpu_name if topo.platform == "tpu" else None,
        "device_kind": devices[0].device_kind, "chips": len(devices), "mesh": plan.mesh,
        "batch": batch, "seq": seq, "microbatches": t.microbatches,
        "text_only": cfg.model.num_codebooks == 0 and not cfg.model.audio_encoder.enabled,
        "remat": cfg.model.remat, "dtype": cfg.model.dtype, "param_dtype": cfg.model.param_dtype,
        "train_mode": t.mode, "tasks": list(setup.task_names),
        "batch_spec": {k: [list(v.shape), str(v.dtype)] for k, v in setup.batch_spec.items()},
        "stage": t.stage, "encoder_frozen": cfg.model.audio_encoder.frozen,
        **_model_flops(cfg, setup),
    }
    for line in summary_lines(rec) if summary else ():
        say(line)
    say(f"compiling the train step for {topo.name} ... (minutes for billions of parameters)")
    lowered = setup.step_fn.lower(setup.abstract_state, setup.batch_spec)
    t1 = time.perf_counter()
    hbm = topo.hbm_bytes
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - only XLA:TPU's out-of-HBM refusal is an answer
        oom = _out_of_memory(e)
        if oom is None:
            raise
        compile_s = time.perf_counter() - t1
        say(f"does NOT fit: {oom} (after {compile_s:.1f} s); try more chips, a larger "
            f"train.microbatches or a smaller train.batch_size")
        return {**rec, "per_chip_bytes": None, "per_chip_gib": None, "hbm_bytes": hbm,
                "hbm_gib": None if hbm is None else hbm / GiB, "fits": False,
                "compile_error": oom, "lower_s": round(t1 - t0, 3),
                "compile_s": round(compile_s, 3)}
    compile_s = time.perf_counter() - t1
    mem = memory_report(compiled)
    flops_chip = _cost_flops(compiled)
    fits = None if hbm is None else mem["total"] <= hbm
    say(f"compiled in {compile_s:.1f} s (lowering {t1 - t0:.1f} s): {mem['total'] / GiB:.3f} GiB "
        f"per chip at peak" + ("" if hbm is None else f" of {hbm / GiB:g} GiB HBM: "
                               f"{'fits' if fits else 'does NOT fit'}"))
    return {
        **rec,
        "per_chip_bytes": mem, "per_chip_gib": round(mem["total"] / GiB, 3),
        "hbm_bytes": hbm, "hbm_gib": None if hbm is None else hbm / GiB, "fits": fits,
        "lower_s": round(t1 - t0, 3), "compile_s": round(compile_s, 3),
        # XLA's cost analysis of one chip's partition, times the chips. It counts the body of
        # every while loop once (scanned layers, microbatches, loss chunks), so with
        # model.scan_layers it is far below model_flops_per_step (the analytic count).
        "flops_per_step": None if flops_chip is None else flops_chip * len(devices),
        "flops_per_chip": flops_chip,
        "flops_note": "XLA cost analysis; while-loop bodies (scanned layers) counted once",
    }


def _model_flops(cfg, setup) -> dict:
    """The analytic count for the worst case the batch spec allows: one segment per row, every
    clip slot a window of audio."""
    batch, seq = cfg.train.batch_size, cfg.train.seq_len
    clips = setup.batch_spec.get("audio_mel_mask")
    windows = 0 if clips is None else clips.shape[0] * clips.shape[1]
    flops = step_flops(cfg.model, batch, seq, batch * seq * (seq + 1) // 2, windows,
                       freeze.adapter_trained(setup.trainable))
    return {"model_flops_per_step": flops["total"], "model_flops_by_part": flops,
            "model_flops_note": "one segment per row, every clip slot holding audio (upper bound)"}
