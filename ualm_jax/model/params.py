"""Building the model, its parameters (a plain nested dict) and their logical axes/shardings."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ualm_jax.config import ModelConfig
from ualm_jax.model.ualm import UALM
from ualm_jax.model.vocab import JointVocab
from ualm_jax.sharding import tree_shardings


def example_batch(cfg: ModelConfig, batch: int = 1, seq: int = 8) -> dict:
    """Smallest batch of the contract that touches every parameter (used for init/shapes)."""
    k = max(cfg.num_codebooks, 1)
    out = {
        "tokens": np.zeros((batch, seq, k), np.int32),
        "loss_weights": np.zeros((batch, seq, k), np.float32),
        "segment_ids": np.ones((batch, seq), np.int32),
        "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
    }
    enc = cfg.audio_encoder
    if enc.enabled:
        out["audio_features"] = np.zeros((batch, 1, 2 * enc.pool, enc.n_mels), np.float32)
        out["audio_slots"] = np.full((batch, seq), -1, np.int32)
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
            "name": "/".join(str(getattr(p, "key", p)) for p in path),
            "shape": list(x.shape),
            "dtype": str(x.dtype),
            "logical": [a for a in lg],
            "mesh": None if sh is None else [a for a in sh.spec],
            "count": int(np.prod(x.shape)),
        })
    return rows


def vocab_of(cfg: ModelConfig) -> JointVocab:
    return JointVocab.from_model_config(cfg)
