"""Model FLOPs (ualm_jax/model/flops.py) against independent counts: a brute-force count of the
causal pairs inside packed segments, and XLA's cost analysis of the compiled audio encoder."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ualm_jax.config import load_config
from ualm_jax.model.audio_encoder import AudioEncoder
from ualm_jax.model.flops import (attention_flops, batch_step_flops, causal_pairs,
                                  decoder_flops_per_token, encoder_window_flops, step_flops)


def test_causal_pairs_counts_only_pairs_inside_a_segment():
    rng = np.random.default_rng(0)
    seg = np.zeros((3, 50), np.int32)
    for r in range(3):
        cuts = np.sort(rng.choice(np.arange(1, 45), 4, replace=False))
        bounds = [0, *cuts, 45]
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            seg[r, a:b] = i + 1  # 5 segments, then padding
    brute = sum(int(((s[:, None] == s[None, :]) & (s[:, None] > 0)
                     & np.tri(50, dtype=bool)).sum()) for s in seg)
    assert causal_pairs(seg) == brute
    assert causal_pairs(np.ones((1, 10), np.int32)) == 55  # one segment = full causal length
    cfg = load_config(None, ["model.preset=tiny"]).model
    assert attention_flops(cfg, 55) == 3 * 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * 55


def test_packed_attention_and_encoder_change_the_step_count():
    cfg = load_config(None, ["model.preset=tiny"]).model
    full = step_flops(cfg, 2, 64, 2 * 64 * 65 // 2, windows=0)
    packed = step_flops(cfg, 2, 64, 4 * 32 * 33 // 2, windows=0)
    assert packed["attention"] < full["attention"] and packed["decoder"] == full["decoder"]
    assert full["decoder"] == decoder_flops_per_token(cfg) * 2 * 64
    frozen = step_flops(cfg, 2, 64, 100, windows=3)
    enc, ada = encoder_window_flops(cfg)
    assert frozen["encoder"] == 3 * enc and frozen["adapter"] == 3 * 3 * ada  # forward only
    trained = step_flops(dataclasses.replace(
        cfg, audio_encoder=dataclasses.replace(cfg.audio_encoder, frozen=False)), 2, 64, 100, 3)
    assert trained["encoder"] == 3 * frozen["encoder"]
    assert trained["total"] == sum(v for k, v in trained.items() if k != "total")
    batch = {"segment_ids": np.ones((2, 64), np.int32),
             "audio_mel_mask": np.zeros((2, 3, 8), bool)}
    batch["audio_mel_mask"][0, 1, :3] = True
    got = batch_step_flops(cfg, batch)
    assert got["encoder"] == enc and got["attention"] == full["attention"]


def test_encoder_flops_match_xla_cost_analysis():
    # Widths where the matmuls dominate, as they do at Whisper size (elementwise work is O(d)).
    cfg = load_config(None, ["model.preset=tiny", "model.audio_encoder.n_layers=1",
                             "model.audio_encoder.d_model=256", "model.audio_encoder.n_heads=4",
                             "model.audio_encoder.d_ff=1024"]).model
    enc = cfg.audio_encoder
    module = AudioEncoder(enc)
    mel = jnp.zeros((1, enc.max_mel_frames, enc.n_mels), jnp.float32)
    params = module.init(jax.random.key(0), mel)
    cost = jax.jit(lambda p, x: module.apply(p, x)).lower(params, mel).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    ours, _ = encoder_window_flops(cfg)
    # XLA also counts GELUs, norms, softmax and the pooling: a few percent above the matmuls.
    assert 0.9 < cost["flops"] / ours < 1.25, (cost["flops"], ours)
