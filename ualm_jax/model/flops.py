"""Model FLOPs of a train step (the MFU numerator), from the config and the batch's layout.

Training counts 3 x forward (backward = 2 x forward) for everything that gets a backward pass and
1 x forward for what does not (a frozen encoder: its output is stop-gradient). Remat recomputation
is NOT counted (MFU, not hardware utilisation). Per step:

  decoder    6 * (N_decoder_matmul + d*V_pad + d*(K-1)*audio_width) * B*L
             (every position, padding included, as MaxText counts tokens; audio_width = K*(C+1)
              for the reference/modality objectives, C+1 for consistent)
  attention  3 * 4 * n_layers * n_heads * head_dim * sum over packed segments of s*(s+1)/2
             (QK^T and PV of the causal pairs INSIDE each segment: packed rows do not attend
              across examples, so a full-length causal count would credit work that is masked)
  encoder    m * per window [2*T*3*n_mels*D + 2*(T/2)*3*D*D + layers * (2*(T/2)*(4*D*D + 2*D*F)
             + 4*(T/2)^2*D)], m = 1 frozen / 3 trained, over the clip windows that hold audio
  adapter    3 * 2 * (T/2/pool) * (D*d [linear] | D*d + d*d [mlp]) per such window
             (1 x when neither the adapter nor the encoder is trained)
Embedding lookups, norms and the loss softmax are not counted.
"""
from __future__ import annotations

import numpy as np

from ualm_jax.format.vocab import JointVocab

FORMULA = ("decoder 6*(N_decoder_matmul + d*V_pad + d*(K-1)*audio_width)*B*L"
           " + attention 12*n_layers*n_heads*head_dim*sum_segments s(s+1)/2"
           " + encoder (1x frozen, 3x trained) and adapter (3x) forward FLOPs per audio window")


def decoder_matmul_params(cfg) -> int:
    d, hd = cfg.d_model, cfg.head_dim
    attn = d * cfg.n_heads * hd * 2 + d * cfg.n_kv_heads * hd * 2
    mlp = 3 * d * cfg.d_ff
    return cfg.n_layers * (attn + mlp)


def decoder_flops_per_token(cfg) -> float:
    """Training FLOPs per position of the decoder's matmuls and output heads (no attention)."""
    vocab = JointVocab.from_model_config(cfg)
    d = cfg.d_model
    audio_width = vocab.codebook_stride if cfg.loss_objective == "consistent" else vocab.audio_size
    head = d * vocab.padded_size + d * max(cfg.num_codebooks - 1, 0) * audio_width
    if cfg.loss_objective == "modality":
        head += d * vocab.audio_size  # stream 0's extra audio-range logits
    return 6.0 * (decoder_matmul_params(cfg) + head)


def causal_pairs(segment_ids) -> int:
    """sum over packed segments (runs of one id > 0 within a row) of s*(s+1)/2."""
    seg = np.asarray(segment_ids)
    total = 0
    for row in seg.reshape(-1, seg.shape[-1]):
        counts = np.bincount(row[row > 0])
        total += int((counts * (counts + 1) // 2).sum())
    return total


def attention_flops(cfg, pairs: int) -> float:
    """Training FLOPs of decoder attention over `pairs` (query, key) pairs."""
    return 3.0 * 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * pairs


def audio_windows(batch) -> int:
    """Clip windows holding audio in a batch (0 without an audio encoder input)."""
    mask = batch.get("audio_mel_mask")
    return 0 if mask is None else int(np.asarray(mask).any(axis=-1).sum())


def encoder_window_flops(cfg) -> tuple[float, float]:
    """Forward FLOPs of (the audio encoder, the adapter) on one full window."""
    enc = cfg.audio_encoder
    t, t2, dd = enc.max_mel_frames, enc.max_mel_frames // 2, enc.d_model
    convs = 2 * t * 3 * enc.n_mels * dd + 2 * t2 * 3 * dd * dd
    layer = 2 * t2 * (4 * dd * dd + 2 * dd * enc.d_ff) + 4 * t2 * t2 * dd
    out = t2 // enc.pool
    adapter = 2 * out * (dd * cfg.d_model + (cfg.d_model * cfg.d_model if cfg.adapter == "mlp" else 0))
    return float(convs + enc.n_layers * layer), float(adapter)


def step_flops(cfg, rows: int, seq_len: int, pairs: int, windows: int,
               adapter_trained: bool = True) -> dict:
    """Model FLOPs of one train step by part (see the module docstring) and their total."""
    out = {"decoder": decoder_flops_per_token(cfg) * rows * seq_len,
           "attention": attention_flops(cfg, pairs), "encoder": 0.0, "adapter": 0.0}
    if cfg.audio_encoder.enabled and windows:
        enc, ada = encoder_window_flops(cfg)
        enc_trained = not cfg.audio_encoder.frozen
        out["encoder"] = (3.0 if enc_trained else 1.0) * enc * windows
        out["adapter"] = (3.0 if adapter_trained or enc_trained else 1.0) * ada * windows
    out["total"] = sum(out.values())
    return out


def batch_step_flops(cfg, batch, adapter_trained: bool = True) -> dict:
    """step_flops of a (host numpy) batch of the contract."""
    rows, seq_len = np.shape(batch["segment_ids"])
    return step_flops(cfg, rows, seq_len, causal_pairs(batch["segment_ids"]),
                      audio_windows(batch), adapter_trained)


def param_count(cfg) -> dict:
    vocab = JointVocab.from_model_config(cfg)
    d = cfg.d_model
    hd = cfg.head_dim
    per_layer = (d * cfg.n_heads * hd * 2 + d * cfg.n_kv_heads * hd * 2 + 3 * d * cfg.d_ff + 2 * d)
    if cfg.qkv_bias:
        per_layer += cfg.n_heads * hd + 2 * cfg.n_kv_heads * hd
    tables = vocab.padded_size * d * (1 if cfg.tie_embeddings else 2)
    return {"decoder": cfg.n_layers * per_layer + d, "tables": tables}
