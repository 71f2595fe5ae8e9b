"""Orbax checkpoints: train state + data-iterator state in one step directory.

- Async saves; keep the newest `keep_last` plus every step divisible by `keep_every`.
- Orbax writes into a temporary directory and renames it when complete (on object storage, which
  has no atomic rename, it writes `commit_success.txt` last instead), and lists only finalised
  steps, so a half-written checkpoint is never taken for complete. `resolve` applies the same
  rule, so every reader picks steps as the trainer does.
- Directories may be local or `gs://` URLs (see `ualm_jax.storage`).
- Restore takes abstract arrays carrying the *current* mesh's shardings, so a checkpoint saved on
  one mesh restores onto another.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from ualm_jax import storage

STATE, DATA = "state", "data"


class Checkpointer:
    def __init__(self, directory, keep_last: int = 3, keep_every: int = 0,
                 async_save: bool = True, read_only: bool = False):
        self.directory = storage.absolute(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep_last, keep_period=keep_every or None, create=not read_only,
            enable_async_checkpointing=async_save, read_only=read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=(STATE, DATA))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_state: Optional[dict] = None, force: bool = False) -> bool:
        args = {STATE: ocp.args.StandardSave(state)}
        if data_state is not None:
            args[DATA] = ocp.args.JsonSave(data_state)
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, abstract_state, step: Optional[int] = None) -> tuple[Any, Optional[dict], int]:
        """abstract_state: tree of jax.ShapeDtypeStruct with the target shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        args = {STATE: ocp.args.StandardRestore(abstract_state)}
        has_data = (self.directory / str(step) / DATA).exists()
        if has_data:
            args[DATA] = ocp.args.JsonRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(**args))
        return out[STATE], (out[DATA] if has_data else None), step

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)


def with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs carrying target shardings (what Orbax restores into)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract_tree, shardings)


def is_complete_step(step_dir) -> bool:
    """A finalised step folder holding the train state (the rule Orbax lists steps by)."""
    return (step_dir.name.isdigit() and (step_dir / STATE).is_dir()
            and ocp.path.step.is_path_finalized(step_dir))


def resolve(path):
    """A run directory (its latest checkpoint), its `checkpoints/` folder, or one step folder ->
    (config.yaml of the run, checkpoints folder, step). Errors say what was expected. Paths come
    back absolute: Orbax misreads a relative checkpoint path's metadata."""
    path = storage.absolute(path)
    if (path / STATE).is_dir() and path.name.isdigit():
        if not ocp.path.step.is_path_finalized(path):
            raise FileNotFoundError(f"{path} is an incomplete checkpoint (its save never finished)")
        return path.parent.parent / "config.yaml", path.parent, int(path.name)
    ckpts = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    config = ckpts.parent / "config.yaml"
    steps = sorted(int(p.name) for p in ckpts.iterdir() if is_complete_step(p)) \
        if ckpts.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"{path} holds no complete checkpoint (expected a run directory, its "
                                f"checkpoints/ folder, or a step folder with a '{STATE}' item)")
    return config, ckpts, steps[-1]


def load_params(path, params_shapes=None, shardings=None):
    """Only the parameters of a checkpoint (train state or params-only), as numpy arrays on the
    host (default) or placed with `shardings`. Optimiser state is never read."""
    _, ckpts, step = resolve(path)
    item_dir = ckpts / str(step) / STATE
    ckptr = ocp.PyTreeCheckpointer()
    meta = ckptr.metadata(item_dir)
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
    if "params" not in tree:
        raise ValueError(f"checkpoint {item_dir} has no 'params' item")
    target = params_shapes if params_shapes is not None else jax.tree.map(
        lambda m: np.zeros((), m.dtype), tree["params"])
    if shardings is None:
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    else:
        restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s), shardings)
    out = ckptr.restore(item_dir, args=ocp.args.PyTreeRestore(
        item={"params": target}, restore_args={"params": restore_args}, partial_restore=True))
    return out["params"]


class _OneByOneNumpyHandler(ocp.type_handlers.NumpyHandler):
    """Writes host arrays one after another, without the handler's defensive copy of the whole
    tree (the save is synchronous, nobody mutates the arrays meanwhile), returning freed encode
    buffers to the OS after each: the save then needs about one array on top of the tree, where
    the stock handler copies the tree and encodes every array at once (about 3x the tree)."""

    async def _background_serialize(self, values, infos, args=None):
        args = args or [None] * len(values)
        for value, info, arg in zip(values, infos, args):
            await super()._background_serialize([value], [info], [arg])
            _trim_heap()


def _trim_heap() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def save_params(directory, params, step: int = 0) -> None:
    """A params-only checkpoint (what import produces; `train.init_from` reads it). A tree of
    numpy arrays is written leaf by leaf (peak memory near the tree plus its largest leaf)."""
    leaves = jax.tree.leaves(params)
    if not leaves or not all(isinstance(x, np.ndarray) for x in leaves) or \
            not hasattr(ocp.type_handlers.NumpyHandler, "_background_serialize"):
        ck = Checkpointer(directory, keep_last=1, async_save=False)
        ck.save(step, {"params": params}, force=True)
        ck.close()
        return
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, _OneByOneNumpyHandler(deepcopy_host_arrays=False)))
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                           enable_async_checkpointing=False)
    manager = ocp.CheckpointManager(
        storage.absolute(directory), options=options, item_names=(STATE,),
        item_handlers={STATE: ocp.PyTreeCheckpointHandler(type_handler_registry=registry)})
    manager.save(step, args=ocp.args.Composite(
        **{STATE: ocp.args.PyTreeSave({"params": params})}), force=True)
    manager.wait_until_finished()
    manager.close()
    _trim_heap()
