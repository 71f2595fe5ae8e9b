"""The codec interface: waveform <-> discrete codes [T, K] (T frames, K residual codebooks)."""
from __future__ import annotations

import abc

import numpy as np


class Codec(abc.ABC):
    """A neural or offline audio codec. Codes are int32 [T, K] with values in [0, codebook_size);
    `JointVocab.codes_to_joint` maps them into the joint vocabulary."""

    sample_rate: int  # Hz of the waveform decode() returns and encode() works at
    num_codebooks: int  # K
    codebook_size: int  # C
    frame_rate: float  # code frames per second

    @abc.abstractmethod
    def encode(self, wave: np.ndarray, sr: int) -> np.ndarray:
        """Mono (or [N, channels]) waveform at `sr` Hz -> codes [T, K] int32."""

    @abc.abstractmethod
    def decode(self, codes: np.ndarray) -> np.ndarray:
        """codes [T, K] -> mono float32 waveform at `sample_rate`."""

    # Shared helpers ---------------------------------------------------------------------------
    def prepare(self, wave: np.ndarray, sr: int) -> np.ndarray:
        """Downmix and resample to this codec's rate; float32 [N]."""
        from data_pipelines.features import resample, to_mono

        wave = to_mono(wave)
        if wave.ndim != 1 or wave.size == 0:
            raise ValueError(f"expected a non-empty mono or [N, channels] waveform, got {wave.shape}")
        return resample(wave, int(sr), self.sample_rate)

    def check_codes(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != self.num_codebooks:
            raise ValueError(f"codes must be [T, {self.num_codebooks}], got {codes.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size})")
        return codes.astype(np.int64)

    def frames_for(self, seconds: float) -> int:
        """Approximate code frames for a clip of `seconds` (token budgeting)."""
        return int(round(seconds * self.frame_rate))
