"""`ualm bench compile`: compiles the real train step ahead of time for a TPU topology (or N local
CPU devices) without running it, and reports per-chip memory from the compiled executable.

TPU topologies need `libtpu` (the version `jax[tpu]` pins; see requirements-tpu.txt) but no TPU:
libtpu's compile-only client builds the topology's devices from its name, the state and batch are
`ShapeDtypeStruct`s sharded over a mesh of those devices, and XLA:TPU compiles the step. Nothing
is allocated: the 7B step for v5p-128 compiles in ~5 min on 2 CPU cores.

What is compiled: `--config FILE` plus KEY=VALUE overrides resolved exactly as `ualm train`
resolves them (`ualm train --config FILE --dry-run --topology T` runs the same compile), or
without a config a model preset. The flags --batch/--seq/--microbatches/--mesh stand for
train.batch_size/seq_len/microbatches and mesh.ici.* and win over both. Progress lines go to
stderr (a large compile takes minutes); the JSON record names the config, the model's dimensions
and parameter count. The compile itself is ualm_jax/train/topology_compile.py's (training owns
it); this module turns the bench's preset and flags into the config it compiles.

Topologies: Cloud TPU names (`v5p-128`, `v4-32`: TensorCores; `v5e-8`, `v6e-16`: chips), an explicit
chip grid (`v5p:4x4x4`, `v5e:2x4`), or `cpu:N` (N host CPU devices, for tests; `fits` is None).
"""
from __future__ import annotations

from ualm_jax.config import ConfigError
from ualm_jax.topology import parse_topology  # noqa: F401 - re-exported
from ualm_jax.train.topology_compile import CompilePlan, compile_plan, plan_for, print_progress


def _flag_overrides(seq, microbatches, mesh, text_only) -> list[str]:
    """The bench flags as the dotted overrides they stand for (applied after the user's own)."""
    from ualm_jax.sharding import parse_mesh_arg

    over = []
    if seq is not None:
        over.append(f"train.seq_len={seq}")
    if microbatches is not None:
        over.append(f"train.microbatches={microbatches}")
    if mesh:
        sizes = parse_mesh_arg(mesh)
        over += [f"mesh.ici.{a}={getattr(sizes, a)}" for a in ("data", "fsdp", "tensor")]
    if text_only:
        over += ["model.num_codebooks=0", "model.audio_encoder.enabled=false"]
    return over


def _given(overrides, key: str) -> str | None:
    """The last value `overrides` give `key`, else None."""
    values = [o.partition("=")[2] for o in overrides if o.partition("=")[0].strip() == key]
    return values[-1].strip() if values else None


def plan_compile(topology: str, config: str | None = None, model: str | None = None,
                 overrides=(), batch: int | None = None, seq: int | None = None,
                 mesh: str | None = None, microbatches: int | None = None,
                 text_only: bool = False) -> CompilePlan:
    """`ualm bench compile`'s config: `config` + overrides resolved as `ualm train` resolves them
    (load_config), or without a config the `model` preset (default tiny) at seq 4096 with one
    sequence per data x fsdp shard. The flags win over both: --seq, --microbatches, --mesh and
    --batch set train.seq_len, train.microbatches, mesh.ici.* and train.batch_size."""
    from ualm_jax.config import load_config

    if config and model:
        raise ConfigError(f"--model {model} and --config {config}: the config names its model; "
                          f"to change it add the override model.preset={model}")
    topo = parse_topology(topology)
    flags = _flag_overrides(seq, microbatches, mesh, text_only)
    base = [] if config else [f"model.preset={model or 'tiny'}", "train.seq_len=4096",
                              "train.microbatches=1"]
    if batch is not None:
        flags.append(f"train.batch_size={batch}")
    auto_batch = not config and batch is None and _given(overrides, "train.batch_size") is None
    if auto_batch:  # a placeholder that passes validation until the mesh sets it
        mb = microbatches or _given(overrides, "train.microbatches") or 1
        base.append(f"train.batch_size={mb}")
    cfg = load_config(config, base + list(overrides) + flags)
    return plan_for(cfg, topo, config, overrides, auto_batch)


def bench_compile(model: str | None = None, topology: str = "v5p-128", batch: int | None = None,
                  seq: int | None = None, mesh: str | None = None,
                  microbatches: int | None = None, overrides=(), text_only: bool = False,
                  config: str | None = None, progress=print_progress) -> dict:
    """`ualm bench compile`: plan_compile's config compiled for `topology` (compile_plan)."""
    return compile_plan(plan_compile(topology, config, model, overrides, batch, seq, mesh,
                                     microbatches, text_only), progress)
