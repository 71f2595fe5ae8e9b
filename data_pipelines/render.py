"""Stored record -> one rendered example ready to pack, shared by every path that trains (Grain,
SeqIO, the synthetic stream) and by inference prompts.

A `Rendered` is the template's example (ualm_jax/format/template.py: tokens and loss weights
[L, K]) plus its encoder clips: (position in the example, encoder frames, mel window) per window
of its input audio, cut by the one windowing rule (`AudioLayout.windows`). A CFG-dropped example
keeps no clips (its conditioning, input audio included, is pad). The `Renderer` does this for a
record dict (records.from_record), its one CFG-dropout draw keyed by (seed, task, stream index) so
the same element renders the same way in any process or order.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ualm_jax.format.layout import AudioLayout
from ualm_jax.format.records import CODES, ENCODER, TEXT, from_record, is_reason_task
from ualm_jax.format.template import render
from ualm_jax.format.vocab import JointVocab


class Rendered:
    """One rendered example, ready to pack. clips: (position, n_frames, mel window [n, n_mels])."""
    __slots__ = ("task", "tokens", "loss_weights", "clips", "cfg_dropped", "index")

    def __init__(self, task: int, tokens, loss_weights, clips=(), cfg_dropped=False, index=-1):
        self.task, self.tokens, self.loss_weights = task, tokens, loss_weights
        self.clips, self.cfg_dropped, self.index = tuple(clips), cfg_dropped, index

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


_M64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """One 64-bit mix step: the counter-based hash behind every keyed draw of the pipelines."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class KeyedUniform:
    """A counter-based uniform in [0, 1) keyed by (seed, task, index): the one draw `render` makes
    for CFG dropout. Same key -> same draw in any process or order; ~2 us where building a numpy
    Generator per example costs ~22 us (a tenth of a short example's whole budget)."""
    __slots__ = ("value",)

    def __init__(self, seed: int, task: int, index: int):
        h = splitmix64(splitmix64(splitmix64(int(seed) & _M64) ^ int(task)) ^ (int(index) & _M64))
        self.value = (h >> 11) * (1.0 / (1 << 53))

    def random(self) -> float:
        return self.value


def encoder_clips(audio_input_frames: Sequence[tuple], mels: Sequence, layout: AudioLayout) -> list:
    """An example's encoder slots (template `audio_input_frames`: (position, n_frames) per input
    audio segment) and their mels -> its clips (position, n_frames, window), one per window."""
    clips = []
    for (start, n), mel in zip(audio_input_frames, mels):
        off = 0
        for window in layout.windows(mel):
            nf = layout.window_frames(len(window))
            clips.append((start + off, nf, window))
            off += nf
        assert off == n, (off, n)
    return clips


class Renderer:
    """Record dict -> Rendered, through records.from_record + template.render."""

    def __init__(self, vocab: JointVocab, layout: AudioLayout, task: int = 0, seed: int = 0,
                 cfg_dropout: float = 0.0, name: str = "", supervise_headers: str = "reasoning",
                 stream_weights=None, text_id0_as_pad: bool = False):
        """supervise_headers: data.supervise_headers (assistant | reasoning | none);
        stream_weights: model.stream_weights resolved (None = 1/K each);
        text_id0_as_pad: data.text_id0_as_pad (text id 0 -> pad, as the reference)."""
        if supervise_headers not in ("assistant", "reasoning", "none"):
            raise ValueError(f"supervise_headers={supervise_headers!r} is not one of assistant, "
                             "reasoning, none")
        self.supervise_headers = supervise_headers
        self.text_id0_as_pad = bool(text_id0_as_pad)
        self.stream_weights = None if stream_weights is None else tuple(stream_weights)
        self.vocab, self.layout, self.task, self.seed = vocab, layout, task, seed
        self.cfg_dropout, self.name = float(cfg_dropout), name or f"task {task}"
        self.k = max(vocab.num_codebooks, 1)

    def _check_audio(self, kinds) -> None:
        if not self.layout.enabled and (np.asarray(kinds) == ENCODER).any():
            raise ValueError(f"{self.name}: a record has encoder-input audio but the pipeline has "
                             f"no audio encoder layout (n_mels/mel_frames/frames_per_window/"
                             f"max_clips_per_row must all be > 0)")

    def length(self, rec: Mapping) -> int:
        """Rendered length without rendering: <bos> + per segment header(2) + body + closer."""
        kinds, lengths = np.asarray(rec["kinds"]), np.asarray(rec["lengths"], np.int64)
        self._check_audio(kinds)
        n = 1 + 3 * len(kinds) + int(lengths[kinds == TEXT].sum())
        n += int((lengths[kinds == CODES] + self.k - 1).sum())
        return n + sum(self.layout.frames_of(int(m)) for m in lengths[kinds == ENCODER])

    def clip_count(self, rec: Mapping) -> int:
        """Encoder windows (clip slots) the record's input audio takes."""
        kinds, lengths = np.asarray(rec["kinds"]), np.asarray(rec["lengths"])
        return sum(len(self.layout.window_lengths(int(m))) for m in lengths[kinds == ENCODER])

    def packed_length(self, rec: Mapping, seq_len: int) -> int:
        """Positions the record adds to packed rows: its length, or 0 when it can never fit (it
        will be skipped). Mean tokens for the mixture weights use this, so skipping does not bias
        the realised token shares."""
        n = self.length(rec)
        clips = self.clip_count(rec) if self.layout.enabled else 0
        return n if n <= seq_len and clips <= self.layout.max_clips else 0

    def __call__(self, index: int, rec: Mapping) -> Rendered:
        self._check_audio(rec["kinds"])
        frames_of = self.layout.frames_of if self.layout.enabled else None
        _, segments, mels = from_record(rec, frames_of)
        rng = KeyedUniform(self.seed, self.task, index) if self.cfg_dropout > 0 else None
        # Reasoning records switch modality inside the assistant turn: the model must learn to
        # choose the next segment's header, so those headers are supervised (UALM-Reason).
        reason = self.supervise_headers == "reasoning" and is_reason_task(str(rec.get("task", "")))
        ex = render(segments, self.vocab, cfg_dropout_rng=rng, cfg_dropout_prob=self.cfg_dropout,
                    supervise_continuation_headers=reason,
                    supervise_headers=self.supervise_headers == "assistant",
                    stream_weights=self.stream_weights, text_id0_as_pad=self.text_id0_as_pad)
        # A dropped example keeps only its target audio: no encoder input.
        clips = [] if ex.cfg_dropped else encoder_clips(ex.audio_input_frames, mels, self.layout)
        return Rendered(self.task, ex.tokens, ex.loss_weights, clips, ex.cfg_dropped, index)
