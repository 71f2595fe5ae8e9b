"""The run directory: checked before training, and what is written into it at start."""
from __future__ import annotations

import json

import numpy as np
import yaml

from ualm_jax import storage
from ualm_jax.config import ConfigError
from ualm_jax.model.flops import FORMULA, flops_per_token


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
    shape_keys = ("text_vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                  "d_ff", "num_codebooks", "codebook_size", "num_special", "vocab_pad_multiple",
                  "tie_embeddings", "adapter", "scan_layers", "param_dtype")
    diff = [k for k in shape_keys if k in old and old[k] != new[k]]
    if old.get("audio_encoder") != new["audio_encoder"]:
        old_enc, new_enc = old.get("audio_encoder") or {}, new["audio_encoder"]
        diff += [f"audio_encoder.{k}" for k in new_enc if k != "frozen" and old_enc.get(k) != new_enc[k]]
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
    flops = {"formula": FORMULA, "seq_len": cfg.train.seq_len,
             "flops_per_token": flops_per_token(cfg.model, cfg.train.seq_len),
             "params_total": total, "params_trainable": trainable}
    (path / "flops.json").write_text(json.dumps(flops, indent=2) + "\n")


def state_bytes(abstract_state) -> int:
    import jax

    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(abstract_state)))
