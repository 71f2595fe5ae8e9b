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
    """Lowers and compiles the `bench step` train step for `topology`; JSON-able report.

    batch defaults to one sequence per data-parallel shard (data x fsdp devices)."""
    from ualm_jax.bench import bench_config, bench_host_batch, bench_train_step
    from ualm_jax.checkpoint import with_shardings
    from ualm_jax.model.flops import flops_per_token
    from ualm_jax.sharding import batch_sharding, make_mesh
    from ualm_jax.train.state import abstract_state

    topo = parse_topology(topology)
    cfg = bench_config(model, mesh, text_only, overrides)
    devices = topology_devices(topo)
    dev_mesh = make_mesh(cfg.mesh, devices)
    shape = {k: int(v) for k, v in dev_mesh.shape.items()}
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
    # One host row gives every input's trailing shape and dtype; the batch itself stays abstract.
    row = bench_host_batch(cfg, 1, seq, text_only)
    rules = cfg.mesh.rules
    abstract_batch = {}
    for k, v in row.items():
        full = (batch,) + v.shape[1:]
        sharding = batch_sharding(dev_mesh, rules, v.ndim, full)
        abstract_batch[k] = jax.ShapeDtypeStruct(full, v.dtype, sharding=sharding)
    b_shard = {k: v.sharding for k, v in abstract_batch.items()}
    step_fn, shardings, m, tx = bench_train_step(cfg, dev_mesh, b_shard, steps=1,
                                                 microbatches=microbatches)
    state = with_shardings(abstract_state(m, tx), shardings)
    lowered = step_fn.lower(state, abstract_batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t1
    mem = memory_report(compiled)
    flops_chip = _cost_flops(compiled)
    hbm = topo.hbm_bytes
    return {
        "bench": "compile", "model": model, "topology": topo.name, "platform": topo.platform,
        "libtpu_topology": topo.libtpu_name if topo.platform == "tpu" else None,
        "device_kind": devices[0].device_kind, "chips": len(devices), "mesh": shape,
        "batch": batch, "seq": seq, "microbatches": microbatches, "text_only": text_only,
        "remat": cfg.model.remat, "dtype": cfg.model.dtype,
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
        "model_flops_per_step": flops_per_token(cfg.model, seq) * batch * seq,
    }
