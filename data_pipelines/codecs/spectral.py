"""An offline codec that needs no downloaded weights: residual VQ over log-magnitude STFT frames.

16 kHz, hop 320 -> 50 frames/s like X-codec, so sequence lengths and the delay pattern behave the
same in the demo. Stage k of the residual VQ is a k-means codebook (C centres) fitted with numpy on
what stages < k left over. Decoding sums the chosen centres back into a log-magnitude spectrogram
and recovers a phase with Griffin-Lim (librosa). Quality is poor but the codes carry the spectral
envelope, pitch and timing, which is what a small demo model needs to learn something audible.
Everything is deterministic given the seed.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from data_pipelines.codecs.base import Codec
from data_pipelines.features import resample, to_mono

KIND = "spectral_rvq"
CODEBOOKS_FILE = "codebooks.npz"
CONFIG_FILE = "config.json"
DEFAULTS = {"sample_rate": 16000, "hop": 320, "n_fft": 1280, "log_floor": 1e-3,
            "griffin_lim_iters": 32}


def spectral_frames(wave: np.ndarray, hop: int, n_fft: int, log_floor: float) -> np.ndarray:
    """[N] -> log-magnitude frames [ceil(N / hop), n_fft//2+1] float32 (centred STFT with the
    frame past the end dropped, so whole seconds give exactly frame_rate frames each, as X-codec)."""
    import librosa

    t = -(-len(wave) // hop)
    wave = np.pad(np.asarray(wave, np.float32), (0, t * hop - len(wave)))
    mag = np.abs(librosa.stft(wave, n_fft=n_fft, hop_length=hop, center=True))[:, :t]
    return np.log(mag.T + log_floor).astype(np.float32)


class NoReadableAudio(ValueError):
    """None of the files a codec was to be fitted on could be read."""


# k-means ------------------------------------------------------------------------------------------
def _sq_distances(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    return (np.sum(x * x, 1, keepdims=True) - 2.0 * x @ centers.T
            + np.sum(centers * centers, 1)[None, :])


def nearest(x: np.ndarray, centers: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Index of the nearest centre for each row, in chunks to bound memory."""
    out = np.empty(len(x), np.int64)
    for i in range(0, len(x), chunk):
        out[i:i + chunk] = np.argmin(_sq_distances(x[i:i + chunk], centers), axis=1)
    return out


def _kmeans_pp_init(x: np.ndarray, c: int, rng: np.random.Generator) -> np.ndarray:
    centers = [x[rng.integers(len(x))]]
    d2 = np.sum((x - centers[0]) ** 2, 1)
    for _ in range(1, c):
        total = d2.sum()
        # All points already covered (fewer distinct points than centres): any point will do.
        i = int(rng.integers(len(x))) if total <= 0 else int(rng.choice(len(x), p=d2 / total))
        centers.append(x[i])
        d2 = np.minimum(d2, np.sum((x - x[i]) ** 2, 1))
    return np.stack(centers)


def kmeans(x: np.ndarray, c: int, iters: int, rng: np.random.Generator) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding; empty clusters take the worst-fitted points."""
    centers = _kmeans_pp_init(x, c, rng)
    prev = None
    for _ in range(iters):
        idx = nearest(x, centers)
        if prev is not None and np.array_equal(idx, prev):
            break
        prev = idx
        counts = np.bincount(idx, minlength=c)
        sums = np.zeros_like(centers)
        np.add.at(sums, idx, x)
        filled = counts > 0
        centers[filled] = sums[filled] / counts[filled, None]
        if not filled.all():
            err = np.sum((x - centers[idx]) ** 2, 1)
            worst = np.argsort(-err, kind="stable")[: int((~filled).sum())]
            centers[~filled] = x[worst]
    return centers


# The codec ----------------------------------------------------------------------------------------
class SpectralCodec(Codec):
    def __init__(self, codebooks: np.ndarray, sample_rate: int = 16000, hop: int = 320,
                 n_fft: int = 1280, log_floor: float = 1e-3, griffin_lim_iters: int = 32,
                 seed: int = 0):
        """codebooks [K, C, D] float32 with D = n_fft // 2 + 1 (residual stages in order)."""
        codebooks = np.asarray(codebooks, np.float32)
        if codebooks.ndim != 3 or codebooks.shape[2] != n_fft // 2 + 1:
            raise ValueError(f"codebooks must be [K, C, {n_fft // 2 + 1}], got {codebooks.shape}")
        self.codebooks = codebooks
        self.num_codebooks, self.codebook_size = int(codebooks.shape[0]), int(codebooks.shape[1])
        self.sample_rate, self.hop, self.n_fft = int(sample_rate), int(hop), int(n_fft)
        self.frame_rate = self.sample_rate / self.hop
        self.log_floor = float(log_floor)
        self.griffin_lim_iters, self.seed = int(griffin_lim_iters), int(seed)

    # Features ---------------------------------------------------------------------------------
    def features(self, wave: np.ndarray, sr: int) -> np.ndarray:
        return spectral_frames(self.prepare(wave, sr), self.hop, self.n_fft, self.log_floor)

    # Fit / save / load ------------------------------------------------------------------------
    @classmethod
    def fit(cls, waves: Sequence[np.ndarray], sr: int, K: int, C: int, seed: int = 0,
            iters: int = 25, max_frames: int = 50_000, **config) -> "SpectralCodec":
        """Fit K residual k-means codebooks of C codes on the frames of `waves` (at `sr` Hz).

        max_frames: a seeded random subset of frames bounds the fitting time on large corpora.
        config: sample_rate, hop, n_fft, log_floor, griffin_lim_iters (constructor defaults).
        """
        s = {**DEFAULTS, **config}
        feats = np.concatenate([
            spectral_frames(resample(to_mono(w), sr, s["sample_rate"]), s["hop"], s["n_fft"],
                            s["log_floor"]) for w in waves])
        rng = np.random.default_rng(seed)
        if len(feats) > max_frames:
            feats = feats[np.sort(rng.choice(len(feats), max_frames, replace=False))]
        residual = feats.astype(np.float32)
        books = []
        for _ in range(K):
            centers = kmeans(residual, C, iters, rng)
            residual = residual - centers[nearest(residual, centers)]
            books.append(centers)
        return cls(np.stack(books), seed=seed, **config)

    @classmethod
    def fit_files(cls, paths: Sequence[str], K: int, C: int, seed: int = 0,
                  max_frames: int = 50_000, **config) -> tuple:
        """Fit on audio files (any libsndfile format, rate or channels) -> (codec, unreadable:
        [(path, reason naming the file)]). Files that cannot be read are left out; none readable
        is NoReadableAudio naming the first."""
        from data_pipelines.features import load_audio

        sr = int(config.get("sample_rate", DEFAULTS["sample_rate"]))
        waves, unreadable = [], []
        for path in paths:
            if not os.path.isfile(path):
                unreadable.append((path, f"audio file {path} not found"))
                continue
            try:
                waves.append(load_audio(path, sr))
            except ValueError as e:
                unreadable.append((path, str(e)))
        if not waves:
            first = f" (first: {unreadable[0][1]})" if unreadable else ""
            raise NoReadableAudio(f"none of {len(paths)} audio file(s) could be read{first}")
        return cls.fit(waves, sr, K, C, seed=seed, max_frames=max_frames, **config), unreadable

    def config(self) -> dict:
        return {"codec": KIND, "sample_rate": self.sample_rate, "hop": self.hop, "n_fft": self.n_fft,
                "log_floor": self.log_floor, "griffin_lim_iters": self.griffin_lim_iters,
                "seed": self.seed, "num_codebooks": self.num_codebooks,
                "codebook_size": self.codebook_size}

    def save(self, directory: str) -> str:
        os.makedirs(directory, exist_ok=True)
        np.savez(os.path.join(directory, CODEBOOKS_FILE), codebooks=self.codebooks)
        with open(os.path.join(directory, CONFIG_FILE), "w") as f:
            json.dump(self.config(), f, indent=2)
        return directory

    @classmethod
    def load(cls, directory: str) -> "SpectralCodec":
        with open(os.path.join(directory, CONFIG_FILE)) as f:
            cfg = json.load(f)
        if cfg.pop("codec", None) != KIND:
            raise ValueError(f"{directory} does not hold a {KIND} codec")
        cfg.pop("num_codebooks"), cfg.pop("codebook_size")
        with np.load(os.path.join(directory, CODEBOOKS_FILE)) as z:
            codebooks = z["codebooks"]
        return cls(codebooks, **cfg)

    # Codec ------------------------------------------------------------------------------------
    def encode(self, wave: np.ndarray, sr: int) -> np.ndarray:
        residual = self.features(wave, sr)
        codes = np.empty((len(residual), self.num_codebooks), np.int32)
        for k, book in enumerate(self.codebooks):
            codes[:, k] = nearest(residual, book)
            residual = residual - book[codes[:, k]]
        return codes

    def log_magnitude(self, codes: np.ndarray) -> np.ndarray:
        """codes [T, K] -> the quantised log-magnitude frames [T, D]."""
        codes = self.check_codes(codes)
        return sum(self.codebooks[k][codes[:, k]] for k in range(self.num_codebooks))

    def decode(self, codes: np.ndarray) -> np.ndarray:
        import librosa

        logmag = self.log_magnitude(codes)
        t = len(logmag)
        if t == 0:
            return np.zeros(0, np.float32)
        mag = np.maximum(np.exp(logmag) - self.log_floor, 0.0).T
        mag = np.concatenate([mag, mag[:, -1:]], axis=1)  # restore the dropped end frame
        wave = librosa.griffinlim(mag, n_iter=self.griffin_lim_iters, hop_length=self.hop,
                                  n_fft=self.n_fft, center=True, length=t * self.hop,
                                  random_state=self.seed)
        return wave.astype(np.float32)
