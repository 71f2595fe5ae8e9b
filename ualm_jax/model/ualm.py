"""The UALM model: K-stream summed input embedding, audio adapter slots, Qwen2 decoder.

`UALM.__call__(batch)` returns final hidden states [B, L, d]. The output side (stream
embeddings + one head over the joint vocabulary) lives in `loss.py` / `stream_logits` so the loss
can compute logits per stream and per sequence chunk without materialising [B, L, K, V].

Reads the batch contract (ualm_jax/format/batch.py): tokens, segment_ids, positions and, with an
audio encoder, audio_features / audio_mel_mask / audio_slots (slot = index into the row's
F*T_frames adapter outputs, -1 elsewhere; ualm_jax/format/layout.py).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ualm_jax.config import ModelConfig
from ualm_jax.model.audio_encoder import AudioEncoder
from ualm_jax.model.layers import constrain_act, dense, dtype_of, param_with_axes
from ualm_jax.model.qwen2 import Decoder
from ualm_jax.format.vocab import JointVocab, vocab_of


class Adapter(nn.Module):
    """Encoder frames -> decoder width. UALM: one linear layer; AF3: Linear-GELU-Linear."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        dt, pdt = dtype_of(c.dtype), dtype_of(c.param_dtype)
        if c.adapter == "mlp":
            x = nn.gelu(dense(c.d_model, ("enc_embed", "embed"), "fc1", dt, pdt, True)(x),
                        approximate=False)
            return dense(c.d_model, ("mlp", "embed"), "fc2", dt, pdt, True)(x)
        return dense(c.d_model, ("enc_embed", "embed"), "audio", dt, pdt, True)(x)


def _zero_row0(init):
    return lambda key, shape, dtype: init(key, shape, dtype).at[0].set(0)


class UALM(nn.Module):
    cfg: ModelConfig
    decode: bool = False  # KV-cache decoding (ualm_jax/infer): same parameters, a 'cache' collection

    @property
    def vocab(self) -> JointVocab:
        return vocab_of(self.cfg)

    def setup(self):
        c = self.cfg
        pdt = dtype_of(c.param_dtype)
        v = self.vocab.padded_size
        init = nn.initializers.normal(0.02)
        # Row 0 (pad) starts at zero, as the reference's padding_idx=0 table (and its head) do; the
        # input table's row 0 is also never trained (train/freeze.py), so a pad contributes zero
        # whether or not embed_tokens masks it.
        self.embed = param_with_axes(self, "embed", _zero_row0(init), (v, c.d_model), pdt,
                                     ("vocab", "embed"))
        if not c.tie_embeddings:
            self.head = param_with_axes(self, "head", _zero_row0(init), (v, c.d_model), pdt,
                                        ("vocab", "embed"))
        self.stream_emb = param_with_axes(self, "stream_emb", init, (max(c.num_codebooks, 1), c.d_model),
                                          pdt, ("stream", "embed"))
        self.decoder = Decoder(c, self.decode, name="decoder")
        if c.audio_encoder.enabled:
            self.audio_encoder = AudioEncoder(c.audio_encoder, dtype_of(c.dtype), pdt,
                                              name="audio_encoder")
            self.adaptor = Adapter(c, name="adaptor")

    # Output-side parameters, read by the loss and by decoding.
    def output_params(self):
        head = self.embed if self.cfg.tie_embeddings else self.head
        # e_0 = 0: stream 0 reads the bare hidden state.
        emb = jnp.asarray(self.stream_emb).at[0].set(0.0)
        return head, emb

    def embed_tokens(self, tokens):
        """Sum of the K stream embeddings; id 0 (pad) contributes zero (masked here, and row 0 is
        zero anyway: the numbers equal the reference's plain padding_idx=0 lookup)."""
        dt = dtype_of(self.cfg.dtype)
        # Gather from a table whole along `embed` (FSDP all-gathers it, as for any weight):
        # gathering from an embed-sharded table forces a full reshard in the backward pass.
        table = constrain_act(self.embed.astype(dt), "vocab", None)
        x = None
        for k in range(tokens.shape[-1]):
            ids = tokens[..., k]
            e = constrain_act(jnp.take(table, ids, axis=0), "act_batch", "act_length", "act_embed")
            e = e * (ids != 0)[..., None].astype(dt)
            x = e if x is None else x + e
        return x

    def encode_audio(self, audio_features, audio_mel_mask=None):
        """[B,F,T_mel,n_mels] -> adapter outputs [B, F*T_frames, d]."""
        b, f, t, m = audio_features.shape
        mel = audio_features.reshape(b * f, t, m)
        mask = None if audio_mel_mask is None else audio_mel_mask.reshape(b * f, t)
        frames = self.audio_encoder(mel, mask)
        if self.cfg.audio_encoder.frozen:
            frames = jax.lax.stop_gradient(frames)  # frozen: no backward pass through it at all
        out = self.adaptor(frames)
        return out.reshape(b, f * out.shape[1], out.shape[-1])

    def __call__(self, batch):
        tokens = batch["tokens"]
        x = self.embed_tokens(tokens)
        if "audio_features" in batch and self.cfg.audio_encoder.enabled:
            frames = self.encode_audio(batch["audio_features"], batch.get("audio_mel_mask"))
            slots = batch["audio_slots"]
            gathered = jnp.take_along_axis(frames, jnp.clip(slots, 0)[..., None], axis=1)
            x = jnp.where((slots >= 0)[..., None], gathered.astype(x.dtype), x)
        x = constrain_act(x, "act_batch", "act_length", "act_embed")
        h = self.decoder(x, batch["segment_ids"], batch["positions"])
        return h

    def hidden_and_output(self, batch):
        """(hidden [B,L,d], head [V,d], stream_emb [K,d]) in one apply."""
        head, emb = self.output_params()
        return self(batch), head, emb
