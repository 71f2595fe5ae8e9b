"""Our Flax AudioEncoder == transformers' WhisperEncoder, via safetensors and the converter."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file  # noqa: E402

from ualm_jax.config import AudioEncoderConfig  # noqa: E402
from ualm_jax.convert.hf_whisper import (  # noqa: E402
    read_config, whisper_encoder_params_from_hf, whisper_encoder_params_to_hf)
from ualm_jax.model.audio_encoder import AudioEncoder  # noqa: E402

N_MELS, D, LAYERS, HEADS, FF, POS = 16, 32, 2, 2, 64, 32
T_MEL = 2 * POS  # WhisperEncoder only accepts exactly 2 * max_source_positions frames


def _perturb(model, seed):
    """Random values in every tensor (LayerNorm scales/biases and positions included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """(HF WhisperModel, its state dict as read back from safetensors)."""
    config = transformers.WhisperConfig(
        vocab_size=64, num_mel_bins=N_MELS, d_model=D, encoder_layers=LAYERS,
        encoder_attention_heads=HEADS, encoder_ffn_dim=FF, max_source_positions=POS,
        decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64, max_target_positions=16,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3,
        suppress_tokens=None, begin_suppress_tokens=None)
    torch.manual_seed(0)
    model = transformers.WhisperModel(config).float().eval()
    _perturb(model, 0)
    path = tmp_path_factory.mktemp("whisper")
    model.save_pretrained(path)
    return model, load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def mel():
    return np.random.default_rng(0).standard_normal((2, T_MEL, N_MELS)).astype(np.float32)


def _cfg(model, pool):
    return AudioEncoderConfig(**read_config(model.config.to_dict()), pool=pool)


def _ours(sd, cfg, mel):
    params = whisper_encoder_params_from_hf(sd, cfg)
    return np.asarray(AudioEncoder(cfg, jnp.float32, jnp.float32).apply({"params": params},
                                                                         jnp.asarray(mel)))


def _theirs(model, mel):
    with torch.no_grad():
        out = model.encoder(input_features=torch.from_numpy(mel).transpose(1, 2))
    return out.last_hidden_state.numpy()


def test_read_config(hf):
    model, _ = hf
    assert read_config(model.config.to_dict()) == dict(
        n_mels=N_MELS, d_model=D, n_layers=LAYERS, n_heads=HEADS, d_ff=FF, max_mel_frames=T_MEL)


def test_matches_hf_encoder(hf, mel):
    model, sd = hf
    ours, theirs = _ours(sd, _cfg(model, 1), mel), _theirs(model, mel)
    assert ours.shape == theirs.shape == (2, POS, D)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


def test_round_trip_is_bit_exact(hf):
    model, sd = hf
    cfg = _cfg(model, 1)
    enc = {k: v for k, v in sd.items() if k.startswith("encoder.")}
    back = whisper_encoder_params_to_hf(whisper_encoder_params_from_hf(sd, cfg), cfg, "encoder.")
    assert back.keys() == enc.keys()
    for k, v in enc.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert np.array_equal(back[k], v), k


@pytest.mark.parametrize("prefix", ["model.encoder.", "", "model.audio_tower."])
def test_prefix_detection(hf, prefix):
    model, sd = hf
    cfg = _cfg(model, 1)
    ref = whisper_encoder_params_from_hf(sd, cfg)  # WhisperModel: `encoder.`, auto-detected
    renamed = {prefix + k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    if prefix:  # other tensors alongside must not confuse the detection
        renamed.update({k: v for k, v in sd.items() if k.startswith("decoder.")})
    for got in (whisper_encoder_params_from_hf(renamed, cfg),
                whisper_encoder_params_from_hf(renamed, cfg, prefix=prefix)):
        assert jax.tree.structure(got) == jax.tree.structure(ref)
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)))


def test_wrong_shape_names_the_tensor(hf):
    model, sd = hf
    bad = dict(sd)
    bad["encoder.layers.1.fc1.weight"] = np.zeros((FF + 1, D), np.float32)
    msg = r"encoder\.layers\.1\.fc1\.weight.*expected.*\(64, 32\).*found.*\(65, 32\)"
    with pytest.raises(ValueError, match=msg):
        whisper_encoder_params_from_hf(bad, _cfg(model, 1))


def test_config_mismatch_is_reported(hf):
    model, sd = hf
    with pytest.raises(ValueError, match=r"encoder\.conv1\.weight"):
        whisper_encoder_params_from_hf(sd, dataclasses.replace(_cfg(model, 1), n_mels=N_MELS * 2))
    with pytest.raises(ValueError, match=r"unexpected tensors.*encoder\.layers\.1\."):
        whisper_encoder_params_from_hf(sd, dataclasses.replace(_cfg(model, 1), n_layers=1))


def test_missing_tensor_names_it(hf):
    model, sd = hf
    bad = {k: v for k, v in sd.items() if k != "encoder.layers.0.self_attn.v_proj.bias"}
    msg = r"missing tensor encoder\.layers\.0\.self_attn\.v_proj\.bias"
    with pytest.raises(ValueError, match=msg):
        whisper_encoder_params_from_hf(bad, _cfg(model, 1))


def test_embed_positions_length(hf):
    model, sd = hf
    short = dataclasses.replace(_cfg(model, 1), max_mel_frames=T_MEL // 2)
    params = whisper_encoder_params_from_hf(sd, short)  # HF longer than ours: first rows
    np.testing.assert_array_equal(params["embed_positions"],
                                  sd["encoder.embed_positions.weight"][: POS // 2])
    long = dataclasses.replace(short, max_mel_frames=T_MEL * 2)
    msg = r"encoder\.embed_positions\.weight.*expected.*\(64, 32\).*found.*\(32, 32\)"
    with pytest.raises(ValueError, match=msg):
        whisper_encoder_params_from_hf(sd, long)


def test_pool2_matches_audio_flamingo3_encoder(mel):
    if not hasattr(transformers, "AudioFlamingo3Encoder"):
        pytest.skip("transformers has no AudioFlamingo3Encoder")
    config = transformers.AudioFlamingo3EncoderConfig(
        num_mel_bins=N_MELS, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FF, max_source_positions=POS)
    torch.manual_seed(0)
    model = transformers.AudioFlamingo3Encoder(config).float().eval()
    _perturb(model, 1)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}  # bare encoder: no prefix
    with torch.no_grad():
        theirs = model(torch.from_numpy(mel).transpose(1, 2),
                       input_features_mask=torch.ones(mel.shape[:2], dtype=torch.long))
    cfg = AudioEncoderConfig(**read_config(config.to_dict()), pool=2)
    np.testing.assert_allclose(_ours(sd, cfg, mel), theirs.last_hidden_state.numpy(), atol=1e-5,
                               rtol=0)
