"""Building the model, its parameters (a plain nested dict) and their logical axes/shardings."""
from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from ualm_jax.config import ModelConfig
from ualm_jax.format.batch import model_batch_spec, zeros
from ualm_jax.model.paths import path_name
from ualm_jax.model.ualm import UALM
from ualm_jax.sharding import tree_shardings


def example_batch(cfg: ModelConfig, batch: int = 1, seq: int = 8) -> dict:
    """Smallest batch of the contract (format/batch.py) that touches every parameter: one clip
    of the shortest window the encoder takes (used for init/shapes)."""
    spec = model_batch_spec(cfg, batch, seq, clips=1, mel_frames=2 * cfg.audio_encoder.pool,
                            task_ids=False)
    out = zeros(spec)
    out["segment_ids"][:] = 1
    out["positions"][:] = np.arange(seq, dtype=np.int32)
    if "audio_slots" in out:
        out["audio_slots"][:] = -1
        out["audio_mel_mask"][:] = True
    return out


def build_model(cfg: ModelConfig) -> UALM:
    return UALM(cfg)


def _init_fn(model: UALM):
    def init(rng):
        return model.init(rng, example_batch(model.cfg))["params"]
    return init


def abstract_params(model: UALM):
    """(shapes tree of ShapeDtypeStructs, logical PartitionSpec tree) without allocating."""
    boxed = jax.eval_shape(_init_fn(model), jax.random.key(0))
    logical = nn.get_partition_spec(boxed)
    shapes = nn.meta.unbox(boxed)
    return shapes, logical


def param_shardings(model: UALM, mesh, rules):
    shapes, logical = abstract_params(model)
    return tree_shardings(logical, shapes, mesh, rules), shapes, logical


def init_params(model: UALM, rng, shardings=None):
    """Initialised parameters, created directly in their shardings (no host-size copy)."""
    fn = lambda r: nn.meta.unbox(_init_fn(model)(r))
    if shardings is None:
        return jax.jit(fn)(rng)
    return jax.jit(fn, out_shardings=shardings)(rng)


def param_table(shapes, logical, shardings=None) -> list[dict]:
    """One row per parameter: name, shape, dtype, logical axes, mesh spec, count."""
    rows = []
    flat_s = jax.tree_util.tree_flatten_with_path(shapes)[0]
    flat_l = jax.tree.leaves(logical, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    flat_m = (jax.tree.leaves(shardings) if shardings is not None else [None] * len(flat_s))
    for (path, x), lg, sh in zip(flat_s, flat_l, flat_m):
        rows.append({
            "name": path_name(path),
            "shape": list(x.shape),
            "dtype": str(x.dtype),
            "logical": [a for a in lg],
            "mesh": None if sh is None else [a for a in sh.spec],
            "count": int(np.prod(x.shape)),
        })
    return rows
