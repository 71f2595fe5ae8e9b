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
from ualm_jax.model.layers import (RMSNorm, constrain_act, dense, dot_product_attention,
                                   dtype_of, stack_layers)


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
        o = dot_product_attention(q, k, v, mask, c.head_dim ** -0.5, c.attention, causal=True)
        return dense(c.d_model, ("heads", "head_dim", "embed"), "o_proj", dt, pdt,
                     in_axis=(-2, -1))(o)


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

    @nn.compact
    def __call__(self, x, mask, positions):
        c = self.cfg
        dt, pdt = dtype_of(c.dtype), dtype_of(c.param_dtype)
        h = RMSNorm(c.rms_norm_eps, dt, pdt, name="input_layernorm")(x)
        x = x + Attention(c, name="self_attn")(h, mask, positions)
        h = RMSNorm(c.rms_norm_eps, dt, pdt, name="post_attention_layernorm")(x)
        x = x + MLP(c, name="mlp")(h)
        x = constrain_act(x, "act_batch", "act_length", "act_embed")
        return (x, None) if self.cfg.scan_layers else x


class Decoder(nn.Module):
    """Stacked decoder layers + final norm. Input: embeddings [B,L,d]; output: hidden [B,L,d]."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, segment_ids, positions):
        c = self.cfg
        mask = packed_causal_mask(segment_ids)
        layer = stack_layers(DecoderLayer, c.n_layers, c.scan_layers, c.remat, in_axes=2)
        if c.scan_layers:
            x, _ = layer(c, name="layers")(x, mask, positions)
        else:
            for i in range(c.n_layers):
                x = layer(c, name=f"layers_{i}")(x, mask, positions)
        return RMSNorm(c.rms_norm_eps, dtype_of(c.dtype), dtype_of(c.param_dtype), name="norm")(x)
