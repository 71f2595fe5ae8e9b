"""Model presets: the real Qwen2.5 shapes, and a tiny multi-stream one for tests and the demo.
Pure data (imports nothing): `ualm_jax.config.preset_dict` / `preset_config` expand them."""
from __future__ import annotations

_WHISPER_LARGE_V3 = dict(enabled=True, n_mels=128, d_model=1280, n_layers=32, n_heads=20,
                         d_ff=5120, max_mel_frames=3000, pool=2)

PRESETS: dict[str, dict] = {
    "tiny": dict(
        text_vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
        d_ff=128, rope_theta=10_000.0, num_codebooks=4, codebook_size=32,
        audio_encoder=dict(enabled=True, n_mels=16, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                           max_mel_frames=64, pool=2),
        dtype="float32", remat="none", loss_chunk_size=0,
    ),
    "0.5b": dict(
        text_vocab_size=151936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2, head_dim=64,
        d_ff=4864, audio_encoder=dict(_WHISPER_LARGE_V3),
    ),
    "1.5b": dict(
        text_vocab_size=151936, d_model=1536, n_layers=28, n_heads=12, n_kv_heads=2, head_dim=128,
        d_ff=8960, audio_encoder=dict(_WHISPER_LARGE_V3),
    ),
    "7b": dict(
        text_vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4, head_dim=128,
        d_ff=18944, audio_encoder=dict(_WHISPER_LARGE_V3),
    ),
}
