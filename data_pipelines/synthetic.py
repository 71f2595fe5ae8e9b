"""A deterministic built-in stream of packed multi-task batches in the real batch format.

Three tasks, each learnable (the answer is a fixed function of the prompt):
  text:    <user><text> a b c <eos> <assistant><text> f(a) f(b) f(c) <eos>
  caption: <user><text> prompt <eot> <user><audio> [encoder frames] <eos>
           <assistant><text> words <eos>
  t2a:     <user><text> words <eos> <assistant><audio> delayed codes [T+K-1, K] <eos>
Each example is template Segments, rendered by the training template (format/template.render) and
packed row by row by the shared packer (packing.BatchBuilder): a row takes examples until the next
one does not fit. Batch i depends only on (seed, i): the iterator state is one integer, so resume
is exact.
"""
from __future__ import annotations

import numpy as np

from data_pipelines.packing import BatchBuilder
from data_pipelines.render import Rendered, encoder_clips
from ualm_jax.config import SYNTHETIC_TASKS
from ualm_jax.format.layout import AudioLayout
from ualm_jax.format.template import Segment, render
from ualm_jax.format.vocab import JointVocab, vocab_of

TASKS = SYNTHETIC_TASKS


class SyntheticStream:
    per_host = False  # global batches: the trainer slices this process's rows

    def __init__(self, vocab: JointVocab, batch: int, seq: int, seed: int = 0,
                 layout: AudioLayout = AudioLayout(), clip_mel: int = 0,
                 tasks=TASKS, weights=None, text_only: bool = False,
                 supervise_headers: bool = False, stream_weights=None,
                 text_id0_as_pad: bool = False):
        """layout: the audio encoder's clip slots (ualm_jax/format/layout.py; disabled = no
        captioning rows); clip_mel: valid mel frames of each synthetic clip (<= layout.mel_frames);
        supervise_headers: weight 1 on the assistant `<assistant><modality>` header (the
        reference's template); stream_weights: K weights of assistant audio (None = 1/K);
        text_id0_as_pad: text id 0 becomes pad 0 with no loss (the reference's preprocessing)."""
        self.vocab, self.batch, self.seq, self.seed = vocab, batch, seq, seed
        self.k = max(vocab.num_codebooks, 1)
        self.template = {"supervise_headers": bool(supervise_headers),
                         "stream_weights": stream_weights,
                         "text_id0_as_pad": bool(text_id0_as_pad)}
        self.layout, self.clip_mel = layout, int(clip_mel)
        self.frames_per_clip = layout.window_frames(clip_mel) if layout.enabled and clip_mel else 0
        self.text_only = text_only or vocab.num_codebooks == 0
        given = dict(zip(tasks, np.ones(len(tasks)) if weights is None else weights))
        keep = ("text",) if self.text_only else tuple(tasks)
        if not self.frames_per_clip:  # no audio encoder: no captioning rows
            keep = tuple(t for t in keep if t != "caption")
        self.tasks = keep
        w = np.asarray([given.get(t, 1.0) for t in keep], float)
        self.weights = w / w.sum()
        self.step = 0
        self.words = min(64, vocab.text_vocab_size)

    # Iterator protocol with checkpointable state ------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self):
        b = self.batch_at(self.step)
        self.step += 1
        return b

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])

    # Examples ------------------------------------------------------------------------------------
    def segments(self, rng: np.random.Generator, task: str) -> tuple:
        """One example of `task` -> (template segments, mels of its encoder-input segments)."""
        n = int(rng.integers(2, 6))
        words = rng.integers(0, self.words, n)
        if task == "text":
            return [Segment("user", "text", words),
                    Segment("assistant", "text", (words * 7 + 3) % self.words)], []
        if task == "caption":
            # The "audio": a mel pattern that encodes the words to caption.
            mel = np.zeros((self.clip_mel, self.layout.n_mels), np.float32)
            for j, wd in enumerate(words):
                mel[:, (wd + j) % self.layout.n_mels] += 1.0 + j
            return [Segment("user", "text", [1, 2]), Segment("user", "audio", self.frames_per_clip),
                    Segment("assistant", "text", words)], [mel]
        vb = self.vocab
        codes = np.stack([(np.repeat(words, 2) * (j + 1) + j) % vb.codebook_size
                          for j in range(vb.num_codebooks)], axis=1)
        return [Segment("user", "text", words), Segment("assistant", "audio", codes)], []

    def example(self, rng: np.random.Generator, task: str) -> Rendered:
        """One example of `task`, rendered by the training template with its clips."""
        segs, mels = self.segments(rng, task)
        ex = render(segs, self.vocab, **self.template)
        clips = encoder_clips(ex.audio_input_frames, mels, self.layout)
        return Rendered(TASKS.index(task), ex.tokens, ex.loss_weights, clips)

    def batch_at(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, index])
        has_audio = "caption" in self.tasks
        builder = BatchBuilder(self.batch, self.seq, self.k,
                               self.layout if has_audio else AudioLayout())
        for r in range(self.batch):
            while True:
                task = self.tasks[int(rng.choice(len(self.tasks), p=self.weights))]
                if task == "caption" and builder.clips[r] >= builder.max_clips:
                    task = "text"  # the row's clip slots are full
                if not builder.place(self.example(rng, task), row=r):
                    break  # the row is done: the example that did not fit is dropped
        return builder.finish()


def stream_for_model(cfg, batch: int, seq: int, seed: int = 0, text_only: bool = False,
                     max_clips: int = 4, **kw) -> SyntheticStream:
    """The synthetic stream for a model config: batches of the batch contract with `max_clips`
    clip slots (data.max_clips_per_row) of full encoder windows, each clip's audio a short
    pattern (16 x pool mel frames) at the start of its window."""
    vb = vocab_of(cfg)
    layout = AudioLayout() if text_only else AudioLayout.of_model(cfg, max_clips)
    clip_mel = min(layout.mel_frames, 16 * layout.pool) if layout.enabled else 0
    return SyntheticStream(vb, batch, seq, seed, layout=layout, clip_mel=clip_mel,
                           text_only=text_only, **kw)
