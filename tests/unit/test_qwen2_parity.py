"""Decoder numerics against transformers' Qwen2 (PyTorch) on the same random weights."""
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file  # noqa: E402

from ualm_jax.convert.hf_qwen2 import decoder_from_hf, decoder_to_hf  # noqa: E402
from ualm_jax.config import preset_config  # noqa: E402
from ualm_jax.model.qwen2 import Decoder  # noqa: E402


def _tiny_hf(tmp_path, tied):
    torch.manual_seed(0)
    hf_cfg = transformers.Qwen2Config(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6,
        max_position_embeddings=128, tie_word_embeddings=tied, attn_implementation="eager")
    model = transformers.Qwen2ForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # random biases and norms too, so every mapping is exercised
        for p in model.parameters():
            p.normal_(0.0, 0.05 if p.ndim > 1 else 0.5)
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("tied", [False, True])
def test_decoder_matches_transformers(tmp_path, tied):
    hf = _tiny_hf(tmp_path, tied)
    sd = load_file(str(tmp_path / "model.safetensors"))
    cfg = preset_config("tiny", rope_theta=10000.0, dtype="float32")
    decoder_params = decoder_from_hf(lambda n: sd[n], cfg)

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 300, (2, 24))
    with torch.no_grad():
        out = hf(torch.tensor(ids), output_hidden_states=True)
    expected_h = out.hidden_states[-1].numpy()
    expected_logits = out.logits.numpy()

    emb = sd["model.embed_tokens.weight"]
    x = jnp.asarray(emb[ids])
    seg = jnp.ones(ids.shape, jnp.int32)
    pos = jnp.tile(jnp.arange(ids.shape[1], dtype=jnp.int32), (2, 1))
    h = Decoder(cfg).apply({"params": decoder_params}, x, seg, pos)
    np.testing.assert_allclose(np.asarray(h), expected_h, atol=1e-4, rtol=0)
    head = emb if tied else sd["lm_head.weight"]
    logits = np.asarray(h) @ head.T
    assert np.abs(logits - expected_logits).max() < 1e-4

    # The mapping is exact both ways.
    back = decoder_to_hf(decoder_params, cfg)
    for name, value in back.items():
        assert np.array_equal(value, sd[name]), name


def test_shape_mismatch_names_the_tensor(tmp_path):
    _tiny_hf(tmp_path, False)
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd["model.layers.1.mlp.up_proj.weight"] = sd["model.layers.1.mlp.up_proj.weight"][:100]
    cfg = preset_config("tiny", rope_theta=10000.0)
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight has shape \(100, 64\), expected \(128, 64\)"):
        decoder_from_hf(lambda n: sd[n], cfg)
