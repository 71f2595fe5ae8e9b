"""Orbax checkpoints: train state + data-iterator state in one step directory.

- Async saves; keep the newest `keep_last` plus every step divisible by `keep_every`.
- Orbax writes into a temporary directory and renames it when complete (on object storage, which
  has no atomic rename, it writes `commit_success.txt` last instead), and lists only finalised
  steps, so a half-written checkpoint is never taken for complete. `resolve` lists steps by the
  same rule (a finalised folder named by its step), so every reader picks the step the trainer
  picks.
- Integrity: each step carries `checksums.sha256` (SHA256, size and name of every file of the
  step), written in the save's background thread after every process has written its files and
  before Orbax commits the step, so saving stays asynchronous and a committed step always has
  it. Every reader (train's restore, export, inspect, generate, `load_params`) checks the step
  first: a missing, truncated or altered file fails with one line naming the step and the file.
  `Checkpointer.restore` (what `ualm train` resumes with) falls back to the newest step that
  verifies, saying which steps it skipped and why and moving them aside (`N.corrupt`), and
  refuses when none does. A step without `checksums.sha256` (saved before checksums were kept)
  is read unverified, with a warning; Orbax errors reading it become the same one line.
- Directories may be local or `gs://` URLs (see `ualm_jax.storage`).
- Restore takes abstract arrays carrying the *current* mesh's shardings, so a checkpoint saved on
  one mesh restores onto another.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

import ualm_jax.storage as storage


class _QuietOrbax:
    """Drops two Orbax warnings every load and params-only save prints although nothing is
    wrong: a step saved by save_params has no _CHECKPOINT_METADATA (our checksums.sha256 is what
    vouches for a step), and numpy-only trees carry no jax.Array metadata."""
    NOISE = ("Metadata file does not exist", "No jax.Array in TypeHandlerRegistry")

    def filter(self, record) -> bool:
        return not any(n in str(record.getMessage()) for n in self.NOISE)


logging.getLogger("absl").addFilter(_QuietOrbax())

STATE, DATA = "state", "data"
CHECKSUMS = "checksums.sha256"
# Files Orbax writes or rewrites when it commits a step, after the checksums are taken: their
# presence is checked, not their bytes.
COMMIT_FILES = ("_CHECKPOINT_METADATA", "commit_success.txt")
_TMP_SUFFIX = ".orbax-checkpoint-tmp"
_STEP_NAME = re.compile(r"^(0|[1-9]\d*)$")  # Orbax's step-folder names (no prefix, no padding)
_HEADER = ("# sha256  bytes  file, for every file of this checkpoint step; '-' marks a file "
           "rewritten when the step is committed (checked to exist)\n")


class CorruptCheckpoint(ValueError):
    """A checkpoint step that is incomplete or altered; the message is one line naming the step
    and the file."""

    def __init__(self, step: int, where, detail: str):
        self.step, self.where, self.detail = step, str(where), detail
        super().__init__(f"checkpoint step {step} of {where} is corrupt: {detail}")


class NoVerifiedStep(CorruptCheckpoint):
    """Every step of a checkpoints folder is corrupt: nothing to resume from."""

    def __init__(self, where, errors: list[CorruptCheckpoint]):
        self.step, self.where, self.errors = errors[0].step, str(where), errors
        self.detail = "; ".join(f"step {e.step}: {e.detail}" for e in errors)
        ValueError.__init__(self, f"no checkpoint step of {where} verifies ({self.detail}): "
                                  "nothing to resume from; move the checkpoints folder aside to "
                                  "start afresh")


def _digest(path, chunk: int = 1 << 22) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with storage.as_path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
            n += len(block)
    return h.hexdigest(), n


def _digest_all(root, names: list[str]) -> list[tuple[str, int]]:
    """(sha256, bytes) of root/name for each name, hashed on a few threads (hashlib and file
    reads release the GIL, so this runs beside training)."""
    if not names:
        return []
    workers = min(8, os.cpu_count() or 1, len(names))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda n: _digest(root / n), names))


def write_checksums(step_dir) -> None:
    """checksums.sha256 of every file now in `step_dir` (a step being committed)."""
    step_dir = storage.as_path(step_dir)
    names = [n for n in storage.files_under(step_dir) if n != CHECKSUMS and n not in COMMIT_FILES]
    lines = [f"{d}  {size}  {n}\n" for n, (d, size) in zip(names, _digest_all(step_dir, names))]
    lines += [f"-  -  {n}\n" for n in COMMIT_FILES]
    (step_dir / CHECKSUMS).write_text(_HEADER + "".join(lines))


def _read_checksums(step_dir, step: int, where) -> Optional[list[tuple[str, str, str]]]:
    """[(sha256 or '-', bytes or '-', name)], or None when the step has no checksums file."""
    path = step_dir / CHECKSUMS
    if not path.exists():
        return None
    entries = []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise CorruptCheckpoint(step, where, f"{CHECKSUMS} (unreadable: {e})") from e
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("  ", 2)
        if len(parts) != 3 or not (parts[0] == "-" or re.fullmatch(r"[0-9a-f]{64}", parts[0])):
            raise CorruptCheckpoint(step, where, f"{CHECKSUMS} (malformed line {i})")
        entries.append(tuple(parts))
    return entries


def _warn_unverified(step: int, where) -> None:
    print(f"warning: checkpoint step {step} of {where} has no {CHECKSUMS} (saved before checksums "
          "were kept, or the file was removed): read unverified", file=sys.stderr, flush=True)


def verify_step(step_dir, warn: bool = True) -> bool:
    """True when every file of the step is present with its recorded size and sha256; False when
    the step has no checksums (read unverified; warns). Raises CorruptCheckpoint otherwise."""
    step_dir = storage.absolute(step_dir)
    step, where = int(step_dir.name), step_dir.parent
    entries = _read_checksums(step_dir, step, where)
    if entries is None:
        if not (step_dir / STATE).is_dir():
            raise CorruptCheckpoint(step, where, f"{STATE}/ (missing)")
        if warn:
            _warn_unverified(step, where)
        return False
    present = set(storage.files_under(step_dir))
    folders = {n.split("/", 1)[0] for n in present if "/" in n}
    for _, _, name in entries:
        if name not in present:
            top = name.split("/", 1)[0]
            what = f"{top}/" if "/" in name and top not in folders else name
            raise CorruptCheckpoint(step, where, f"{what} (missing)")
    hashed = [(d, size, n) for d, size, n in entries if d != "-"]
    if not storage.is_url(step_dir):  # sizes first: a truncated file fails without hashing
        for _, size, name in hashed:
            got = os.path.getsize(step_dir / name)
            if str(got) != size:
                raise CorruptCheckpoint(step, where, f"{name} (truncated or extended: {got} "
                                                     f"bytes, {size} written)")
    for (digest, size, name), (got, n) in zip(hashed, _digest_all(step_dir, [e[2] for e in hashed])):
        if str(n) != size:
            raise CorruptCheckpoint(step, where, f"{name} (truncated or extended: {n} bytes, "
                                                 f"{size} written)")
        if got != digest:
            raise CorruptCheckpoint(step, where, f"{name} (sha256 mismatch)")
    return True


class Checkpointer:
    def __init__(self, directory, keep_last: int = 3, keep_every: int = 0,
                 async_save: bool = True, read_only: bool = False):
        self.directory = storage.absolute(directory)
        self.async_save = async_save
        self.read_only = read_only
        self._saving: Optional[int] = None
        # Always Orbax's asynchronous checkpointer (its commit hook writes the checksums);
        # async_save=False waits for each save to finish.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep_last, keep_period=keep_every or None, create=not read_only,
            enable_async_checkpointing=True, read_only=read_only,
            async_options=None if read_only else ocp.AsyncOptions(
                post_finalization_callback=self._write_checksums))
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=(STATE, DATA))

    def _write_checksums(self) -> None:
        """Orbax's commit hook (background thread, primary process, all processes' files
        written, step not yet committed): checksums into the step's temporary folder."""
        write_checksums(_uncommitted_dir(self.directory, self._saving))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_state: Optional[dict] = None, force: bool = False) -> bool:
        args = {STATE: ocp.args.StandardSave(state)}
        if data_state is not None:
            args[DATA] = ocp.args.JsonSave(data_state)
        self.manager.wait_until_finished()  # one save in flight: the hook knows its step
        self._saving = step
        saved = self.manager.save(step, args=ocp.args.Composite(**args), force=force)
        if not self.async_save:
            self.manager.wait_until_finished()
        return saved

    def restore(self, abstract_state, step: Optional[int] = None) -> tuple[Any, Optional[dict], int]:
        """abstract_state: tree of jax.ShapeDtypeStruct with the target shardings. Without
        `step`: the newest step that verifies; newer corrupt steps are reported, moved aside
        (unless read-only) and skipped; none verifying raises CorruptCheckpoint."""
        if step is not None:
            return self._restore_step(abstract_state, step)
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        bad = []
        for s in steps:
            try:
                out = self._restore_step(abstract_state, s)
            except CorruptCheckpoint as e:
                bad.append(e)
                print(f"{e}: skipped", flush=True)
                continue
            if bad:
                moved = self._set_aside([e.step for e in bad])
                print(f"falling back to step {s}, the newest checkpoint step that verifies"
                      + (f"; moved aside: {', '.join(moved)}" if moved else ""), flush=True)
            return out
        raise NoVerifiedStep(self.directory, bad)

    def _restore_step(self, abstract_state, step: int):
        step_dir = self.directory / str(step)
        verified = verify_step(step_dir)
        args = {STATE: ocp.args.StandardRestore(abstract_state)}
        has_data = (step_dir / DATA).exists()
        if has_data:
            args[DATA] = ocp.args.JsonRestore()
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:  # noqa: BLE001 - an unverified step's read errors are corruption
            if verified:
                raise
            raise CorruptCheckpoint(step, self.directory, _unreadable(e)) from e
        return out[STATE], (out[DATA] if has_data else None), step

    def _set_aside(self, steps: list[int]) -> list[str]:
        """Corrupt steps renamed STEP.corrupt (kept for a look, no longer listed as steps), so
        the run saves those steps again."""
        moved = []
        if not self.read_only and jax.process_index() == 0:
            for s in steps:
                src, dst = self.directory / str(s), self.directory / f"{s}.corrupt"
                i = 1
                while dst.exists():
                    dst, i = self.directory / f"{s}.corrupt.{i}", i + 1
                src.rename(dst)
                moved.append(f"{s} -> {dst.name}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("ualm_checkpoint_set_aside")
        self.manager.reload()
        return moved

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)


def _uncommitted_dir(directory, step: int):
    """Where a save of `step` is before Orbax commits it: its temporary folder (local disk), or
    the step folder itself (object storage: committed by writing commit_success.txt)."""
    tmp = directory / f"{step}{_TMP_SUFFIX}"
    if tmp.exists():
        return tmp
    for p in directory.iterdir():
        if p.name.startswith(f"{step}{_TMP_SUFFIX}"):
            return p
    final = directory / str(step)
    if not final.exists():
        raise FileNotFoundError(f"the save of step {step} left no folder in {directory}")
    return final


def _unreadable(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{STATE} (unreadable: {type(e).__name__}: {(text[0] if text else '')[:200]})"


def with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs carrying target shardings (what Orbax restores into)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract_tree, shardings)


def is_step_dir(step_dir) -> bool:
    """A finalised step folder: the rule Orbax lists steps by (its contents are checked by
    `verify_step`)."""
    return bool(_STEP_NAME.match(step_dir.name)) and step_dir.is_dir() and \
        ocp.path.step.is_path_finalized(step_dir)


def step_numbers(ckpts) -> list[int]:
    """The steps of a checkpoints folder, oldest first."""
    return sorted(int(p.name) for p in ckpts.iterdir() if is_step_dir(p)) if ckpts.is_dir() else []


def read_data_state(path) -> tuple[int, Optional[dict]]:
    """(step, data-iterator state or None) of a run's latest checkpoint (or of one step folder),
    without reading the train state."""
    _, ckpts, step = resolve(path)
    item = ckpts / str(step) / DATA
    if not item.exists():
        return step, None
    return step, ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(item)


def _looks_like_step(path) -> bool:
    return bool(_STEP_NAME.match(path.name)) and ((path / STATE).is_dir() or any(
        (path / n).exists() for n in (CHECKSUMS, COMMIT_FILES[0])))


def resolve(path, verify: bool = True):
    """A run directory (its latest checkpoint), its `checkpoints/` folder, or one step folder ->
    (config.yaml of the run, checkpoints folder, step). The step is checked (`verify_step`): a
    corrupt one raises CorruptCheckpoint. Errors say what was expected. Paths come back absolute:
    Orbax misreads a relative checkpoint path's metadata."""
    path = storage.absolute(path)
    older: list[int] = []
    if _looks_like_step(path):
        if not ocp.path.step.is_path_finalized(path):
            raise FileNotFoundError(f"{path} is an incomplete checkpoint (its save never finished)")
        ckpts, step = path.parent, int(path.name)
    else:
        ckpts = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        steps = step_numbers(ckpts)
        if not steps:
            raise FileNotFoundError(f"{path} holds no complete checkpoint (expected a run directory, "
                                    f"its checkpoints/ folder, or a step folder with a '{STATE}' "
                                    "item)")
        step, older = steps[-1], steps[:-1]
    if verify:
        try:
            verify_step(ckpts / str(step))
        except CorruptCheckpoint as e:
            if older:  # readers never fall back silently; they say what else there is
                e.args = (f"{e.args[0]}; older steps: "
                          f"{', '.join(map(str, reversed(older)))} (pass one's folder to read it)",)
            raise
    return ckpts.parent / "config.yaml", ckpts, step


def item_tree(ckpts, step: int):
    """The metadata tree of a step's train-state item (shapes, dtypes, shardings; no data)."""
    item_dir = ckpts / str(step) / STATE
    try:
        meta = ocp.PyTreeCheckpointer().metadata(item_dir)
        tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
        if tree is None:
            raise ValueError("no tree metadata")
    except Exception as e:  # noqa: BLE001 - whatever Orbax or tensorstore raises: one line
        raise CorruptCheckpoint(step, ckpts, _unreadable(e)) from e
    return tree


def load_params(path, params_shapes=None, shardings=None, verify: bool = True):
    """Only the parameters of a checkpoint (train state or params-only), as numpy arrays on the
    host (default) or placed with `shardings`. Optimiser state is never read. verify=False: the
    caller has checked the step already (`resolve`)."""
    _, ckpts, step = resolve(path, verify=verify)
    item_dir = ckpts / str(step) / STATE
    verified = (ckpts / str(step) / CHECKSUMS).exists()
    tree = item_tree(ckpts, step)
    if "params" not in tree:
        raise ValueError(f"checkpoint {item_dir} has no 'params' item")
    target = params_shapes if params_shapes is not None else jax.tree.map(
        lambda m: np.zeros((), m.dtype), tree["params"])
    if shardings is None:
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    else:
        restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s), shardings)
    try:
        out = ocp.PyTreeCheckpointer().restore(item_dir, args=ocp.args.PyTreeRestore(
            item={"params": target}, restore_args={"params": restore_args}, partial_restore=True))
    except Exception as e:  # noqa: BLE001 - an unverified step's read errors are corruption
        if verified:
            raise
        raise CorruptCheckpoint(step, ckpts, _unreadable(e)) from e
    return out["params"]


class _OneByOneNumpyHandler(ocp.type_handlers.NumpyHandler):
    """Writes host arrays one after another, without the handler's defensive copy of the whole
    tree (the caller waits for the save, nobody mutates the arrays meanwhile), returning freed
    encode buffers to the OS after each: the save then needs about one array on top of the tree,
    where the stock handler copies the tree and encodes every array at once (about 3x the tree)."""

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
    """A params-only checkpoint (what import produces; `train.init_from` reads it), with its
    checksums. A tree of numpy arrays is written leaf by leaf (peak memory near the tree plus its
    largest leaf)."""
    leaves = jax.tree.leaves(params)
    if not leaves or not all(isinstance(x, np.ndarray) for x in leaves) or \
            not hasattr(ocp.type_handlers.NumpyHandler, "_background_serialize"):
        ck = Checkpointer(directory, keep_last=1, async_save=False)
        ck.save(step, {"params": params}, force=True)
        ck.close()
        return
    directory = storage.absolute(directory)
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, _OneByOneNumpyHandler(deepcopy_host_arrays=False)))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=1, create=True, enable_async_checkpointing=True,
        async_options=ocp.AsyncOptions(
            post_finalization_callback=lambda: write_checksums(_uncommitted_dir(directory, step))))
    manager = ocp.CheckpointManager(
        directory, options=options, item_names=(STATE,),
        item_handlers={STATE: ocp.PyTreeCheckpointHandler(type_handler_registry=registry)})
    manager.save(step, args=ocp.args.Composite(
        **{STATE: ocp.args.PyTreeSave({"params": params})}), force=True)
    manager.wait_until_finished()
    manager.close()
    _trim_heap()
