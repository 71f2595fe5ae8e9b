"""Model FLOPs per token (the MFU numerator), from the config alone.

Training FLOPs per token = 3 x forward (backward = 2 x forward), remat recomputation NOT counted
(MFU, not hardware utilisation). Forward per token:
  2 * matmul params of the decoder (q,k,v,o, gate/up/down per layer)
+ 2 * 2 * n_layers * seq * n_heads * head_dim * 1/2   (QK^T and PV; causal counts half)
+ 2 * d * V_padded                                     (stream-0 head over the joint vocab)
+ 2 * d * (K-1) * audio_width                          (audio streams; width = K*(C+1) for the
                                                        reference/modality objectives, C+1 for
                                                        consistent)
Embedding lookups and norms are not counted; the audio encoder is counted separately when it runs.
"""
from __future__ import annotations

from ualm_jax.model.vocab import JointVocab

FORMULA = ("6*(N_decoder_matmul + d*V_pad + d*(K-1)*audio_width) "
           "+ 6*n_layers*seq*n_heads*head_dim (causal attention counted half)")


def decoder_matmul_params(cfg) -> int:
    d, hd = cfg.d_model, cfg.head_dim
    attn = d * cfg.n_heads * hd * 2 + d * cfg.n_kv_heads * hd * 2
    mlp = 3 * d * cfg.d_ff
    return cfg.n_layers * (attn + mlp)


def flops_per_token(cfg, seq_len: int) -> float:
    vocab = JointVocab.from_model_config(cfg)
    d = cfg.d_model
    audio_width = vocab.codebook_stride if cfg.loss_objective == "consistent" else vocab.audio_size
    head = d * vocab.padded_size + d * max(cfg.num_codebooks - 1, 0) * audio_width
    if cfg.loss_objective == "modality":
        head += d * vocab.audio_size  # stream 0's extra audio-range logits
    fwd_matmul = 2 * (decoder_matmul_params(cfg) + head)
    fwd_attn = 2 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_dim  # 4*... halved for causal
    return 3.0 * (fwd_matmul + fwd_attn)


def param_count(cfg) -> dict:
    vocab = JointVocab.from_model_config(cfg)
    d = cfg.d_model
    hd = cfg.head_dim
    per_layer = (d * cfg.n_heads * hd * 2 + d * cfg.n_kv_heads * hd * 2 + 3 * d * cfg.d_ff + 2 * d)
    if cfg.qkv_bias:
        per_layer += cfg.n_heads * hd + 2 * cfg.n_kv_heads * hd
    tables = vocab.padded_size * d * (1 if cfg.tie_embeddings else 2)
    return {"decoder": cfg.n_layers * per_layer + d, "tables": tables}
