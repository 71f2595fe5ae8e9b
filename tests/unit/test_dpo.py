"""The DPO loss against numpy, and a DPO step that moves the policy toward the chosen side."""
import jax
import numpy as np
import pytest

from ualm_jax.model.loss import stream_logits
from ualm_jax.model.ualm import UALM
from ualm_jax.train.dpo import dpo_terms, make_dpo_loss, make_dpo_step, sequence_logprobs
from ualm_jax.train.optim import make_optimizer
from ualm_jax.config import OptimConfig


def numpy_seq_logp(model, params, batch):
    """Reference objective by hand: sum over supervised targets of w * log p (per row)."""
    h, head, emb = model.apply({"params": params}, batch, method=UALM.hidden_and_output)
    v = model.vocab
    logits = np.stack([np.asarray(stream_logits(h, head, emb, v, k), np.float64)
                       for k in range(batch["tokens"].shape[-1])], axis=2)  # [B,L,K,V]
    tok, w, seg = batch["tokens"], batch["loss_weights"], batch["segment_ids"]
    out = np.zeros(tok.shape[0])
    for b in range(tok.shape[0]):
        for t in range(tok.shape[1] - 1):
            if seg[b, t + 1] != seg[b, t]:
                continue
            for k in range(tok.shape[2]):
                if w[b, t + 1, k] == 0:
                    continue
                lo, hi = (0, v.size) if k == 0 else (v.audio_offset, v.size)
                z = logits[b, t, k, lo:hi]
                lse = np.log(np.exp(z - z.max()).sum()) + z.max()
                out[b] += w[b, t + 1, k] * (logits[b, t, k, tok[b, t + 1, k]] - lse)
    return out


def test_dpo_loss_matches_numpy(tiny_model, tiny_params, tiny_batch):
    batch = dict(tiny_batch)  # 4 rows: 2 chosen, 2 rejected
    logp = np.asarray(sequence_logprobs(tiny_model, tiny_params, batch))
    np.testing.assert_allclose(logp, numpy_seq_logp(tiny_model, tiny_params, batch), rtol=1e-5)
    ref = np.array([-50.0, -60.0, -55.0, -40.0])
    beta = 0.1
    loss_fn = make_dpo_loss(tiny_model, beta, ce_weight=0.5)
    loss, m = loss_fn(tiny_params, dict(batch, ref_logp=ref))
    margin = beta * ((logp[:2] - ref[:2]) - (logp[2:] - ref[2:]))
    dpo = np.mean(np.log1p(np.exp(-margin)))
    w = batch["loss_weights"][:2, 1:, 0] * (batch["segment_ids"][:2, 1:] == batch["segment_ids"][:2, :-1])
    ce = -logp[:2].sum() / (w > 0).sum()
    assert float(loss) == pytest.approx(dpo + 0.5 * ce, rel=1e-5)
    assert float(m["reward_margin"]) == pytest.approx(margin.mean(), rel=1e-5)
    # With online reference parameters equal to the policy, every margin is 0: loss = log 2 + CE.
    loss0, m0 = loss_fn(tiny_params, batch, tiny_params)
    assert float(m0["dpo_loss"]) == pytest.approx(np.log(2.0), rel=1e-6)


def test_dpo_step_prefers_chosen(tiny_model, tiny_params, tiny_batch):
    tx = make_optimizer(OptimConfig(learning_rate=1e-3, warmup_steps=0, schedule="constant",
                                    weight_decay=0.0), 10)
    state = {"step": np.int32(0), "params": tiny_params, "opt_state": tx.init(tiny_params)}
    step = jax.jit(make_dpo_step(tiny_model, tx, beta=0.1, ce_weight=0.0))
    for _ in range(5):
        state, metrics = step(state, tiny_batch, tiny_params)
    assert float(metrics["reward_margin"]) > 0 and float(metrics["reward_accuracy"]) == 1.0


def test_dpo_terms_shape():
    losses, margins = dpo_terms(np.zeros(3), np.zeros(3), np.zeros(3), np.zeros(3), 0.1)
    np.testing.assert_allclose(np.asarray(losses), np.log(2.0) * np.ones(3), rtol=1e-6)
