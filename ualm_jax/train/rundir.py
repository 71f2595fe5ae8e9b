"""The run directory: checked before training, and what is written into it at start."""
from __future__ import annotations

import json

import numpy as np
import yaml

import ualm_jax.storage as storage
from ualm_jax.config import ConfigError, shape_keys
from ualm_jax.model.flops import FORMULA, decoder_flops_per_token, encoder_window_flops


def prepare(run_dir, timeout: float = 60.0):
    """Creates the directory (local or gs://) and proves it writable with a probe write, before
    anything is compiled; the error names the path and, for URLs, endpoint and credentials."""
    try:
        return storage.probe_writable(run_dir, timeout)
    except storage.StorageError as e:
        raise ConfigError(str(e)) from e


def is_new(run_dir) -> str | None:
    """"absent" for a run dir that does not exist yet, "empty" for an empty one, None otherwise
    (what `remove_failed_start` may undo). Object storage has no folders: a prefix with no
    objects is "absent"."""
    p = storage.as_path(run_dir)
    try:
        if not p.exists():
            return "absent"
        return "empty" if p.is_dir() and not any(p.iterdir()) else None
    except OSError:  # unreachable: prepare() reports it
        return None


def remove_failed_start(path, fresh: str) -> None:
    """Undoes a start that failed before its first step in a run dir that was new (`is_new`):
    what it wrote goes, and the folder too when this start created it, so no half-made run dir
    looks like a run."""
    import shutil

    p = storage.as_path(path)
    try:
        if storage.is_url(p) or fresh == "absent":
            if p.exists():
                shutil.rmtree(p) if not storage.is_url(p) else p.rmtree()
            return
        for child in p.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    except OSError as e:  # the original error matters more; say what is left
        print(f"note: could not remove the failed start's files in {p}: {e}", flush=True)


def check_free_disk(path, checkpoint_bytes: int, factor: float) -> None:
    """Local disks only: object storage has no free-space figure to check."""
    free = storage.free_bytes(path)
    need = int(checkpoint_bytes * factor)
    if free is not None and free < need:
        raise ConfigError(
            f"run dir {path} has {free / 2**30:.2f} GiB free, but one checkpoint takes "
            f"{checkpoint_bytes / 2**30:.2f} GiB and train.min_free_disk_factor={factor} asks for "
            f"{need / 2**30:.2f} GiB; free space or lower the factor")


def check_same_model(path, cfg, what: str | None = None) -> None:
    """Resuming (or starting from train.init_from) with another model shape fails here, naming
    the keys, not deep inside Orbax. `what` names the source in the message."""
    path = storage.as_path(path)
    old_file = path / "config.yaml"
    if not old_file.exists() or not any((path / "checkpoints").glob("*")):
        return
    old = (yaml.safe_load(old_file.read_text()) or {}).get("model", {})
    new = cfg.to_dict()["model"]
    # The schema's shape fields (config.shape_keys). A top-level key the old config lacks is
    # taken as unchanged (written before the key existed); a nested one (audio_encoder.*) as changed.
    keys = shape_keys()
    diff = [k for k in keys if "." not in k and k in old and old[k] != new[k]]
    diff += [k for k in keys if "." in k and _get(old, k) != _get(new, k)]
    if diff:
        raise ConfigError(f"{what or f'run dir {path}'} holds checkpoints of another model: "
                          + ", ".join(f"model.{k} was {_get(old, k)!r}, now {_get(new, k)!r}" for k in diff))


def _get(d, dotted):
    for k in dotted.split("."):
        d = (d or {}).get(k)
    return d


FIRST_STEP_FILE = "first_step.json"  # the metrics of the run's step 1 (summaries after resumes)


def write_first_step(path, record: dict) -> None:
    (storage.as_path(path) / FIRST_STEP_FILE).write_text(json.dumps(record) + "\n")


def read_first_step(path) -> dict | None:
    f = storage.as_path(path) / FIRST_STEP_FILE
    return json.loads(f.read_text()) if f.exists() else None


def last_logged_eval(path) -> dict | None:
    """The last held-out eval record of metrics.jsonl (what a finished run reports again)."""
    f = storage.as_path(path) / "metrics.jsonl"
    if not f.exists():
        return None
    last = None
    for line in f.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill: the others still count
            continue
        if isinstance(rec, dict) and "eval/loss" in rec:
            last = rec
    return last


HISTORY_DIR = "config_history"  # one file per config change: step_<N>.yaml (the config from step N)
PROVENANCE_FILE = "provenance.jsonl"  # one line per start of the run


def config_changes(old: dict, new: dict, prefix: str = "") -> dict:
    """{dotted key: (old, new)} of the values that differ."""
    out = {}
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(config_changes(a, b, f"{prefix}{k}."))
        elif a != b:
            out[prefix + k] = (a, b)
    return out


def record_config(path, cfg, step: int) -> dict:
    """Writes config.yaml. On a resume whose config differs from the saved one, the changed keys
    are printed and the new config is also kept as config_history/step_<step>.yaml (the first
    config goes there as step_0.yaml), so every value a run used is on record with the step it
    took effect. Returns the changes."""
    new_text = cfg.to_yaml(relative_to=path)  # portable: paths relative to the run dir
    old_file = path / "config.yaml"
    changes = {}
    if old_file.exists() and step > 0:
        old = yaml.safe_load(old_file.read_text()) or {}
        changes = config_changes(old, yaml.safe_load(new_text))
        if changes:
            history = path / HISTORY_DIR
            history.mkdir(parents=True, exist_ok=True)
            if not any(history.glob("step_*.yaml")):
                (history / "step_0.yaml").write_text(old_file.read_text())
            (history / f"step_{step}.yaml").write_text(new_text)
            print(f"resuming at step {step} with a changed config (kept in {HISTORY_DIR}/step_"
                  f"{step}.yaml): " + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()),
                  flush=True)
    old_file.write_text(new_text)
    return changes


def provenance(step: int) -> dict:
    """What ran: command line, git commit, package versions, host, devices."""
    import os
    import platform
    import socket
    import subprocess
    import sys
    import time
    from importlib import metadata

    import jax

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                                  cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    kinds: dict = {}
    for d in jax.devices():
        kinds[d.device_kind] = kinds.get(d.device_kind, 0) + 1
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "step": step,
            "command": sys.argv, "git_commit": commit,
            "git_dirty": None if commit is None else bool(git("status", "--porcelain")),
            "versions": {n: version(n) for n in ("ualm-jax", "jax", "jaxlib", "flax", "optax",
                                                 "orbax-checkpoint", "grain", "numpy")},
            "python": platform.python_version(), "host": socket.gethostname(),
            "process_count": jax.process_count(), "backend": jax.default_backend(),
            "devices": kinds}


def append_provenance(path, step: int) -> None:
    f = path / PROVENANCE_FILE
    old = f.read_text() if f.exists() else ""
    f.write_text(old + json.dumps(provenance(step)) + "\n")


def write_start_files(path, cfg, param_rows: list[dict], trainable: int, step: int = 0) -> None:
    record_config(path, cfg, step)
    append_provenance(path, step)
    total = sum(r["count"] for r in param_rows)
    lines = ["name\tshape\tdtype\tlogical_axes\tmesh_sharding\tcount"]
    for r in param_rows:
        lines.append("\t".join([r["name"], "x".join(map(str, r["shape"])), r["dtype"],
                                ",".join(str(a) for a in r["logical"]),
                                ",".join(str(a) for a in (r["mesh"] or [])), str(r["count"])]))
    lines.append(f"# total\t\t\t\t\t{total}")
    lines.append(f"# trainable\t\t\t\t\t{trainable}")
    (path / "params.tsv").write_text("\n".join(lines) + "\n")
    enc, adapter = encoder_window_flops(cfg.model) if cfg.model.audio_encoder.enabled else (0, 0)
    flops = {"formula": FORMULA, "seq_len": cfg.train.seq_len,
             "decoder_flops_per_token": decoder_flops_per_token(cfg.model),
             "encoder_forward_flops_per_window": enc, "adapter_forward_flops_per_window": adapter,
             "params_total": total, "params_trainable": trainable}
    (path / "flops.json").write_text(json.dumps(flops, indent=2) + "\n")


def state_bytes(abstract_state) -> int:
    import jax

    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(abstract_state)))
