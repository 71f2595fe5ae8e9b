"""Qwen2/Qwen2.5 decoder: GQA with q/k/v bias, RoPE, RMSNorm, SwiGLU; layers stacked and scanned.

Packed sequences: attention is causal within a segment and never crosses `segment_ids`;
positions (from the batch) restart per segment, so RoPE sees per-sample positions.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from ualm_jax.config import ModelConfig
from ualm_jax.model.layers import (RMSNorm, attention_weights_xla, constrain_act, dense,
                                   dot_product_attention, dtype_of, stack_layers)


def rope(x, positions, theta: float):
    """Rotary embedding, HF "rotate_half" layout. x [B,L,H,D], positions [B,L]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B,L,D/2]
    cos = jnp.cos(freqs)[:, :, None, :]
    sin = jnp.sin(freqs)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def packed_causal_mask(segment_ids):
    """[B,L] -> [B,L,L] bool: causal and within the same segment."""
    l = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((l, l), dtype=bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return causal[None] & same


class Attention(nn.Module):
    cfg: ModelConfig
    decode: bool = False  # KV-cache mode: `mask` is then the validity [B, T] of the new tokens

    @nn.compact
    def __call__(self, x, mask, positions):
        c = self.cfg
        dt, pdt = dtype_of(c.dtype), dtype_of(c.param_dtype)
        q = dense((c.n_heads, c.head_dim), ("embed", "heads", "head_dim"), "q_proj", dt, pdt,
                  use_bias=c.qkv_bias)(x)
        k = dense((c.n_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), "k_proj", dt, pdt,
                  use_bias=c.qkv_bias)(x)
        v = dense((c.n_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), "v_proj", dt, pdt,
                  use_bias=c.qkv_bias)(x)
        q = checkpoint_name(q, "query_proj")
        k = checkpoint_name(k, "key_proj")
        v = checkpoint_name(v, "value_proj")
        q = constrain_act(rope(q, positions, c.rope_theta), "act_batch", "act_length", "act_heads", None)
        k = constrain_act(rope(k, positions, c.rope_theta), "act_batch", "act_length", "act_kv_heads", None)
        v = constrain_act(v, "act_batch", "act_length", "act_kv_heads", None)
        if self.decode:
            k, v, mask = self._update_cache(k, v, mask)
            o = attention_weights_xla(q, k, v, mask, c.head_dim ** -0.5)
        else:
            o = dot_product_attention(q, k, v, mask, c.head_dim ** -0.5, c.attention, causal=True)
        return dense(c.d_model, ("heads", "head_dim", "embed"), "o_proj", dt, pdt,
                     in_axis=(-2, -1))(o)


    def _update_cache(self, k, v, valid):
        """Writes the new keys/values at the cache index; returns the whole cache and the mask
        [B, T_new, S_max]: a new token sees valid cached slots up to and including its own.
        The cache is sized by the `init` call (its input length is the maximum length)."""
        initialised = self.has_variable("cache", "key")
        ck = self.variable("cache", "key", jnp.zeros, k.shape, k.dtype)
        cv = self.variable("cache", "value", jnp.zeros, v.shape, v.dtype)
        cvalid = self.variable("cache", "valid", jnp.zeros, valid.shape, bool)
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        if not initialised:  # init: no cache content yet, attend causally within the input
            t = k.shape[1]
            mask = jnp.tril(jnp.ones((t, t), bool))[None] & valid[:, None, :]
            return k, v, mask | jnp.eye(t, dtype=bool)[None]
        i = index.value
        ck.value = jax.lax.dynamic_update_slice(ck.value, k, (0, i, 0, 0))
        cv.value = jax.lax.dynamic_update_slice(cv.value, v, (0, i, 0, 0))
        cvalid.value = jax.lax.dynamic_update_slice(cvalid.value, valid, (0, i))
        t, s_max = k.shape[1], ck.value.shape[1]
        index.value = i + t
        q_slot = i + jnp.arange(t)
        mask = (jnp.arange(s_max)[None, :] <= q_slot[:, None])[None] & cvalid.value[:, None, :]
        mask = mask | (jnp.arange(s_max)[None, :] == q_slot[:, None])[None]  # never fully masked
        return ck.value, cv.value, mask


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        dt, pdt = dtype_of(c.dtype), dtype_of(c.param_dtype)
        gate = dense(c.d_ff, ("embed", "mlp"), "gate_proj", dt, pdt)(x)
        up = dense(c.d_ff, ("embed", "mlp"), "up_proj", dt, pdt)(x)
        h = constrain_act(nn.silu(gate) * up, "act_batch", "act_length", "act_mlp")
        return dense(c.d_model, ("mlp", "embed"), "down_proj", dt, pdt)(h)


class DecoderLayer(nn.Module):
    cfg: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x, mask, positions):
        c = self.cfg
        dt, pdt = dtype_of(c.dtype), dtype_of(c.param_dtype)
        h = RMSNorm(c.rms_norm_eps, dt, pdt, name="input_layernorm")(x)
        x = x + Attention(c, self.decode, name="self_attn")(h, mask, positions)
        h = RMSNorm(c.rms_norm_eps, dt, pdt, name="post_attention_layernorm")(x)
        x = x + MLP(c, name="mlp")(h)
        x = constrain_act(x, "act_batch", "act_length", "act_embed")
        return (x, None) if self.cfg.scan_layers else x


class Decoder(nn.Module):
    """Stacked decoder layers + final norm. Input: embeddings [B,L,d]; output: hidden [B,L,d]."""

    cfg: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x, segment_ids, positions):
        c = self.cfg
        # Decoding attends over the cache: layers get the new tokens' validity instead of a mask.
        mask = (segment_ids != 0) if self.decode else packed_causal_mask(segment_ids)
        remat = "none" if self.decode else c.remat
        layer = stack_layers(DecoderLayer, c.n_layers, c.scan_layers, remat, in_axes=2)
        if c.scan_layers:
            x, _ = layer(c, self.decode, name="layers")(x, mask, positions)
        else:
            for i in range(c.n_layers):
                x = layer(c, self.decode, name=f"layers_{i}")(x, mask, positions)
        return RMSNorm(c.rms_norm_eps, dtype_of(c.dtype), dtype_of(c.param_dtype), name="norm")(x)
