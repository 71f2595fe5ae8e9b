"""Sharded forward and gradients equal the single-device ones (FSDP, TP, mixed, DP)."""
import jax
import numpy as np
import pytest

from ualm_jax.config import MeshConfig
from ualm_jax.model.loss import loss_sums
from ualm_jax.model.params import param_shardings
from ualm_jax.model.ualm import UALM
from ualm_jax.sharding import make_mesh, parse_mesh_arg, shard_batch
from ualm_jax.train.step import with_mesh_context


def _loss_and_grads(model):
    def loss(p, batch):
        h, head, emb = model.apply({"params": p}, batch, method=UALM.hidden_and_output)
        s = loss_sums(h, head, emb, batch, model.vocab, "reference", 16)
        return s.total / s.count
    return jax.value_and_grad(loss)


@pytest.fixture(scope="module")
def reference(tiny_model, tiny_params, tiny_batch):
    one = jax.devices()[0]
    p = jax.device_put(tiny_params, one)
    b = jax.device_put(tiny_batch, one)
    loss, grads = jax.jit(_loss_and_grads(tiny_model))(p, b)
    return float(loss), jax.tree.map(np.asarray, grads)


@pytest.mark.parametrize("mesh_arg", ["fsdp=8", "tensor=4,fsdp=2", "data=2,fsdp=2,tensor=2",
                                      "data=8"])
def test_sharded_matches_single_device(mesh_arg, tiny_model, tiny_params, tiny_batch, reference):
    cfg = MeshConfig(ici=parse_mesh_arg(mesh_arg))
    mesh = make_mesh(cfg)
    shardings, _, _ = param_shardings(tiny_model, mesh, cfg.rules)
    params = jax.device_put(tiny_params, shardings)
    batch = shard_batch(tiny_batch, mesh, cfg.rules)
    fn = jax.jit(with_mesh_context(_loss_and_grads(tiny_model), mesh, cfg.rules),
                 in_shardings=(shardings, {k: v.sharding for k, v in batch.items()}))
    loss, grads = fn(params, batch)
    assert abs(float(loss) - reference[0]) < 1e-5 * max(1.0, abs(reference[0]))
    jax.tree.map(lambda g, r: np.testing.assert_allclose(np.asarray(g), r, atol=2e-6, rtol=1e-4),
                 grads, reference[1])
    # Parameters really are sharded as the rules say (not silently replicated).
    if "tensor=4" in mesh_arg:
        q = shardings["decoder"]["layers"]["self_attn"]["q_proj"]["kernel"]
        assert q.spec[2] == "tensor"  # 4 heads over tensor=4
        kv = shardings["decoder"]["layers"]["self_attn"]["k_proj"]["kernel"]
        assert kv.spec[2] is None  # 2 KV heads do not divide tensor=4: replicated
    if mesh_arg == "fsdp=8":
        assert shardings["embed"].spec == jax.sharding.PartitionSpec(None, "fsdp")
