"""Whisper-style audio encoder (AF-Whisper: Whisper-large-v3 encoder + average pooling to 25 Hz).

log-mel [N, T_mel, n_mels] -> conv(k3) GELU -> conv(k3, stride 2) GELU -> + positions ->
pre-LN transformer blocks -> avg-pool -> LayerNorm -> [N, T_mel / 2 / pool, d_enc]
(pool=1 is exactly Whisper's encoder; pool=2 is Audio Flamingo 3's AF-Whisper).
Parameter names follow HF's WhisperEncoder so weight import is a rename.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ualm_jax.config import AudioEncoderConfig
from ualm_jax.model.layers import LayerNorm, dense, dot_product_attention, param_with_axes


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's fixed positional table (used to initialise `embed_positions`)."""
    log_inc = np.log(max_timescale) / (channels // 2 - 1)
    inv = np.exp(-log_inc * np.arange(channels // 2))
    t = np.arange(length)[:, None] * inv[None, :]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(np.float32)


class EncoderLayer(nn.Module):
    cfg: AudioEncoderConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, mask):
        c, dt, pdt = self.cfg, self.dtype, self.param_dtype
        hd = c.d_model // c.n_heads
        h = LayerNorm(c.layer_norm_eps, dt, pdt, name="self_attn_layer_norm")(x)
        q = dense((c.n_heads, hd), ("enc_embed", "enc_heads", "head_dim"), "q_proj", dt, pdt, True)(h)
        k = dense((c.n_heads, hd), ("enc_embed", "enc_heads", "head_dim"), "k_proj", dt, pdt, False)(h)
        v = dense((c.n_heads, hd), ("enc_embed", "enc_heads", "head_dim"), "v_proj", dt, pdt, True)(h)
        o = dot_product_attention(q, k, v, mask, hd ** -0.5, "xla", causal=False)
        x = x + dense(c.d_model, ("enc_heads", "head_dim", "enc_embed"), "out_proj", dt, pdt, True,
                      in_axis=(-2, -1))(o)
        h = LayerNorm(c.layer_norm_eps, dt, pdt, name="final_layer_norm")(x)
        h = nn.gelu(dense(c.d_ff, ("enc_embed", "enc_mlp"), "fc1", dt, pdt, True)(h), approximate=False)
        x = x + dense(c.d_model, ("enc_mlp", "enc_embed"), "fc2", dt, pdt, True)(h)
        return x, None


class AudioEncoder(nn.Module):
    cfg: AudioEncoderConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, mel, mel_mask=None):
        """mel [N, T_mel, n_mels] (T_mel <= max_mel_frames, even); mel_mask [N, T_mel] bool or
        None. Returns frames [N, T_mel // 2 // pool, d_model]."""
        c, dt, pdt = self.cfg, self.dtype, self.param_dtype
        n, t, _ = mel.shape
        conv_axes = ("conv_window", "mels", "enc_embed")
        x = nn.Conv(c.d_model, (3,), padding=((1, 1),), dtype=dt, param_dtype=pdt, name="conv1",
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), conv_axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("enc_embed",)))(
            mel.astype(dt))
        x = nn.gelu(x, approximate=False)
        x = nn.Conv(c.d_model, (3,), strides=(2,), padding=((1, 1),), dtype=dt, param_dtype=pdt,
                    name="conv2",
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                             ("conv_window", None, "enc_embed")),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("enc_embed",)))(x)
        x = nn.gelu(x, approximate=False)
        pos = param_with_axes(self, "embed_positions",
                              lambda key, shape, dtype: jnp.asarray(sinusoids(*shape), dtype),
                              (c.max_mel_frames // 2, c.d_model), pdt, (None, "enc_embed"))
        x = x + pos[: x.shape[1]].astype(dt)
        tt = x.shape[1]
        if mel_mask is None:
            attn_mask = jnp.ones((n, tt, tt), bool)
        else:
            valid = mel_mask[:, ::2][:, :tt]
            attn_mask = jnp.broadcast_to(valid[:, None, :], (n, tt, tt))
        blocks = nn.scan(EncoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast,), length=c.n_layers,
                         metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = blocks(c, dt, pdt, name="layers")(x, attn_mask)
        # Audio Flamingo 3 (and Qwen2-Audio) pool first, then apply the final LayerNorm.
        if c.pool > 1:
            x = x[:, : tt // c.pool * c.pool].reshape(n, tt // c.pool, c.pool, -1).mean(axis=2)
        return LayerNorm(c.layer_norm_eps, dt, pdt, name="layer_norm")(x)
