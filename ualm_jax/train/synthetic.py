"""A deterministic built-in stream of packed multi-task batches in the real batch format.

Three tasks, each learnable (the answer is a fixed function of the prompt):
  text:  <user><text> a b c <eos> <assistant><text> f(a) f(b) f(c) <eos>
  caption: <user><text> prompt <eot> <user><audio> [encoder frames] <eos> <assistant><text> words <eos>
  t2a:   <user><text> words <eos> <assistant><audio> delayed codes [T+K-1, K] <eos>
Batch i depends only on (seed, i): the iterator state is one integer, so resume is exact.
"""
from __future__ import annotations

import numpy as np

from ualm_jax.config import SYNTHETIC_TASKS
from ualm_jax.format import vocab as V
from ualm_jax.format.delay import apply_delay
from ualm_jax.format.layout import AudioLayout
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
        self.header_w = 1.0 if supervise_headers else 0.0
        self.id0_pad = bool(text_id0_as_pad)
        self.audio_w = (np.full(self.k, 1.0 / self.k, np.float32) if stream_weights is None
                        else np.asarray(stream_weights, np.float32))
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

    # Examples --------------------------------------------------------------------------------------
    def _text(self, ids):
        return [V.PAD if self.id0_pad and int(i) == 0 else int(i) + self.vocab.text_offset
                for i in ids]

    def _example(self, rng, task):
        """Returns (stream0 list, loss mask list, audio rows {pos: [K] ids}, audio slot count)."""
        k, vb = self.k, self.vocab
        toks: list[int] = [V.BOS]
        w: list[float] = [0.0]
        rows: dict[int, np.ndarray] = {}
        slots: list[int] = []

        def add(ids, weight):  # a stream-0 pad is never a target
            toks.extend(ids)
            w.extend([0.0 if t == V.PAD else weight for t in ids])

        n = int(rng.integers(2, 6))
        words = rng.integers(0, self.words, n)
        if task == "text":
            add([V.USER, V.TEXT] + self._text(words) + [V.EOS], 0.0)
            add([V.ASSISTANT, V.TEXT], self.header_w)
            add(self._text((words * 7 + 3) % self.words) + [V.EOS], 1.0)
        elif task == "caption":
            add([V.USER, V.TEXT] + self._text([1, 2]) + [V.EOT, V.USER, V.AUDIO], 0.0)
            start = len(toks)
            add([V.PAD] * self.frames_per_clip + [V.EOS], 0.0)
            slots = list(range(start, start + self.frames_per_clip))
            add([V.ASSISTANT, V.TEXT], self.header_w)
            add(self._text(words) + [V.EOS], 1.0)
        else:  # t2a
            add([V.USER, V.TEXT] + self._text(words) + [V.EOS], 0.0)
            add([V.ASSISTANT, V.AUDIO], self.header_w)
            codes = np.stack([(np.repeat(words, 2) * (j + 1) + j) % vb.codebook_size
                              for j in range(vb.num_codebooks)], axis=1)
            delayed = apply_delay(vb.codes_to_joint(codes), vb.codebook_pads())
            for i, row in enumerate(delayed):
                rows[len(toks)] = row
                add([int(row[0])], 1.0 / k)
            add([V.EOS], 1.0)
        return toks, w, rows, slots, words

    def batch_at(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, index])
        b, l, k = self.batch, self.seq, self.k
        tokens = np.zeros((b, l, k), np.int32)
        weights = np.zeros((b, l, k), np.float32)
        seg = np.zeros((b, l), np.int32)
        pos = np.zeros((b, l), np.int32)
        task_ids = np.full((b, l), -1, np.int32)
        has_audio = "caption" in self.tasks
        if has_audio:
            lay = self.layout
            clips = lay.max_clips
            feats = np.zeros((b, clips, lay.mel_frames, lay.n_mels), np.float32)
            mel_mask = np.zeros((b, clips, lay.mel_frames), bool)
            slots = np.full((b, l), -1, np.int32)
        for r in range(b):
            cur, s, clip = 0, 0, 0
            while True:
                task = self.tasks[int(rng.choice(len(self.tasks), p=self.weights))]
                if task == "caption" and clip >= clips:
                    task = "text"
                toks, w, rows, ex_slots, words = self._example(rng, task)
                if cur + len(toks) > l:
                    break
                s += 1
                sl = slice(cur, cur + len(toks))
                tokens[r, sl, 0] = toks
                seg[r, sl] = s
                pos[r, sl] = np.arange(len(toks))
                task_ids[r, sl] = TASKS.index(task)
                wa = np.asarray(w, np.float32)
                for p, row in rows.items():
                    tokens[r, cur + p] = row
                    weights[r, cur + p] = self.audio_w
                text_pos = np.array([p for p in range(len(toks)) if p not in rows], int)
                weights[r, cur + text_pos, 0] = wa[text_pos]
                if ex_slots:
                    fpc = self.frames_per_clip
                    slots[r, cur + np.asarray(ex_slots)] = lay.slot(clip, np.arange(fpc))
                    # The "audio": a mel pattern that encodes the words to caption.
                    frames = np.zeros((self.clip_mel, lay.n_mels), np.float32)
                    for j, wd in enumerate(words):
                        frames[:, (wd + j) % lay.n_mels] += 1.0 + j
                    feats[r, clip, :self.clip_mel] = frames
                    mel_mask[r, clip, :self.clip_mel] = True
                    clip += 1
                cur += len(toks)
        out = {"tokens": tokens, "loss_weights": weights, "segment_ids": seg, "positions": pos,
               "task_ids": task_ids}
        if has_audio:
            out.update(audio_features=feats, audio_mel_mask=mel_mask, audio_slots=slots)
        return out


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
