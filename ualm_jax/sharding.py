"""Device mesh, logical-axis rules and the helpers that shard parameters and batches.

Every parameter and key activation carries logical axis names (`batch`, `embed`, `heads`, ...).
`MeshConfig.rules` maps each name to mesh axes (`data`, `fsdp`, `tensor`); data parallel, FSDP
and tensor parallel differ only in mesh sizes. A mesh axis that does not divide a dimension is
dropped for that dimension (e.g. 2 KV heads on tensor=4 stay replicated) rather than failing.
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ualm_jax.config import MESH_AXES, AxisSizes, ConfigError, MeshConfig


def resolve_axis_sizes(cfg: MeshConfig, num_devices: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Returns (ici, dcn) sizes with the one -1 filled in (MeshConfig.axis_sizes); on this host's
    own CPU devices a mismatch also says how to get more."""
    try:
        return cfg.axis_sizes(num_devices)
    except ConfigError as e:
        hint = "" if "-1" in str(e) else cpu_devices_hint(
            math.prod(abs(getattr(s, a)) for s in (cfg.ici, cfg.dcn) for a in MESH_AXES), num_devices)
        if not hint:
            raise
        raise ConfigError(str(e) + hint) from None


def cpu_devices_hint(wanted: int, present: int) -> str:
    """When the mesh is laid over this CPU host's own devices and they are too few: how to get
    fake ones (what `make` sets), else ''."""
    import os

    if jax.default_backend() != "cpu" or present != jax.device_count() or present >= wanted:
        return ""
    flag = "--xla_force_host_platform_device_count"
    if flag in os.environ.get("XLA_FLAGS", ""):
        return ""
    return (f" (on CPU, run with XLA_FLAGS={flag}={wanted} to get {wanted} host devices, as "
            "`make demo` and `make test` do)")


def make_mesh(cfg: MeshConfig, devices: Optional[Sequence[Any]] = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    ici, dcn = resolve_axis_sizes(cfg, len(devices))
    total = tuple(a * b for a, b in zip(ici, dcn))
    from jax.experimental import mesh_utils

    if math.prod(dcn) > 1:
        if all(hasattr(d, "slice_index") for d in devices):
            dev = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
        else:  # no slice topology (CPU, one GPU host): slices are consecutive device blocks
            dev = np.asarray(devices).reshape(*dcn, *ici).transpose(0, 3, 1, 4, 2, 5)
            dev = dev.reshape(total)
    else:
        try:
            dev = mesh_utils.create_device_mesh(total, devices=devices)
        except (AssertionError, NotImplementedError, ValueError):
            dev = np.asarray(devices).reshape(total)
    return Mesh(dev, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def parse_mesh_arg(text: str) -> AxisSizes:
    """`data=2,fsdp=2,tensor=2` -> AxisSizes; unspecified axes are 1."""
    sizes = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise ConfigError(f"--mesh part {part!r} must look like axis=size")
        k, v = part.split("=", 1)
        if k not in MESH_AXES:
            raise ConfigError(f"--mesh axis {k!r} is unknown; mesh axes are {', '.join(MESH_AXES)}")
        try:
            sizes[k] = int(v)
        except ValueError:
            raise ConfigError(f"--mesh {k}={v!r} must be an integer") from None
    return AxisSizes(**{a: sizes.get(a, 1) for a in MESH_AXES})


# --------------------------------------------------------------------------------------------
# Logical axes -> PartitionSpec
# --------------------------------------------------------------------------------------------


def _mesh_axes_for(name: Optional[str], rules: dict) -> tuple[str, ...]:
    if name is None:
        return ()
    if name not in rules:
        raise ConfigError(f"logical axis {name!r} has no entry in mesh.rules")
    target = rules[name]
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def logical_to_spec(names: Sequence[Optional[str]], rules: dict, mesh: Mesh,
                    shape: Optional[Sequence[int]] = None) -> P:
    """Maps logical names to a PartitionSpec, keeping only mesh axes that divide the dimension
    and are not already used by an earlier dimension."""
    used: set[str] = set()
    out = []
    for i, name in enumerate(names):
        axes = []
        size = 1
        for ax in _mesh_axes_for(name, rules):
            n = mesh.shape[ax]
            if ax in used or n == 1:
                continue
            if shape is not None and shape[i] % (size * n):
                continue
            axes.append(ax)
            size *= n
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return P(*out)


def tree_shardings(logical_tree, shape_tree, mesh: Mesh, rules: dict):
    """NamedShardings for a tree of logical PartitionSpecs and a matching tree of shapes."""
    def one(names, x):
        return NamedSharding(mesh, logical_to_spec(tuple(names), rules, mesh, x.shape))

    return jax.tree.map(one, logical_tree, shape_tree, is_leaf=lambda n: isinstance(n, P))


# --------------------------------------------------------------------------------------------
# Activation constraints: a no-op unless a mesh context is active (single-device use stays plain).
# --------------------------------------------------------------------------------------------

_ctx = threading.local()


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: dict):
    prev = getattr(_ctx, "value", None)
    _ctx.value = (mesh, rules)
    try:
        yield
    finally:
        _ctx.value = prev


def constrain(x, names: Sequence[Optional[str]]):
    value = getattr(_ctx, "value", None)
    if value is None:
        return x
    mesh, rules = value
    spec = logical_to_spec(names, rules, mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_shard_count(mesh: Mesh, rules: dict) -> int:
    """Into how many parts a batch's rows split over `mesh` (the mesh axes of `act_batch`)."""
    return math.prod(mesh.shape[a] for a in _mesh_axes_for("act_batch", rules))


def batch_sharding(mesh: Mesh, rules: dict, ndim: int, shape=None) -> NamedSharding:
    names = ("act_batch",) + (None,) * (ndim - 1)
    return NamedSharding(mesh, logical_to_spec(names, rules, mesh, shape))


def shard_batch(batch: dict, mesh: Mesh, rules: dict) -> dict:
    """Places a host-global numpy batch on the mesh, batch axis sharded (single-process)."""
    return {k: jax.device_put(v, batch_sharding(mesh, rules, np.ndim(v), np.shape(v)))
            for k, v in batch.items()}
