"""Audio loading and Whisper-style features for the (AF-)Whisper encoder.

Whisper's recipe (as transformers' WhisperFeatureExtractor): 16 kHz, periodic Hann n_fft 400, hop 160
(10 ms frames), reflect-centred STFT, power spectrum, Slaney mel filters 0-8 kHz, last frame dropped,
log10 clamped at 1e-10 and at (max - 8), then (x + 4) / 4. The encoder sees 30 s windows (3000 frames);
longer audio is cut into non-overlapping windows, each encoded alone and the frames concatenated.
"""
from __future__ import annotations

import functools

import numpy as np

from ualm_jax.format.layout import encoder_positions

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160  # 10 ms
WINDOW_SECONDS = 30.0


# Loading --------------------------------------------------------------------------------------------
# The one copy of each waveform helper (ualm_jax.eval.embedders and the codecs import these).
# Convention: float32, samples first -- [N] mono or [N, channels] (soundfile's layout).
def resample(wave: np.ndarray, orig_sr: int, sr: int) -> np.ndarray:
    """Band-limited resampling, float32 out (soxr HQ: what librosa.resample's default calls, and
    the resampler stable-audio-metrics uses, without librosa's import)."""
    if int(orig_sr) == int(sr):
        return np.asarray(wave, np.float32)
    import soxr

    return soxr.resample(np.asarray(wave, np.float32), int(orig_sr), int(sr), quality="HQ").astype(np.float32)


def to_mono(wave: np.ndarray) -> np.ndarray:
    """[N] (passes through) or [N, channels] (soundfile's layout) -> float32 [N], channels averaged.
    Audio in librosa's [channels, N] layout must be transposed first."""
    wave = np.asarray(wave, np.float32)
    if wave.ndim == 2:
        wave = wave.mean(axis=1)
    if wave.ndim != 1:
        raise ValueError(f"expected [N] or [N, channels] audio, got shape {wave.shape}")
    return wave


def load_audio(path: str, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Read any libsndfile format, downmix to mono, resample to `sr`; float32 [N].

    Raises ValueError naming the file when it cannot be read, is empty, or holds NaN/inf samples.
    """
    import soundfile as sf

    try:
        wave, file_sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile's errors vary by format: report them all the same way
        raise ValueError(f"cannot read audio file {path}: {e}") from e
    if wave.size == 0:
        raise ValueError(f"audio file {path} holds no samples")
    if not np.all(np.isfinite(wave)):
        raise ValueError(f"audio file {path} holds NaN or infinite samples")
    return resample(to_mono(wave), int(file_sr), sr)


# Log-mel --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def mel_filters(n_mels: int = 128, sr: int = SAMPLE_RATE, n_fft: int = N_FFT) -> np.ndarray:
    """[n_mels, n_fft//2+1] Slaney-scale, Slaney-normalised filters (Whisper's, via librosa)."""
    import librosa

    return librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=0.0, fmax=sr / 2,
                               htk=False, norm="slaney").astype(np.float64)


def _power_spectrogram(wave: np.ndarray) -> np.ndarray:
    """[1 + N//HOP, N_FFT//2+1] power of a reflect-centred STFT with a periodic Hann window."""
    x = np.pad(np.asarray(wave, np.float64), N_FFT // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(x, N_FFT)[::HOP]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)
    return np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2


def log_mel(wave: np.ndarray, n_mels: int = 128) -> np.ndarray:
    """16 kHz mono wave [N] -> Whisper log-mel [N // 160, n_mels] float32 (10 ms frames)."""
    wave = np.asarray(wave, np.float32).reshape(-1)
    n_frames = len(wave) // HOP
    if n_frames == 0:
        return np.zeros((0, n_mels), np.float32)
    power = _power_spectrogram(wave)[:n_frames]  # Whisper drops the last (centred) frame
    mel = power @ mel_filters(n_mels).T
    logs = np.log10(np.maximum(mel, 1e-10))
    logs = np.maximum(logs, logs.max() - 8.0)
    return ((logs + 4.0) / 4.0).astype(np.float32)


# 30 s windows ---------------------------------------------------------------------------------------
def window_samples(sr: int = SAMPLE_RATE, window_s: float = WINDOW_SECONDS) -> int:
    return int(round(sr * window_s))


def split_windows(wave: np.ndarray, sr: int = SAMPLE_RATE, window_s: float = WINDOW_SECONDS,
                  hop_s: float | None = None, min_fraction: float = 0.15) -> list:
    """Cut a mono wave [N] into windows of `window_s` seconds starting every `hop_s` seconds.

    hop_s=None (the encoder's 30 s windows): non-overlapping windows covering the clip, the last
    one may be shorter and is not padded; an empty clip gives no window.
    hop_s given (taggers trained on fixed-length clips, e.g. PaSST: 10 s, hop 5 s): every window
    is window_s long. A last window shorter than window_s is zero-padded when it holds more than
    min_fraction of a window and dropped otherwise (mostly padding reads as silence), as
    stable-audio-metrics and AudioCraft do; a clip shorter than one window still gives one padded
    window.
    """
    wave = np.asarray(wave, np.float32).reshape(-1)
    win = window_samples(sr, window_s)
    if hop_s is None:
        return [wave[i:i + win] for i in range(0, len(wave), win)]
    hop = window_samples(sr, hop_s)
    out = []
    for start in range(0, max(hop, len(wave) - hop), hop):  # stable-audio-metrics' bounds
        chunk = wave[start:start + win]
        if len(chunk) < win:
            if len(chunk) <= min_fraction * win and out:
                continue
            chunk = np.pad(chunk, (0, win - len(chunk)))
        out.append(chunk)
    return out


SHORT_PAD = 2 * N_FFT + HOP  # zeros after a short clip: its last frame's window is all padding


def window_log_mels(wave: np.ndarray, n_mels: int = 128, window_s: float = WINDOW_SECONDS):
    """16 kHz wave -> (mels [W, F, n_mels] float32, mask [W, F] bool), F = window frames (3000).

    Each window is zero-padded to full length BEFORE the log-mel, exactly as WhisperFeatureExtractor
    pads to 30 s; mask marks the frames centred on real audio (the encoder's padding mask).
    """
    full = window_samples(SAMPLE_RATE, window_s)
    n_frames = full // HOP
    windows = split_windows(wave, SAMPLE_RATE, window_s)
    mels = np.zeros((len(windows), n_frames, n_mels), np.float32)
    mask = np.zeros((len(windows), n_frames), bool)
    for w, chunk in enumerate(windows):
        # Only the frames near real audio are computed: padding with >= SHORT_PAD zeros gives the
        # same valid frames and the same max (zero frames sit at the log floor either way), and
        # every later frame of the full window equals the last, all-zero one. A 2 s clip costs
        # 1/15 of a whole 30 s window.
        pad = min(full - len(chunk), SHORT_PAD)
        short = log_mel(np.pad(chunk, (0, pad)), n_mels)
        mels[w, :len(short)] = short
        mels[w, len(short):] = short[-1]
        mask[w, :valid_mel_frames(len(chunk))] = True
    return mels, mask


def valid_mel_frames(n_samples: int) -> int:
    """Frames of a padded window that the encoder mask marks valid: those centred on real audio,
    ceil(N / 160), as WhisperFeatureExtractor's attention mask (Audio Flamingo 3 counts these)."""
    return -(-int(n_samples) // HOP)


def encoder_frames(n_samples: int, pool: int = 2, sr: int = SAMPLE_RATE,
                   window_s: float = WINDOW_SECONDS) -> int:
    """Encoder output frames for `n_samples` of `sr` audio: per 30 s window, valid mel frames
    through the stride-2 conv (ceil(F/2), as kernel 3 / padding 1 gives) then average pooling
    (floor); summed over windows. 30 s -> 3000 -> 1500 -> 750 with pool 2 (25 frames/s).
    Matches Audio Flamingo 3's audio-token count."""
    n = int(round(n_samples * SAMPLE_RATE / sr)) if sr != SAMPLE_RATE else int(n_samples)
    full = window_samples(SAMPLE_RATE, window_s)
    total = 0
    for start in range(0, n, full):
        mel = valid_mel_frames(min(full, n - start))
        total += encoder_positions(mel, pool)
    return total
