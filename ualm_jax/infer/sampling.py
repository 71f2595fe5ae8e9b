"""Per-stream id masks and sampling, on device.

Each (row, stream) has a mode that says which ids it may emit next; masks are built on device
from the joint vocabulary's intervals (never a [B, K, V] mask shipped from the host).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ualm_jax.format import vocab as V
from ualm_jax.format.vocab import JointVocab

FREE, TEXT, MODALITY, CODES, FORCED, CLOSER = range(6)


def allowed_ids(modes, forced, vocab: JointVocab, padded: int):
    """modes/forced [B, K] -> bool [B, K, padded]."""
    ids = jnp.arange(padded)[None, None, :]
    k = jnp.arange(modes.shape[1])[None, :, None]
    m = modes[..., None]
    closers = (ids == V.EOS) | (ids == V.EOT)
    text = ((ids >= vocab.text_offset) & (ids < vocab.audio_offset)) | closers
    modality = (ids == V.TEXT) | (ids == V.AUDIO) | (ids == V.SPEECH)
    if vocab.num_codebooks:
        start = vocab.audio_offset + k * vocab.codebook_stride  # codebook k's pad id
        codes = (ids > start) & (ids <= start + vocab.codebook_size)
        codes = codes | ((k == 0) & (ids == vocab.audio_offset))  # stream 0's pad ends the clip
    else:
        codes = jnp.zeros_like(ids, bool)
    real = ids < vocab.size
    return jnp.select(
        [m == FREE, m == TEXT, m == MODALITY, m == CODES, m == FORCED, m == CLOSER],
        [real, text, modality, codes, ids == forced[..., None], closers], False)


def sample(key, logits, allowed, temperature, top_k: int):
    """logits [B, K, V] fp32; temperature [B, K] (0 = greedy); top_k static (0 = off)."""
    logits = jnp.where(allowed, logits, -jnp.inf)
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)[..., None]
    if top_k:
        kth = jax.lax.top_k(scaled, top_k)[0][..., -1:]
        scaled = jnp.where(scaled >= kth, scaled, -jnp.inf)
    drawn = jax.random.categorical(key, scaled, axis=-1)
    return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)


def cfg_mix(logits, scale: float):
    """UALM's guidance: l = lambda * l_cond + (1 - lambda) * l_uncond on pair-interleaved rows
    [c0, u0, c1, u1, ...] (pairs stay on one shard of a sharded batch; lambda = 1 + s in the
    c + s*(c-u) convention)."""
    pairs = logits.reshape(logits.shape[0] // 2, 2, *logits.shape[1:])
    return scale * pairs[:, 0] + (1.0 - scale) * pairs[:, 1]
