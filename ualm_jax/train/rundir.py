"""The run directory: checked before training, and what is written into it at start."""
from __future__ import annotations

import json

import numpy as np
import yaml

from ualm_jax import storage
from ualm_jax.config import ConfigError, shape_keys
from ualm_jax.model.flops import FORMULA, decoder_flops_per_token, encoder_window_flops


def prepare(run_dir, timeout: float = 60.0):
    """Creates the directory (local or gs://) and proves it writable with a probe write, before
    anything is compiled; the error names the path and, for URLs, endpoint and credentials."""
    try:
        return storage.probe_writable(run_dir, timeout)
    except storage.StorageError as e:
        raise ConfigError(str(e)) from e


def check_free_disk(path, checkpoint_bytes: int, factor: float) -> None:
    """Local disks only: object storage has no free-space figure to check."""
    free = storage.free_bytes(path)
    need = int(checkpoint_bytes * factor)
    if free is not None and free < need:
        raise ConfigError(
            f"run dir {path} has {free / 2**30:.2f} GiB free, but one checkpoint takes "
            f"{checkpoint_bytes / 2**30:.2f} GiB and train.min_free_disk_factor={factor} asks for "
            f"{need / 2**30:.2f} GiB; free space or lower the factor")


def check_same_model(path, cfg) -> None:
    """Resuming with another model shape fails here, naming the keys, not deep inside Orbax."""
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
        raise ConfigError(f"run dir {path} holds checkpoints of another model: "
                          + ", ".join(f"model.{k} was {_get(old, k)!r}, now {_get(new, k)!r}" for k in diff))


def _get(d, dotted):
    for k in dotted.split("."):
        d = (d or {}).get(k)
    return d


def write_start_files(path, cfg, param_rows: list[dict], trainable: int) -> None:
    (path / "config.yaml").write_text(cfg.to_yaml())
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
