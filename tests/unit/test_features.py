"""Whisper log-mel parity with transformers, audio loading (downmix, resample, clear errors),
30 s windows and the encoder frame count."""
import numpy as np
import pytest
import soundfile as sf

from data_pipelines.features import (encoder_frames, load_audio, log_mel, split_windows,
                                     window_log_mels)

SR = 16000
# Same maths in float64 here vs transformers' float32 numpy path: measured max |diff| ~3e-5 on the
# (log10 + 4) / 4 scale. 2e-4 there is 8e-4 in log10, i.e. < 0.01 dB: rounding, not a recipe change
# (a wrong window, filter norm, hop or clamp moves values by >= 1e-2).
TOL = 2e-4


def tone_mix(n, seed=0):
    t = np.arange(n) / SR
    noise = np.random.default_rng(seed).standard_normal(n)
    return (0.5 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 3000 * t)
            + 0.01 * noise).astype(np.float32)


@pytest.mark.parametrize("n_mels", [128, 80])
def test_log_mel_matches_whisper_feature_extractor(n_mels):
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=n_mels)
    x = tone_mix(21_920)  # 1.37 s: not a multiple of the hop
    # Unpadded: transformers' "longest" padding of one clip is no padding.
    ref = fe(x, sampling_rate=SR, return_tensors="np", padding="longest")["input_features"][0].T
    ours = log_mel(x, n_mels)
    assert ours.shape == ref.shape == (21_920 // 160, n_mels)
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)
    # Padded to the 30 s window, with the attention mask, as the encoder sees it.
    out = fe(x, sampling_rate=SR, return_tensors="np", return_attention_mask=True)
    mels, mask = window_log_mels(x, n_mels)
    assert mels.shape == (1, 3000, n_mels)
    np.testing.assert_allclose(mels[0], out["input_features"][0].T, atol=TOL, rtol=0)
    np.testing.assert_array_equal(mask[0], out["attention_mask"][0].astype(bool))


def test_windows_and_encoder_frames():
    x = np.arange(65 * SR, dtype=np.float32)
    wins = split_windows(x)
    assert [len(w) / SR for w in wins] == [30.0, 30.0, 5.0]
    np.testing.assert_array_equal(np.concatenate(wins), x)
    mels, mask = window_log_mels(tone_mix(65 * SR))
    assert mels.shape == (3, 3000, 128) and mask.sum(1).tolist() == [3000, 3000, 500]
    # 25 frames/s: 30 s -> 3000 mel -> 1500 (conv stride 2) -> 750 (pool 2), per window.
    assert encoder_frames(30 * SR) == 750 and encoder_frames(SR) == 25
    assert encoder_frames(65 * SR) == 750 + 750 + 125
    assert encoder_frames(30 * SR, pool=1) == 1500
    # A partial hop still counts one mel frame (Whisper's mask): 137 -> 69 -> 34.
    assert encoder_frames(21_900) == 34 and encoder_frames(44_100, sr=44_100) == 25


def test_stereo_44k_file_is_downmixed_and_resampled(tmp_path):
    sr, n = 44_100, 44_100
    t = np.arange(n) / sr
    left = 0.6 * np.sin(2 * np.pi * 440 * t)
    right = 0.2 * np.sin(2 * np.pi * 440 * t)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], 1), sr, subtype="FLOAT")
    wave = load_audio(str(path))
    assert wave.dtype == np.float32 and wave.ndim == 1 and abs(len(wave) - SR) <= 1
    spectrum = np.abs(np.fft.rfft(wave[:SR]))
    assert abs(np.argmax(spectrum) - 440) <= 1  # 1 Hz bins over one second
    assert np.max(np.abs(wave[1000:-1000])) == pytest.approx(0.4, abs=0.01)  # mean of channels


def test_unreadable_audio_raises_naming_the_file(tmp_path):
    bad = tmp_path / "corrupt_clip.wav"
    bad.write_bytes(b"RIFF\x00\x01garbage" + bytes(range(200)))
    with pytest.raises(ValueError, match="corrupt_clip.wav"):
        load_audio(str(bad))
    empty = tmp_path / "empty_clip.wav"
    sf.write(empty, np.zeros(0, np.float32), SR)
    with pytest.raises(ValueError, match="empty_clip.wav"):
        load_audio(str(empty))
    nan = tmp_path / "nan_clip.wav"
    sf.write(nan, np.array([0.1, np.nan, 0.2], np.float32), SR, subtype="FLOAT")
    with pytest.raises(ValueError, match="nan_clip.wav.*NaN"):
        load_audio(str(nan))
    with pytest.raises(ValueError, match="missing.wav"):
        load_audio(str(tmp_path / "missing.wav"))


@pytest.mark.parametrize("seconds", [0.3, 2.0, 29.99, 30.0, 31.5])
def test_window_log_mels_equal_whole_padded_windows(seconds):
    """Short clips compute only the frames near their audio: bit-identical to padding each window
    to 30 s first, as WhisperFeatureExtractor does."""
    from data_pipelines import features as F

    n = int(seconds * F.SAMPLE_RATE)
    t = np.arange(n) / F.SAMPLE_RATE
    wave = (0.4 * np.sin(2 * np.pi * 330 * t) * (t < seconds / 2)).astype(np.float32)
    mels, mask = F.window_log_mels(wave, 80)
    full = F.window_samples()
    for w, chunk in enumerate(F.split_windows(wave)):
        assert np.array_equal(mels[w], F.log_mel(np.pad(chunk, (0, full - len(chunk))), 80))
        assert mask[w].sum() == F.valid_mel_frames(len(chunk))
