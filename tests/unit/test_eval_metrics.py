"""Evaluation maths against closed forms, and the model-backed embedders on tiny random models."""

import numpy as np
import pytest

from data_pipelines.features import resample, split_windows, to_mono
from ualm_jax.eval.embedders import MelStatsEmbedder, peak_normalise
from ualm_jax.eval.metrics import (KL_DIRECTION, MetricResult, accuracy, clap_score, frechet_distance,
                                   frechet_distance_from_stats, kl_divergence, normalise_answer)


def _fd_reference(mu1, s1, mu2, s2):
    """Independent route: Tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), symmetric PSD."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    eig = np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0.0, None)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * np.sqrt(eig).sum())


def _random_cov(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ---------------------------------------------------------------- Frechet distance

def test_fd_diagonal_closed_form():
    # Diagonal covariances: FD = |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2 exactly.
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance_from_stats(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)


def test_fd_sampled_gaussians_match_closed_form():
    rng = np.random.default_rng(0)
    d, n = 4, 100_000
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
    x = rng.multivariate_normal(mu1, s1, size=n)
    y = rng.multivariate_normal(mu2, s2, size=n)
    expected = _fd_reference(mu1, s1, mu2, s2)
    assert frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=0.03, abs=0.02)


def test_fd_self_zero_and_symmetric():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 16)) @ rng.standard_normal((16, 16))
    y = rng.standard_normal((300, 16)) + 0.5
    assert abs(frechet_distance(x, x)) < 1e-6 * np.trace(np.cov(x, rowvar=False))
    assert frechet_distance(x, y) == pytest.approx(frechet_distance(y, x), rel=1e-6)
    assert frechet_distance(x, y) > 1.0


def test_fd_singular_covariance():
    rng = np.random.default_rng(2)
    # Fewer items than dimensions, plus a dead unit: both covariances are rank-deficient.
    x, y = rng.standard_normal((10, 32)), rng.standard_normal((12, 32)) + 0.3
    x[:, 5] = y[:, 5] = 1.0
    fd = frechet_distance(x, y)
    mu1, s1 = x.mean(0), np.cov(x, rowvar=False)
    mu2, s2 = y.mean(0), np.cov(y, rowvar=False)
    assert np.isfinite(fd)
    assert fd == pytest.approx(_fd_reference(mu1, s1, mu2, s2), rel=1e-3)


def test_fd_rejects_broken_statistics():
    # A "covariance" with a negative eigenvalue makes sqrtm genuinely complex: must raise.
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance_from_stats(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


# ---------------------------------------------------------------- KL

def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_kl_softmax_matches_numpy_and_direction():
    rng = np.random.default_rng(3)
    ref, gen = 2.0 * rng.standard_normal((6, 10)), 2.0 * rng.standard_normal((6, 10))
    p, q = _softmax(ref), _softmax(gen)
    gen_ref = np.mean(np.sum(q * (np.log(q) - np.log(p + 1e-6)), axis=1))
    ref_gen = np.mean(np.sum(p * (np.log(p) - np.log(q + 1e-6)), axis=1))
    out = kl_divergence(ref, gen)
    assert KL_DIRECTION == "KL(generated || reference)"
    assert out["kl"] == out["kl_gen_ref"] == pytest.approx(gen_ref, rel=1e-10)
    assert out["kl_ref_gen"] == pytest.approx(ref_gen, rel=1e-10)
    assert abs(out["kl_gen_ref"] - out["kl_ref_gen"]) > 1e-3  # KL is not symmetric
    swapped = kl_divergence(gen, ref)
    assert swapped["kl"] == pytest.approx(out["kl_ref_gen"]) and swapped["kl"] != pytest.approx(out["kl"])
    # Probabilities in, same numbers out; identical inputs give ~0 (only the eps on q remains).
    assert kl_divergence(p, q, inputs="probs")["kl"] == pytest.approx(gen_ref, rel=1e-10)
    assert abs(kl_divergence(ref, ref)["kl"]) < 1e-4


def test_kl_sigmoid_is_bernoulli_sum():
    rng = np.random.default_rng(4)
    ref, gen = rng.standard_normal((5, 7)), rng.standard_normal((5, 7))
    p, q = 1 / (1 + np.exp(-ref)), 1 / (1 + np.exp(-gen))
    bern = lambda a, b: np.sum(a * np.log(a / (b + 1e-6)) + (1 - a) * np.log((1 - a) / (1 - b + 1e-6)), 1)  # noqa
    out = kl_divergence(ref, gen, kind="sigmoid")
    assert out["kl"] == pytest.approx(np.mean(bern(q, p)), rel=1e-6)
    assert out["kl_ref_gen"] == pytest.approx(np.mean(bern(p, q)), rel=1e-6)
    with pytest.raises(ValueError):
        kl_divergence(ref, gen, kind="tanh")


# ---------------------------------------------------------------- CLAP score, accuracy

def test_clap_score_is_mean_paired_cosine():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    t = np.array([[2.0, 0.0], [-1.0, 1.0], [1.0, 1.0]])
    expected = np.mean([1.0, 0.0, 1 / np.sqrt(2)])
    assert clap_score(a, t) == pytest.approx(expected)
    with pytest.raises(ValueError):
        clap_score(a, t[:2])


def test_accuracy_normalisation():
    assert normalise_answer("  The Dog, barking!  ") == "the dog, barking"
    assert normalise_answer(" The Noise  burst.") == "the noise burst"  # the demo world's rule
    assert normalise_answer("3 ,5, 9.") == "3, 5, 9"
    assert normalise_answer("3 + 4 = 7") != normalise_answer("3 - 4 = 7")  # arithmetic signs kept
    preds = ["The dog.", "a Cat", "bird", "an owl"]
    refs = ["the dog", "A cat!", ["parrot", "Bird"], "hawk"]
    assert accuracy(preds, refs) == pytest.approx(0.75)
    assert accuracy(preds, refs, normalise=False) == 0.0
    with pytest.raises(ValueError):
        accuracy(["a"], [])


# ---------------------------------------------------------------- waveform helpers

def _tones(freqs, sr, seconds=0.5, amp=0.5):
    t = np.arange(int(sr * seconds)) / sr
    return [(amp * np.sin(2 * np.pi * f * t)).astype(np.float32) for f in freqs]


def test_wave_helpers():
    (tone,) = _tones([440.0], 16000)
    up = resample(tone, 16000, 48000)
    assert up.shape == (3 * len(tone),)
    assert np.max(np.abs(peak_normalise(tone, -1.0))) == pytest.approx(10 ** (-1 / 20), rel=1e-6)
    assert len(split_windows(np.zeros(12 * 100), 100, 10, 5)) == 2  # 0-10 s, 5-12 s padded
    assert [len(w) for w in split_windows(np.zeros(300), 100, 10, 5)] == [1000]
    stereo = np.stack([tone, 0 * tone], axis=1)  # [N, channels], soundfile's layout
    np.testing.assert_allclose(to_mono(stereo), tone / 2)
    emb = MelStatsEmbedder()
    np.testing.assert_allclose(emb.embed_audio([stereo], 16000), emb.embed_audio([tone / 2], 16000))
    emb = MelStatsEmbedder().embed_audio(_tones([220.0, 880.0], 22050), 22050)
    assert emb.shape == (2, 128) and np.isfinite(emb).all()


# ---------------------------------------------------------------- tiny random models

# Skip only the model-backed tests (not the whole module) when torch/transformers are absent.
from tiny_models import CAPTIONS, clap_dir, needs_torch  # noqa: E402,F401 (shared fixtures)


@pytest.fixture(scope="module")
def ast_dir(tmp_path_factory):
    """A tiny AST audio classifier: serves both HFAudioEmbedder (AutoModel) and HFAudioTagger."""
    import torch
    from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification

    path = tmp_path_factory.mktemp("tiny_ast")
    config = ASTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       num_mel_bins=16, max_length=100, frequency_stride=10, time_stride=10,
                       num_labels=5, problem_type="multi_label_classification")
    torch.manual_seed(1)
    ASTForAudioClassification(config).save_pretrained(path)
    ASTFeatureExtractor(num_mel_bins=16, max_length=100).save_pretrained(path)
    return path


@needs_torch
def test_clap_embedder_tiny_model(clap_dir):
    from ualm_jax.eval.embedders import ClapEmbedder

    clap = ClapEmbedder.from_pretrained(clap_dir)
    assert clap.sample_rate == 48000 and clap.has_text
    assert str(clap_dir) in clap.name
    waves = _tones([220.0, 440.0, 1760.0], 16000)  # 16 kHz in: resampled to the processor's 48 kHz
    audio, text = clap.embed_audio(waves, 16000), clap.embed_text(CAPTIONS)
    assert audio.shape == (3, 8) and text.shape == (3, 8)
    assert np.isfinite(audio).all() and np.isfinite(text).all()
    np.testing.assert_allclose(np.linalg.norm(audio, axis=1), 1.0, rtol=1e-5)  # CLAP normalises
    np.testing.assert_array_equal(audio, clap.embed_audio(waves, 16000))
    np.testing.assert_array_equal(text, clap.embed_text(CAPTIONS))
    assert not np.allclose(audio[0], audio[2])  # different tones, different embeddings
    # Longer than the 1 s window: cropped deterministically instead of a random crop.
    long = _tones([330.0], 48000, seconds=1.6)
    np.testing.assert_array_equal(clap.embed_audio(long, 48000), clap.embed_audio(long, 48000))
    assert -1.0 <= clap_score(audio, text) <= 1.0


@needs_torch
def test_hf_audio_embedder_and_tagger_tiny_ast(ast_dir):
    from ualm_jax.eval.embedders import HFAudioEmbedder, HFAudioTagger

    emb = HFAudioEmbedder.from_pretrained(ast_dir)
    assert str(ast_dir) in emb.name and not emb.has_text
    waves = _tones([300.0, 600.0, 1200.0], 16000, seconds=0.8)
    x = emb.embed_audio(waves, 16000)
    assert x.shape == (3, 16) and np.isfinite(x).all()
    np.testing.assert_array_equal(x, emb.embed_audio(waves, 16000))
    frames = emb.embed_frames(waves[:1], 16000)[0]
    np.testing.assert_allclose(frames.mean(0), x[0], rtol=1e-5, atol=1e-6)

    tagger = HFAudioTagger.from_pretrained(ast_dir, window_s=1.0, hop_s=0.5)
    logits = tagger.logits(waves + _tones([500.0], 16000, seconds=2.2), 16000)  # last one: 4 windows
    assert logits.shape == (4, 5) and np.isfinite(logits).all()


@needs_torch
def test_hf_audio_embedder_whisper_trims_padding(tmp_path):
    """Encoder-decoder models embed with their encoder; Whisper's fixed-window padding is cut."""
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    from ualm_jax.eval.embedders import HFAudioEmbedder

    config = WhisperConfig(vocab_size=64, num_mel_bins=16, d_model=16, encoder_layers=1, encoder_attention_heads=2,
                           encoder_ffn_dim=32, max_source_positions=100, decoder_layers=1,
                           decoder_attention_heads=2, decoder_ffn_dim=32, max_target_positions=16,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3)
    torch.manual_seed(2)
    WhisperModel(config).save_pretrained(tmp_path)
    WhisperFeatureExtractor(feature_size=16, chunk_length=2).save_pretrained(tmp_path)  # 2 s = 100 frames
    emb = HFAudioEmbedder.from_pretrained(tmp_path)
    assert "WhisperEncoder" in emb.name
    frames = emb.embed_frames(_tones([440.0], 16000, seconds=0.5), 16000)[0]
    assert frames.shape == (25, 16)  # 0.5 s of a 2 s window -> a quarter of 100 frames


@needs_torch
def test_evaluate_generation_end_to_end(clap_dir, ast_dir):
    from ualm_jax.eval.embedders import ClapEmbedder, HFAudioEmbedder, HFAudioTagger
    from ualm_jax.eval.generation_eval import evaluate_generation

    gen = _tones([220.0, 440.0, 880.0], 16000)
    ref = [w + 0.05 * np.random.default_rng(i).standard_normal(len(w)).astype(np.float32)
           for i, w in enumerate(_tones([250.0, 400.0, 900.0], 24000, seconds=0.6))]
    out = evaluate_generation(gen, 16000, ref, 24000, CAPTIONS, embedder=MelStatsEmbedder(),
                              clap=ClapEmbedder.from_pretrained(clap_dir),
                              tagger=HFAudioTagger.from_pretrained(ast_dir, window_s=1.0, hop_s=0.5))
    assert set(out) == {"fd", "clap", "kl"}
    assert all(isinstance(r, MetricResult) and r.n == 3 and np.isfinite(r.value) for r in out.values())
    assert out["fd"].model.startswith("mel-stats") and out["fd"].value > 0
    assert str(clap_dir) in out["clap"].model and str(ast_dir) in out["kl"].model
    assert out["kl"].details["direction"] == KL_DIRECTION and out["kl"].value >= 0
    # Frame-level FD (OpenL3 style) through an embedder that exposes frames; no tagger -> no KL.
    frames = evaluate_generation(gen, 16000, ref, 24000, embedder=HFAudioEmbedder.from_pretrained(ast_dir),
                                 fd_frames=True)
    assert set(frames) == {"fd"} and frames["fd"].details["rows_gen"] > 3
    assert out["fd"].to_dict()["model"] == out["fd"].model


def test_interval95_against_closed_forms():
    from ualm_jax.eval.metrics import interval95

    # Wilson: 8 of 10 -> [0.490, 0.943] (textbook value); 0 of 32 stays inside [0, 1].
    lo, hi = interval95([1] * 8 + [0] * 2, binary=True)
    assert (round(lo, 3), round(hi, 3)) == (0.490, 0.943)
    lo, hi = interval95([0] * 32, binary=True)
    assert lo == 0.0 and 0.10 < hi < 0.11
    # Continuous: mean +- 1.96 standard errors.
    x = np.array([0.2, 0.4, 0.6, 0.8])
    half = 1.959963984540054 * x.std(ddof=1) / 2
    np.testing.assert_allclose(interval95(x, binary=False), [0.5 - half, 0.5 + half])
    assert np.isnan(interval95([], binary=True)).all()
