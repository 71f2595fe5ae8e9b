"""UALM's weighted multi-stream next-token loss, computed per stream/range and per sequence
chunk so that [B, L, K, V_joint] logits never exist.

Conventions
- `loss_weights[b, t, k]` weighs predicting `tokens[b, t, k]` from position t-1 (the weight
  belongs to the target token). Predictions never cross a segment boundary.
- Stream k's logits: (h + e_k) @ head^T with e_0 = 0.
- Objectives (`model.loss_objective`):
  reference:  stream 0 over the full joint vocab; streams 1..K-1 over the audio interval that
              holds the target (`vocab.audio_loss_intervals(max_interval)`: the whole audio
              range for X-codec's 8 x 1025 ids), as the authors' code trains.
  modality:   as reference, but stream 0 at audio targets is restricted to the audio range.
  consistent: stream k over codebook k's C+1 ids; stream 0 at audio targets over codebook 0,
              i.e. exactly what delay-aware decoding allows.
- Normalisation: sum of weighted CE over all streams / number of target positions whose
  stream-0 weight is > 0 (one audio frame weighs as one text token with 1/K audio weights).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ualm_jax.format.vocab import JointVocab


class LossSums(NamedTuple):
    total: jax.Array  # sum of weighted CE, scalar
    count: jax.Array  # normaliser: positions with stream-0 weight > 0
    per_stream: jax.Array  # [K] weighted CE sums
    per_stream_weight: jax.Array  # [K] weight sums
    per_task: jax.Array  # [T] weighted CE sums by task id (T = num_tasks, may be 0)
    per_task_count: jax.Array  # [T] normaliser by task
    correct: jax.Array  # stream-0 targets predicted right by argmax, among the counted ones
    per_row: jax.Array  # [B] weighted CE per sequence (= -log-prob; used by DPO)
    per_task_correct: jax.Array  # [T] stream-0 argmax hits by task

    @staticmethod
    def zeros(k: int, num_tasks: int, rows: int) -> "LossSums":
        z = jnp.zeros((), jnp.float32)
        return LossSums(z, z, jnp.zeros((k,)), jnp.zeros((k,)), jnp.zeros((num_tasks,)),
                        jnp.zeros((num_tasks,)), z, jnp.zeros((rows,)), jnp.zeros((num_tasks,)))


def shift_targets(tokens, loss_weights, segment_ids):
    """Targets at position t are tokens[t+1]; the weight is zero at the last position and where
    t+1 starts a new segment."""
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    same = segment_ids[:, 1:] == segment_ids[:, :-1]
    w = loss_weights[:, 1:] * same[..., None].astype(loss_weights.dtype)
    w = jnp.concatenate([w, jnp.zeros_like(loss_weights[:, :1])], axis=1)
    return targets, w.astype(jnp.float32)


def _ce(logits, target_idx):
    """logits [..., V] fp32, target_idx [...] -> lse - logit[target]."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, target_idx[..., None], axis=-1)[..., 0]
    return lse - tgt


def _chunk_sums(h, head, stream_emb, targets, weights, tasks, num_tasks: int, vocab: JointVocab,
                objective: str, intervals: tuple = ()):
    """Loss sums for one chunk. h [B,C,d]; targets/weights [B,C,K]; tasks [B,C] (or None)."""
    k_streams = targets.shape[-1]
    hf = h
    dt = h.dtype
    head = head.astype(dt)
    # Stream 0 over the full joint vocab; padded rows never win.
    logits0 = jnp.einsum("bcd,vd->bcv", hf, head, preferred_element_type=jnp.float32)
    valid = jnp.arange(head.shape[0]) < vocab.size
    logits0 = jnp.where(valid, logits0, -jnp.inf)
    t0 = targets[..., 0]
    ce0 = _ce(logits0, t0)
    ce_streams = [ce0]

    if vocab.num_codebooks:
        a0, a1 = vocab.audio_offset, vocab.size
        audio_head = head[a0:a1]  # [K*(C+1), d]
        is_audio0 = (t0 >= a0) & (t0 < a1)
        if objective == "consistent":
            cb = audio_head.reshape(vocab.num_codebooks, vocab.codebook_stride, -1)
            hs = hf[:, :, None, :] + stream_emb[None, None, :k_streams].astype(dt)
            logits_c = jnp.einsum("bckd,kvd->bckv", hs, cb, preferred_element_type=jnp.float32)
            starts = jnp.asarray(vocab.codebook_pads()[:k_streams])
            idx = jnp.clip(targets - starts, 0, vocab.codebook_stride - 1)
            ce_c = _ce(logits_c, idx)  # [B,C,K]
            ce_streams[0] = jnp.where(is_audio0, ce_c[..., 0], ce0)
            ce_streams += [ce_c[..., k] for k in range(1, k_streams)]
        else:
            if objective == "modality":
                la0 = jnp.einsum("bcd,vd->bcv", hf, audio_head, preferred_element_type=jnp.float32)
                ce_a0 = _ce(la0, jnp.clip(t0 - a0, 0, vocab.audio_size - 1))
                ce_streams[0] = jnp.where(is_audio0, ce_a0, ce0)
            if k_streams > 1:
                hs = hf[:, :, None, :] + stream_emb[None, None, 1:k_streams].astype(dt)
                tk = targets[..., 1:]
                ce_a = jnp.zeros(tk.shape, jnp.float32)
                # One softmax per interval; a target takes the CE of the interval holding it.
                for lo, hi in intervals or ((a0, a1),):
                    la = jnp.einsum("bckd,vd->bckv", hs, head[lo:hi],
                                    preferred_element_type=jnp.float32)
                    ce_i = _ce(la, jnp.clip(tk - lo, 0, hi - lo - 1))
                    ce_a = jnp.where((tk >= lo) & (tk < hi), ce_i, ce_a)
                ce_streams += [ce_a[..., k] for k in range(k_streams - 1)]

    ce = jnp.stack(ce_streams, axis=-1)  # [B,C,K]
    # Weighted positions only; where() keeps unsupervised garbage (e.g. -inf) out of the sums.
    wce = jnp.where(weights > 0, weights * ce, 0.0)
    per_stream = wce.sum(axis=(0, 1))
    counted = (weights[..., 0] > 0).astype(jnp.float32)
    correct = (jnp.argmax(logits0, axis=-1) == t0).astype(jnp.float32) * counted
    if num_tasks and tasks is not None:
        onehot = jax.nn.one_hot(tasks, num_tasks, dtype=jnp.float32)  # id -1 -> all zeros
        per_task = jnp.einsum("bc,bct->t", wce.sum(-1), onehot)
        per_task_count = jnp.einsum("bc,bct->t", counted, onehot)
        per_task_correct = jnp.einsum("bc,bct->t", correct, onehot)
    else:
        per_task = per_task_count = per_task_correct = jnp.zeros((num_tasks,), jnp.float32)
    return LossSums(per_stream.sum(), counted.sum(), per_stream, weights.sum(axis=(0, 1)),
                    per_task, per_task_count, correct.sum(), wce.sum(axis=(1, 2)),
                    per_task_correct)


def loss_sums(h, head, stream_emb, batch, vocab: JointVocab, objective: str = "reference",
              chunk_size: int = 0, num_tasks: int = 0, max_interval: int = 0) -> LossSums:
    """Sums over the batch; divide `total` by `count` (after summing over microbatches/hosts).
    With `num_tasks`, `batch["task_ids"]` [B,L] (-1 = none) splits the sums per task.
    max_interval: model.max_loss_interval (0 = the whole audio range in one softmax)."""
    intervals = tuple(vocab.audio_loss_intervals(max_interval))
    targets, weights = shift_targets(batch["tokens"], batch["loss_weights"], batch["segment_ids"])
    tasks = batch.get("task_ids") if num_tasks else None
    if tasks is not None:  # the task of a target token
        tasks = jnp.concatenate([tasks[:, 1:], jnp.full_like(tasks[:, :1], -1)], axis=1)
    b, l, _ = h.shape
    if not chunk_size or chunk_size >= l or l % chunk_size:
        return _chunk_sums(h, head, stream_emb, targets, weights, tasks, num_tasks, vocab,
                           objective, intervals)

    n = l // chunk_size

    def split(x):
        return jnp.moveaxis(x.reshape(b, n, chunk_size, *x.shape[2:]), 1, 0)

    @jax.checkpoint  # recompute each chunk's logits in the backward pass instead of storing them
    def body(carry, xs):
        hc, tc, wc, kc = xs
        s = _chunk_sums(hc, head, stream_emb, tc, wc, kc, num_tasks, vocab, objective, intervals)
        return jax.tree.map(jnp.add, carry, s), None

    task_chunks = split(tasks) if tasks is not None else jnp.zeros((n, b, chunk_size), jnp.int32) - 1
    zero = LossSums.zeros(targets.shape[-1], num_tasks, b)
    sums, _ = jax.lax.scan(body, zero, (split(h), split(targets), split(weights), task_chunks))
    return sums


def stream_logits(h, head, stream_emb, vocab: JointVocab, stream: int):
    """Full-vocab logits of one stream (decoding / tests); padded rows masked."""
    x = h + stream_emb[stream].astype(h.dtype)
    logits = jnp.einsum("...d,vd->...v", x, head.astype(h.dtype), preferred_element_type=jnp.float32)
    return jnp.where(jnp.arange(head.shape[0]) < vocab.size, logits, -jnp.inf)
