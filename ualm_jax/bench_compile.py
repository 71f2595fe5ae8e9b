"""`ualm bench compile`: compiles the real train step ahead of time for a TPU topology (or N local
CPU devices) without running it, and reports per-chip memory from the compiled executable.

TPU topologies need `libtpu` (the version `jax[tpu]` pins; see requirements-tpu.txt) but no TPU:
libtpu's compile-only client builds the topology's devices from its name, the state and batch are
`ShapeDtypeStruct`s sharded over a mesh of those devices, and XLA:TPU compiles the step. Nothing
is allocated: the 7B step for v5p-128 compiles in ~5 min on 2 CPU cores.

Topologies: Cloud TPU names (`v5p-128`, `v4-32`: TensorCores; `v5e-8`, `v6e-16`: chips), an explicit
chip grid (`v5p:4x4x4`, `v5e:2x4`), or `cpu:N` (N host CPU devices, for tests; `fits` is None).
"""
from __future__ import annotations

import importlib.util
import math
import os
import re
import time
from dataclasses import dataclass, field

import jax

from ualm_jax.config import ConfigError
from ualm_jax.model.flops import step_flops
from ualm_jax.train import freeze

GiB = 1024 ** 3

# generation -> (chip grid dims, TensorCores per chip counted by the Cloud TPU name, HBM per chip,
#                libtpu chip config). v4/v5p are megacore: one JAX device per chip.
_GENERATIONS = {
    "v4": dict(ndim=3, cores_in_name=2, hbm=32 * GiB, chip_config="megacore"),
    "v5p": dict(ndim=3, cores_in_name=2, hbm=95 * GiB, chip_config="megacore"),
    "v5e": dict(ndim=2, cores_in_name=1, hbm=16 * GiB, chip_config="default"),
    "v6e": dict(ndim=2, cores_in_name=1, hbm=32 * GiB, chip_config="default"),
}
_ALIASES = {"v5": "v5p", "v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e"}
LIBTPU_PIN = "libtpu==0.0.42.*"  # what jax[tpu]==0.10.2 requires
INSTALL_HINT = ("pip install -r requirements.lock -r requirements-tpu.txt (no TPU is needed "
                "to compile)")


class TpuCompileUnavailable(RuntimeError):
    """libtpu (the TPU compiler) is not importable, so no TPU topology can be built."""


@dataclass
class Topology:
    name: str                       # as given
    platform: str                   # "tpu" | "cpu"
    chips: int
    generation: str | None = None   # v4 | v5p | v5e | v6e
    grid: tuple[int, ...] = ()      # chip grid, e.g. (4, 4, 4)
    hbm_bytes: int | None = None
    libtpu_kwargs: dict = field(default_factory=dict)

    @property
    def libtpu_name(self) -> str:
        return f"{self.generation}:{'x'.join(map(str, self.grid))}"


def _default_grid(chips: int, ndim: int) -> tuple[int, ...]:
    """Cloud TPU's default slice shapes: 2D 1x1, 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16; 3D 2x2x1,
    2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ... (double the last of the smallest dimensions)."""
    dims = [1] * ndim
    if ndim == 3:
        dims = [2, 2, 1]
        if chips < 4:
            raise ConfigError(f"a 3D TPU slice has at least 4 chips, got {chips}")
    while math.prod(dims) < chips:
        low = min(dims)
        i = max(j for j, d in enumerate(dims) if d == low)
        dims[i] *= 2
    if math.prod(dims) != chips:
        raise ConfigError(f"{chips} chips is not a power of two: give the chip grid explicitly, "
                          f"e.g. v5p:4x4x12")
    return tuple(dims)


def parse_topology(text: str) -> Topology:
    """`cpu:N`, `v5p-128` (Cloud TPU accelerator name) or `v5p:4x4x4` (chip grid)."""
    t = text.strip().lower()
    known = ", ".join(sorted(_GENERATIONS))
    m = re.fullmatch(r"cpu:(\d+)", t)
    if m:
        n = int(m.group(1))
        if n < 1:
            raise ConfigError(f"--topology {text!r}: cpu:N needs N >= 1")
        return Topology(text, "cpu", n)
    m = re.fullmatch(r"([a-z0-9]+)(?:-(\d+)|:(\d+(?:x\d+)*))", t)
    gen = _ALIASES.get(m.group(1), m.group(1)) if m else None
    if gen not in _GENERATIONS:
        raise ConfigError(f"--topology {text!r} is unknown: use cpu:N, a Cloud TPU name such as "
                          f"v5p-128 / v5e-8, or a chip grid such as v5p:4x4x4 "
                          f"(generations: {known})")
    spec = _GENERATIONS[gen]
    if m.group(2):
        cores = int(m.group(2))
        if cores % spec["cores_in_name"] or cores == 0:
            raise ConfigError(f"--topology {text!r}: {gen}-N counts TensorCores "
                              f"({spec['cores_in_name']} per chip), so N must be a positive "
                              f"multiple of {spec['cores_in_name']}")
        grid = _default_grid(cores // spec["cores_in_name"], spec["ndim"])
    else:
        grid = tuple(int(x) for x in m.group(3).split("x"))
        if len(grid) != spec["ndim"] or min(grid) < 1:
            raise ConfigError(f"--topology {text!r}: {gen} chip grids have {spec['ndim']} positive "
                              f"dimensions, e.g. {'v5p:4x4x4' if spec['ndim'] == 3 else 'v5e:2x4'}")
    # Full 3D tori (every side >= 4) wrap around; smaller slices and 2D grids are open meshes
    # except 16-long 2D sides. Affects collective routing, not memory.
    wrap = (tuple(min(grid) >= 4 for _ in grid) if spec["ndim"] == 3
            else tuple(d >= 16 for d in grid) + (False,))
    host = (min(grid[0], 2), min(grid[1], 2), 1)  # 4-chip hosts; a 1- or 2-chip slice has one
    kwargs = dict(chip_config_name=spec["chip_config"], chips_per_host_bounds=host,
                  num_slices=1, wrap=wrap)
    return Topology(text, "tpu", math.prod(grid), gen, grid, spec["hbm"], kwargs)


def _tpu_env(topo: Topology) -> None:
    """libtpu's start-up looks for a Cloud TPU VM (metadata server, worker list); tell it this is
    a lone compile-only host so it neither queries the network nor prints warnings."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_WORKER_ID", "0")
    cores = topo.chips * _GENERATIONS[topo.generation]["cores_in_name"]
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


def _cost_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None and flops >= 0 else None


def bench_compile(model: str = "7b", topology: str = "v5p-128", batch: int | None = None,
                  seq: int = 4096, mesh: str | None = None, microbatches: int = 1, overrides=(),
                  text_only: bool = False) -> dict:
    """Lowers and compiles `ualm train`'s step (train/setup.py) for `topology` on the batch
    contract's abstract batch (format/batch.py: data.max_clips_per_row full encoder windows with
    their mel masks); JSON-able report.

    batch defaults to one sequence per data-parallel shard (data x fsdp devices)."""
    from ualm_jax.bench import bench_config, bench_setup
    from ualm_jax.sharding import make_mesh

    topo = parse_topology(topology)
    cfg = bench_config(model, mesh, text_only, overrides)
    devices = topology_devices(topo)
    shape = {k: int(v) for k, v in make_mesh(cfg.mesh, devices).shape.items()}
    if batch is None:
        batch = shape["data"] * shape["fsdp"] * microbatches
    if batch < 1 or batch % microbatches:
        raise ConfigError(f"--batch={batch} must be positive and divisible by "
                          f"--microbatches={microbatches}")
    shards = shape["data"] * shape["fsdp"]
    if batch % shards:  # it would compile, with every chip holding the whole batch
        raise ConfigError(f"--batch={batch} does not split over the mesh's data x fsdp = {shards} "
                          f"batch shards: use a multiple of {shards}")
    t0 = time.perf_counter()
    setup = bench_setup(cfg, batch, seq, microbatches, devices)
    lowered = setup.step_fn.lower(setup.abstract_state, setup.batch_spec)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t1
    mem = memory_report(compiled)
    flops_chip = _cost_flops(compiled)
    hbm = topo.hbm_bytes
    # The analytic count for the worst case the spec allows: one segment per row, every clip
    # slot a window of audio.
    clips = setup.batch_spec.get("audio_mel_mask")
    windows = 0 if clips is None else clips.shape[0] * clips.shape[1]
    model_flops = step_flops(cfg.model, batch, seq, batch * seq * (seq + 1) // 2, windows,
                             freeze.adapter_trained(setup.trainable))
    return {
        "bench": "compile", "model": model, "topology": topo.name, "platform": topo.platform,
        "libtpu_topology": topo.libtpu_name if topo.platform == "tpu" else None,
        "device_kind": devices[0].device_kind, "chips": len(devices), "mesh": shape,
        "batch": batch, "seq": seq, "microbatches": microbatches, "text_only": text_only,
        "remat": cfg.model.remat, "dtype": cfg.model.dtype,
        "batch_spec": {k: [list(v.shape), str(v.dtype)] for k, v in setup.batch_spec.items()},
        "stage": cfg.train.stage, "encoder_frozen": cfg.model.audio_encoder.frozen,
        "per_chip_bytes": mem, "per_chip_gib": round(mem["total"] / GiB, 3),
        "hbm_bytes": hbm, "hbm_gib": None if hbm is None else hbm / GiB,
        "fits": None if hbm is None else mem["total"] <= hbm,
        "lower_s": round(t1 - t0, 3), "compile_s": round(compile_s, 3),
        # XLA's cost analysis of one chip's partition, times the chips. It counts the body of
        # every while loop once (scanned layers, microbatches, loss chunks), so with
        # model.scan_layers it is far below model_flops_per_step (the analytic count).
        "flops_per_step": None if flops_chip is None else flops_chip * len(devices),
        "flops_per_chip": flops_chip,
        "flops_note": "XLA cost analysis; while-loop bodies (scanned layers) counted once",
        "model_flops_per_step": model_flops["total"], "model_flops_by_part": model_flops,
        "model_flops_note": "one segment per row, every clip slot holding audio (upper bound)",
    }


def dry_run(cfg) -> dict:
    """`ualm train --dry-run`: the run's setup (train/setup.py) on this machine's devices, its
    first batch read and checked against the batch contract, the train step compiled ahead of
    time on abstract inputs; per-device memory and the step's model FLOPs. Writes nothing."""
    from ualm_jax.format.batch import check_batch, host_batch_spec
    from ualm_jax.model.flops import batch_step_flops
    from ualm_jax.train import data as data_lib
    from ualm_jax.train.setup import setup_training

    t0 = time.perf_counter()
    names = data_lib.task_names(cfg)
    setup = setup_training(cfg, names)
    it = data_lib.make_train_iterator(cfg)
    local = data_lib.process_rows(next(it), it.per_host)
    check_batch(local, host_batch_spec(cfg, jax.process_count()), f"{type(it).__name__} batch")
    t1 = time.perf_counter()
    compiled = setup.step_fn.lower(setup.abstract_state, setup.batch_spec).compile()
    compile_s = time.perf_counter() - t1
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
            "setup_s": round(t1 - t0, 2), "compile_s": round(compile_s, 2)}


def format_dry_run(r: dict) -> str:
    spec = ", ".join(f"{k} {v}" for k, v in r["batch_spec"].items())
    m = r["per_device_bytes"]
    return "\n".join([
        f"dry run: nothing written. {r['devices']} x {r['device_kind']}, mesh {r['mesh']}",
        f"data: {r['source']} ({', '.join(r['tasks']) or 'no task ids'}); first batch matches "
        f"the batch contract: {spec}",
        f"train state {r['state_gib']} GiB in all; per device at peak {r['per_device_gib']} GiB "
        f"(arguments {m['argument'] / GiB:.3f}, temporaries {m['temp'] / GiB:.3f} GiB)",
        f"model FLOPs of the first batch's step: {r['model_flops_first_batch']:.3e}; "
        f"compiled in {r['compile_s']} s (set-up {r['setup_s']} s)"])
