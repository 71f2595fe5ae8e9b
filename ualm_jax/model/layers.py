"""Small building blocks shared by the decoder and the audio encoder."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ualm_jax.sharding import constrain

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


def dtype_of(name: str):
    return DTYPES[name]


def param_with_axes(module: nn.Module, name: str, init, shape: Sequence[int], dtype,
                    axes: Sequence[str | None]):
    """A parameter annotated with logical axis names (read back by `logical_axes`)."""
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


def dense(features, axes, name, dtype, param_dtype, use_bias=False, in_axis=-1):
    """DenseGeneral whose kernel carries logical axes `axes` (in-dims then out-dims)."""
    features = tuple(features) if isinstance(features, (tuple, list)) else (features,)
    n_out = len(features)
    return nn.DenseGeneral(
        features=features, axis=in_axis, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), tuple(axes)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), tuple(axes[-n_out:])),
        name=name)


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x):
        scale = param_with_axes(self, "scale", nn.initializers.ones_init(), (x.shape[-1],),
                                self.param_dtype, (self.axis_name,))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nn.Module):
    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    axis_name: str = "enc_embed"

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = param_with_axes(self, "scale", nn.initializers.ones_init(), (d,), self.param_dtype,
                                (self.axis_name,))
        bias = param_with_axes(self, "bias", nn.initializers.zeros_init(), (d,), self.param_dtype,
                               (self.axis_name,))
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale + bias).astype(self.dtype)


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "qkv_proj": jax.checkpoint_policies.save_only_these_names("query_proj", "key_proj",
                                                              "value_proj"),
}


def stack_layers(layer_cls, n_layers: int, scan: bool, remat: str, in_axes: int):
    """Wraps a layer class for `n_layers` repeats: remat policy, then nn.scan over a stacked
    `layers` axis so compile time does not grow with depth."""
    cls = layer_cls
    if remat != "none":
        cls = nn.remat(cls, policy=REMAT_POLICIES[remat], prevent_cse=not scan)
    if scan:
        cls = nn.scan(cls, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast,) * in_axes, length=n_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    return cls


def attention_weights_xla(q, k, v, mask, scale):
    """Grouped-query attention in plain XLA. q [B,T,H,D], k/v [B,S,Hkv,D], mask [B,T,S] bool."""
    b, t, h, d = q.shape
    hkv = k.shape[2]
    q = q.reshape(b, t, hkv, h // hkv, d)
    s = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask[:, None, None], s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("bkgts,bskd->btkgd", p, v)
    return o.reshape(b, t, h, d)


def dot_product_attention(q, k, v, mask, scale, impl: str, causal: bool):
    """Dispatches to cuDNN (GPU) or plain XLA; `auto` picks cuDNN on GPU when it accepts the call."""
    if impl == "auto":
        impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
        if impl == "cudnn":
            try:
                return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale,
                                                    is_causal=causal, implementation="cudnn")
            except Exception:  # unsupported shape/dtype/mask: the XLA path is always correct
                impl = "xla"
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale,
                                            is_causal=causal, implementation="cudnn")
    return attention_weights_xla(q, k, v, mask, scale)


def constrain_act(x, *names):
    return constrain(x, names)
