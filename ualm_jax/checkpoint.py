"""Orbax checkpoints: train state + data-iterator state in one step directory.

- Async saves; keep the newest `keep_last` plus every step divisible by `keep_every`.
- Orbax writes into a temporary directory and renames it when complete, and lists only
  finalised steps, so a half-written checkpoint is never taken for complete.
- Restore takes abstract arrays carrying the *current* mesh's shardings, so a checkpoint saved on
  one mesh restores onto another.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

STATE, DATA = "state", "data"


class Checkpointer:
    def __init__(self, directory: str | Path, keep_last: int = 3, keep_every: int = 0,
                 async_save: bool = True, read_only: bool = False):
        self.directory = Path(directory).absolute()
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


def checkpoint_dir(path: str | Path) -> Path:
    """A run directory holds checkpoints under `checkpoints/`; accept either."""
    path = Path(path)
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def resolve(path: str | Path) -> tuple[Path, Path, int]:
    """A run directory (its latest checkpoint), its `checkpoints/` folder, or one step folder ->
    (config.yaml of the run, checkpoints folder, step). Errors say what was expected. Paths come
    back absolute: Orbax misreads a relative checkpoint path's metadata."""
    path = Path(path).absolute()
    if (path / STATE).is_dir() and path.name.isdigit():
        return path.parent.parent / "config.yaml", path.parent, int(path.name)
    ckpts = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    config = ckpts.parent / "config.yaml"
    steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit() and (p / STATE).is_dir()) \
        if ckpts.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"{path} holds no complete checkpoint (expected a run directory, its "
                                f"checkpoints/ folder, or a step folder with a '{STATE}' item)")
    return config, ckpts, steps[-1]


def load_params(path: str | Path, params_shapes=None, shardings=None):
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


def save_params(directory: str | Path, params, step: int = 0) -> None:
    """A params-only checkpoint (what import produces; `train.init_from` reads it)."""
    ck = Checkpointer(directory, keep_last=1, async_save=False)
    ck.save(step, {"params": params}, force=True)
    ck.close()
