"""Train state = {'step', 'params', 'opt_state'}: a plain tree that Orbax saves as is.
Created directly in its shardings; optimiser moments shard like their parameters."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from ualm_jax.model.params import _init_fn, param_shardings
from ualm_jax.model.paths import path_tuple as _path_key


def match_param_shardings(tree_shapes, params_shapes, params_shardings, mesh):
    """Sharding for each leaf of an optimiser-state tree: that of the parameter whose path is a
    suffix of the leaf's path (mu/nu), else replicated (counts, scalars)."""
    by_path = {}
    for (path, x), s in zip(jax.tree_util.tree_flatten_with_path(params_shapes)[0],
                            jax.tree.leaves(params_shardings)):
        by_path[_path_key(path)] = (x.shape, s)
    replicated = NamedSharding(mesh, P())

    def one(path, x):
        key = _path_key(path)
        for i in range(len(key)):
            hit = by_path.get(key[i:])
            if hit is not None and hit[0] == x.shape:
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(one, tree_shapes)


def state_shardings(model, tx, mesh, rules):
    p_shard, p_shapes, logical = param_shardings(model, mesh, rules)
    opt_shapes = jax.eval_shape(tx.init, p_shapes)
    return {
        "step": NamedSharding(mesh, P()),
        "params": p_shard,
        "opt_state": match_param_shardings(opt_shapes, p_shapes, p_shard, mesh),
    }, {"params": p_shapes, "logical": logical}


def abstract_state(model, tx):
    def make(rng):
        params = nn.meta.unbox(_init_fn(model)(rng))
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    return jax.eval_shape(make, jax.random.key(0))


def create_state(model, tx, shardings, rng):
    def make(rng):
        params = nn.meta.unbox(_init_fn(model)(rng))
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    return jax.jit(make, out_shardings=shardings)(rng)


def state_from_params(tx, params, shardings):
    """A fresh train state (step 0, new optimiser state) around given parameters."""
    def make(p):
        return {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": tx.init(p)}
    return jax.jit(make, in_shardings=(shardings["params"],), out_shardings=shardings)(params)
