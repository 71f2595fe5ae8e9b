"""Model behaviour on the tiny preset: packing, audio slots, chunked loss, scan vs loop."""
import jax
import jax.numpy as jnp
import numpy as np

from ualm_jax.model.loss import loss_sums
from ualm_jax.model.params import build_model
from ualm_jax.config import preset_config
from ualm_jax.model.ualm import UALM


def _segment(rng, n, k, vocab_hi):
    t = np.zeros((n, k), np.int32)
    t[:, 0] = rng.integers(1, vocab_hi, n)
    t[n // 2:, 1:] = rng.integers(1, vocab_hi, (n - n // 2, k - 1))  # some multi-stream rows
    return t


def _hidden(model, params, batch):
    return np.asarray(model.apply({"params": params}, batch))


def test_packed_equals_separate(tiny_model, tiny_params, tiny_cfg):
    rng = np.random.default_rng(0)
    k, l = tiny_cfg.num_codebooks, 32
    a, b = _segment(rng, 11, k, 900), _segment(rng, 14, k, 900)
    tokens = np.zeros((1, l, k), np.int32)
    tokens[0, :11], tokens[0, 11:25] = a, b
    seg = np.zeros((1, l), np.int32)
    seg[0, :11], seg[0, 11:25] = 1, 2
    pos = np.zeros((1, l), np.int32)
    pos[0, :11], pos[0, 11:25] = np.arange(11), np.arange(14)
    packed = _hidden(tiny_model, tiny_params, {"tokens": tokens, "segment_ids": seg, "positions": pos})

    for seg_tokens, start in ((a, 0), (b, 11)):
        n = len(seg_tokens)
        alone = _hidden(tiny_model, tiny_params, {
            "tokens": seg_tokens[None], "segment_ids": np.ones((1, n), np.int32),
            "positions": np.arange(n, dtype=np.int32)[None]})
        np.testing.assert_allclose(packed[0, start:start + n], alone[0], atol=1e-5, rtol=1e-5)


def test_audio_slots_replace_embeddings(tiny_model, tiny_params, tiny_batch):
    b = dict(tiny_batch)
    slots = b["audio_slots"]
    row = int(np.argmax((slots >= 0).any(axis=1)))
    first = int(np.argmax(slots[row] >= 0))
    base = _hidden(tiny_model, tiny_params, b)
    # Token ids at slot positions are ignored: the adapter output replaces them.
    t2 = b["tokens"].copy()
    t2[slots >= 0, 0] = 7
    np.testing.assert_allclose(_hidden(tiny_model, tiny_params, dict(b, tokens=t2)), base, atol=1e-6)
    # Audio features matter from the first slot on, and never before it (causal).
    f2 = b["audio_features"] + 1.0
    changed = _hidden(tiny_model, tiny_params, dict(b, audio_features=f2))
    np.testing.assert_allclose(changed[row, :first], base[row, :first], atol=1e-6)
    assert np.abs(changed[row, first] - base[row, first]).max() > 1e-3


def test_frozen_encoder_gets_no_gradient(tiny_model, tiny_params, tiny_batch):
    def loss(p):
        h, head, emb = tiny_model.apply({"params": p}, tiny_batch, method=UALM.hidden_and_output)
        return loss_sums(h, head, emb, tiny_batch, tiny_model.vocab).total

    g = jax.grad(loss)(tiny_params)
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(g["audio_encoder"]))
    assert float(jnp.abs(g["adaptor"]["audio"]["kernel"]).max()) > 0


def test_chunked_loss_and_unscanned_layers_agree(tiny_params, tiny_batch):
    cfg = preset_config("tiny")
    m = build_model(cfg)
    h, head, emb = m.apply({"params": tiny_params}, tiny_batch, method=UALM.hidden_and_output)

    def total(chunk):
        return float(loss_sums(h, head, emb, tiny_batch, m.vocab, "reference", chunk).total)

    np.testing.assert_allclose(total(16), total(0), rtol=1e-6)
    # The same weights unstacked into per-layer modules give the same hidden states.
    cfg_loop = preset_config("tiny", scan_layers=False)
    loop_params = dict(tiny_params)
    stacked = tiny_params["decoder"]["layers"]
    loop_params["decoder"] = {"norm": tiny_params["decoder"]["norm"], **{
        f"layers_{i}": jax.tree.map(lambda x: x[i], stacked) for i in range(cfg.n_layers)}}
    h_loop = build_model(cfg_loop).apply({"params": loop_params}, tiny_batch)
    np.testing.assert_allclose(np.asarray(h_loop), np.asarray(h), atol=1e-5)
