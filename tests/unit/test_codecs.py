"""Codecs: a tiny random X-codec through the real local loader, and the offline spectral RVQ codec."""
import numpy as np
import pytest

from data_pipelines.codecs import SpectralCodec, XCodec, load_codec

SR = 16000


def tone(freq, seconds, sr=SR):
    t = np.arange(int(seconds * sr)) / sr
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_xcodec_local_load_encode_decode(tiny_xcodec_dir):
    codec = load_codec(tiny_xcodec_dir)
    assert isinstance(codec, XCodec)
    assert (codec.sample_rate, codec.frame_rate, codec.codebook_size) == (SR, 50.0, 1024)
    assert codec.num_codebooks == 4  # highest bandwidth: 2 kbps / 0.5 kbps per codebook
    wave = tone(440, 1.0) + 0.1 * np.random.default_rng(0).standard_normal(SR).astype(np.float32)
    codes = codec.encode(wave, SR)
    assert codes.shape == (50, 4) and codes.dtype == np.int32
    assert codes.min() >= 0 and codes.max() < 1024 and len(np.unique(codes)) > 4
    np.testing.assert_array_equal(codec.encode(wave, SR), codes)
    out = codec.decode(codes)
    assert out.dtype == np.float32 and out.shape == (SR,) and np.all(np.isfinite(out))
    # Other input rates are resampled; fewer codebooks at a lower bandwidth.
    assert codec.encode(tone(440, 1.0, 22_050), 22_050).shape == (50, 4)
    low = XCodec.from_pretrained(tiny_xcodec_dir, bandwidth=1.0)
    assert low.num_codebooks == 2
    np.testing.assert_array_equal(low.encode(wave, SR), codes[:, :2])  # residual VQ prefixes
    with pytest.raises(ValueError, match="bandwidth"):
        XCodec.from_pretrained(tiny_xcodec_dir, bandwidth=3.0)
    with pytest.raises(ValueError):
        codec.decode(np.full((5, 4), 1024))


@pytest.fixture(scope="module")
def spectral_codec():
    waves = [tone(f, 1.0) for f in (220, 440, 880, 1760)]
    return SpectralCodec.fit(waves, SR, K=3, C=16, seed=0)


def test_spectral_codec_roundtrip(spectral_codec):
    codec = spectral_codec
    assert (codec.num_codebooks, codec.codebook_size, codec.frame_rate) == (3, 16, 50.0)
    x = tone(440, 0.81)
    codes = codec.encode(x, SR)
    assert codes.shape == (41, 3) and codes.dtype == np.int32  # ceil(12960 / 320) frames
    assert codes.min() >= 0 and codes.max() < 16
    y = codec.decode(codes)
    assert y.shape == (41 * 320,) and y.dtype == np.float32

    def spectrum(w, n=512):
        """Time-averaged magnitude spectrum (31 Hz bins): robust to Griffin-Lim's phase, which
        smears a pure tone's single long-FFT peak over neighbouring bins."""
        frames = np.lib.stride_tricks.sliding_window_view(w, n)[::128] * np.hanning(n)
        return np.abs(np.fft.rfft(frames, axis=1)).mean(0)

    # The reconstruction keeps the input's spectrum for tones the codebooks were fitted on.
    for freq in (440, 1760):
        x = tone(freq, 0.81)
        a, b = spectrum(x), spectrum(codec.decode(codec.encode(x, SR)))
        assert np.corrcoef(a, b)[0, 1] > 0.95 and np.argmax(a) == np.argmax(b)
    assert not np.array_equal(codes, codec.encode(tone(1760, 0.81), SR))


def test_spectral_codec_is_deterministic_and_saves(spectral_codec, tmp_path):
    again = SpectralCodec.fit([tone(f, 1.0) for f in (220, 440, 880, 1760)], SR, K=3, C=16, seed=0)
    np.testing.assert_array_equal(again.codebooks, spectral_codec.codebooks)
    spectral_codec.save(str(tmp_path))
    loaded = load_codec(str(tmp_path))
    assert isinstance(loaded, SpectralCodec) and loaded.config() == spectral_codec.config()
    x = tone(660, 0.5) + tone(300, 0.5)
    np.testing.assert_array_equal(loaded.encode(x, SR), spectral_codec.encode(x, SR))
    np.testing.assert_array_equal(loaded.decode(loaded.encode(x, SR)),
                                  spectral_codec.decode(spectral_codec.encode(x, SR)))
    # 44.1 kHz stereo input is downmixed and resampled first.
    stereo = np.stack([tone(440, 0.5, 44_100)] * 2, 1)
    assert spectral_codec.encode(stereo, 44_100).shape == (25, 3)
