"""The joint vocabulary: one id space shared by tokenizer, model, loss, decoding and export.

Layout: [0, num_special) special tokens | text ids shifted by num_special | K codebook intervals,
each C+1 ids long (the codebook's own pad id first, then its C codes) | padding up to a shardable
multiple. Never re-derive these offsets elsewhere: ask this object.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

# Special token ids (docs/ualm.md). 9..num_special-1 are unused.
PAD, BOS, EOS, EOT, SYSTEM, USER, ASSISTANT, TEXT, AUDIO, SPEECH = range(10)
SPECIAL_NAMES = {PAD: "<pad>", BOS: "<bos>", EOS: "<eos>", EOT: "<eot>", SYSTEM: "<system>",
                 USER: "<user>", ASSISTANT: "<assistant>", TEXT: "<text>", AUDIO: "<audio>",
                 SPEECH: "<speech>"}


@dataclass(frozen=True)
class JointVocab:
    text_vocab_size: int
    num_codebooks: int
    codebook_size: int
    num_special: int = 256
    pad_multiple: int = 128

    @classmethod
    def from_model_config(cls, cfg) -> "JointVocab":
        """The vocabulary a ModelConfig describes; `vocab_of(cfg)` (the same, cached)."""
        if cls is JointVocab:
            return vocab_of(cfg)
        return cls(*_model_fields(cfg))

    # Intervals --------------------------------------------------------------------------------
    @property
    def text_offset(self) -> int:
        return self.num_special

    @property
    def audio_offset(self) -> int:
        return self.num_special + self.text_vocab_size

    @property
    def codebook_stride(self) -> int:
        return self.codebook_size + 1

    @property
    def audio_size(self) -> int:
        return self.num_codebooks * self.codebook_stride

    @property
    def size(self) -> int:
        """Real ids; export writes exactly this many rows."""
        return self.audio_offset + self.audio_size

    @property
    def padded_size(self) -> int:
        """Rows in the model's tables: `size` rounded up so the vocab axis shards evenly."""
        m = self.pad_multiple
        return -(-self.size // m) * m

    def codebook_start(self, k: int) -> int:
        """Id of codebook k's pad token; its codes follow."""
        if not 0 <= k < self.num_codebooks:
            raise IndexError(f"codebook {k} out of range [0, {self.num_codebooks})")
        return self.audio_offset + k * self.codebook_stride

    def codebook_pad(self, k: int) -> int:
        return self.codebook_start(k)

    def codebook_pads(self) -> np.ndarray:
        return np.array([self.codebook_pad(k) for k in range(self.num_codebooks)], np.int32)

    def audio_loss_intervals(self, max_interval: int = 0) -> list:
        """[(start, end)] id ranges over which streams 1..K-1 take their softmax: whole codebooks
        grouped as the reference groups them (one interval is closed, including the codebook that
        crossed max_interval, as soon as it spans more than max_interval ids; so an interval can
        exceed the limit by one codebook: 8 x 2049 ids -> 7 + 1 codebooks). 0 = one interval."""
        if not self.num_codebooks:
            return []
        if max_interval <= 0:
            return [(self.audio_offset, self.size)]
        out, cur, end = [], self.codebook_start(0), self.codebook_start(0) + self.codebook_stride
        for k in range(1, self.num_codebooks):
            end = self.codebook_start(k) + self.codebook_stride
            if end - cur > max_interval:
                out.append((cur, end))
                cur = end
        if end > cur:
            out.append((cur, end))
        return out

    # Conversions ------------------------------------------------------------------------------
    def text_to_joint(self, text_ids):
        return np.asarray(text_ids, np.int64) + self.text_offset

    def joint_to_text(self, ids):
        ids = np.asarray(ids)
        if np.any((ids < self.text_offset) | (ids >= self.audio_offset)):
            raise ValueError("ids outside the text interval")
        return ids - self.text_offset

    def codes_to_joint(self, codes):
        """Codec codes [T, K] in [0, C) -> joint ids of codebook k in column k."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != self.num_codebooks:
            raise ValueError(f"codes must be [T, {self.num_codebooks}], got {codes.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size})")
        starts = self.codebook_pads()[None, :]
        return (codes + 1 + starts).astype(np.int32)

    def joint_to_codes(self, ids):
        """Inverse of codes_to_joint; a codebook pad id maps to -1."""
        ids = np.asarray(ids)
        return (ids - self.codebook_pads()[None, :] - 1).astype(np.int32)

    def is_text(self, ids):
        ids = np.asarray(ids)
        return (ids >= self.text_offset) & (ids < self.audio_offset)

    def is_audio(self, ids):
        ids = np.asarray(ids)
        return (ids >= self.audio_offset) & (ids < self.size)

    def describe(self) -> dict:
        return {
            "special": [0, self.num_special],
            "text": [self.text_offset, self.audio_offset],
            "codebooks": [[self.codebook_start(k), self.codebook_start(k) + self.codebook_stride]
                          for k in range(self.num_codebooks)],
            "size": self.size,
            "padded_size": self.padded_size,
        }


# Construction from a ModelConfig -----------------------------------------------------------------
def _model_fields(cfg) -> tuple:
    """The ModelConfig fields the vocabulary reads, in JointVocab's field order."""
    return (cfg.text_vocab_size, cfg.num_codebooks, cfg.codebook_size, cfg.num_special,
            cfg.vocab_pad_multiple)


@functools.lru_cache(maxsize=64)
def _cached_vocab(fields: tuple) -> JointVocab:
    return JointVocab(*fields)


def vocab_of(cfg) -> JointVocab:
    """The JointVocab of a ModelConfig, built once per distinct set of the fields it reads
    (ModelConfig is a mutable, unhashable dataclass: the key is those fields' current values,
    so a changed config gets its new vocabulary). JointVocab is frozen, so sharing is safe."""
    return _cached_vocab(_model_fields(cfg))
