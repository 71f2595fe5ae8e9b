"""Multi-host start-up: join the JAX distributed system before any device is touched.

Every host runs the same `ualm train`; `maybe_initialize()` (first line of the command) decides
from the environment whether this process is one of many:

- `JAX_COORDINATOR_ADDRESS` + `JAX_NUM_PROCESSES` + `JAX_PROCESS_ID` (what launch/local.py,
  launch/slurm.py and launch/xpk_jobset.yaml.tmpl set): used as given, no cluster guessing.
  `JAX_LOCAL_DEVICE_IDS` (read by jax itself) limits a process to some GPUs of its node.
- `UALM_DISTRIBUTED=1` (what launch/tpu_vm.py and `xpk workload create` set): jax finds the rest
  itself, e.g. on a Cloud TPU VM from the metadata server (worker number, worker list, and for
  multislice the MEGASCALE_* values of the queued resource), on SLURM from SLURM_* variables.
- Neither, or `JAX_NUM_PROCESSES=1`: a plain single host; nothing happens.
- `UALM_DISTRIBUTED=0` turns it off whatever else is set.

Idempotent: a second call (or a caller that initialised jax itself) changes nothing.
"""
from __future__ import annotations

import os
import sys

_EXPLICIT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _int_env(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} must be an integer") from None


def maybe_initialize() -> bool:
    """Joins the distributed system when the environment asks for it. Returns True when this
    process is part of a multi-process run (now or already), False on a single host."""
    import jax

    if jax.distributed.is_initialized():
        return True
    flag = os.environ.get("UALM_DISTRIBUTED", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    auto = flag in ("1", "true", "yes", "on")
    given = [k for k in _EXPLICIT if os.environ.get(k)]

    if given and not auto:
        missing = [k for k in _EXPLICIT if k not in given]
        if missing:
            raise ValueError(f"multi-host start needs {', '.join(_EXPLICIT)}; {', '.join(given)} "
                             f"set but {', '.join(missing)} missing (or set UALM_DISTRIBUTED=1 to "
                             "let jax detect the rest)")
        if _int_env("JAX_NUM_PROCESSES") == 1:
            return False
    elif not auto:
        return False

    _cpu_collectives()
    kwargs = {}
    if len(given) == len(_EXPLICIT):
        # Everything is given: skip cluster detection, which on SLURM would otherwise pin each
        # process to one GPU (SLURM_LOCALID) even when one process drives the whole node.
        kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                      num_processes=_int_env("JAX_NUM_PROCESSES"),
                      process_id=_int_env("JAX_PROCESS_ID"),
                      cluster_detection_method="deactivate")
    elif "JAX_NUM_PROCESSES" in given or "JAX_PROCESS_ID" in given:
        kwargs = {k: _int_env(e) for k, e in (("num_processes", "JAX_NUM_PROCESSES"),
                                               ("process_id", "JAX_PROCESS_ID")) if e in given}
    jax.distributed.initialize(**kwargs)  # reads JAX_COORDINATOR_ADDRESS itself when present
    print(f"distributed: process {jax.process_index()} of {jax.process_count()}, "
          f"{jax.local_device_count()} local / {jax.device_count()} global devices",
          file=sys.stderr, flush=True)
    return True


def _cpu_collectives() -> None:
    """CPU processes need a cross-process collectives backend; gloo is jax's default in 0.10
    but was `none` in older releases, where jitted steps across processes fail."""
    import jax

    try:
        if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:  # option renamed or removed: nothing to do
        pass


def allgather_json(obj) -> list:
    """Every process's JSON-able `obj` (numpy arrays and scalars included: they come back as
    lists and numbers), in process order (a collective: call on all processes)."""
    import jax

    n = jax.process_count()
    if n == 1:
        return [obj]
    import json

    import numpy as np
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(obj, default=lambda x: x.tolist()).encode(), np.uint8)
    longest = int(np.max(multihost_utils.process_allgather(np.array([raw.size]))))
    padded = np.zeros(longest, np.uint8)
    padded[:raw.size] = raw
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(n, longest)
    return [json.loads(bytes(r).rstrip(b"\0")) for r in rows]


def owns(i: int) -> bool:
    """Whether item i of a list every process walks in the same order is this process's to write
    (items are dealt round-robin: i mod processes)."""
    import jax

    return i % jax.process_count() == jax.process_index()


def is_main() -> bool:
    """Process 0 (the one that writes merged reports)."""
    import jax

    return jax.process_index() == 0
