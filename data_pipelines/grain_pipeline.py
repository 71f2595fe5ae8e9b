"""Grain pipeline: stored records -> token-share mixture -> first-fit packed batches, resumable.

    per task: source -> shuffle(seed) -> repeat -> render (template + CFG dropout)
    -> weighted interleave by example weights that realise the TOKEN-share targets (mixture.py):
       ONE global stream, the same on every process
    -> one first-fit packer per row of the GLOBAL batch, each reading its own share of the stream
       (PackedIterator) -> this process's rows as a batch dict (numpy)

Everything before packing is one random-access grain MapDataset, so element i of the mixed stream
is a pure function of (sources, seed, i). The iterator state is therefore tiny and JSON-able: per
row, its next block of the stream plus the indices of the few look-ahead examples not yet placed;
resuming re-renders those and continues bit for bit, on the same or on any other number of
processes (the global batches do not depend on it).

Batches follow the batch contract (ualm_jax/format/batch.py); clips are laid out as
ualm_jax/format/layout.py says (one encoder window per clip slot). An example that does not fit
its row's free positions or clip slots waits for that row's next batch; one longer than L (or with
more than F clips) can never fit and is skipped and counted.
"""
from __future__ import annotations

import functools
import logging
import math
import sys
from typing import Mapping, Optional, Sequence

import grain
import numpy as np

from data_pipelines import mixture as mix
from ualm_jax.format.layout import AudioLayout  # noqa: F401 (re-exported)
from ualm_jax.format.records import CODES, ENCODER, TEXT, from_record, is_reason_task
from ualm_jax.format.template import render
from ualm_jax.format.vocab import JointVocab, vocab_of

log = logging.getLogger(__name__)
STATE_VERSION = 2  # 2: one packer per global row (elastic resume); 1: one per process


# Rendering ----------------------------------------------------------------------------------------
class Rendered:
    """One rendered example, ready to pack. clips: (position, n_frames, mel window [n, n_mels])."""
    __slots__ = ("task", "tokens", "loss_weights", "clips", "cfg_dropped", "index")

    def __init__(self, task: int, tokens, loss_weights, clips=(), cfg_dropped=False, index=-1):
        self.task, self.tokens, self.loss_weights = task, tokens, loss_weights
        self.clips, self.cfg_dropped, self.index = tuple(clips), cfg_dropped, index

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


_M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
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
        h = _splitmix64(_splitmix64(_splitmix64(int(seed) & _M64) ^ int(task)) ^ (int(index) & _M64))
        self.value = (h >> 11) * (1.0 / (1 << 53))

    def random(self) -> float:
        return self.value


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
        t = self.layout.mel_frames
        return sum(1 for m in lengths[kinds == ENCODER] for s in range(0, int(m), t)
                   if self.layout.window_frames(min(t, int(m) - s)))

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
        clips = []
        if not ex.cfg_dropped:  # a dropped example keeps only its target audio: no encoder input
            t = self.layout.mel_frames
            for (start, n), mel in zip(ex.audio_input_frames, mels):
                off = 0
                for s in range(0, len(mel), t):
                    window = mel[s:s + t]
                    nf = self.layout.window_frames(len(window))
                    if nf:
                        clips.append((start + off, nf, window))
                        off += nf
                assert off == n, (off, n)
        return Rendered(self.task, ex.tokens, ex.loss_weights, clips, ex.cfg_dropped, index)


# Mixing -------------------------------------------------------------------------------------------
class WeightedInterleave(grain.transforms.DatasetSelectionMap):
    """Deterministic weighted interleave of infinite datasets: index -> (dataset, index in it).

    grain's `mix` does the same but rounds weights to integers with the smallest at 100 (up to 1%
    off target); here the smallest weight is scaled to 10^6. Low variance by construction: the
    first n mixed elements hold within 1 of n * w_i elements of dataset i, for every n.
    """

    def __init__(self, weights: Sequence[float], scale_min_to: int = 1_000_000):
        w = np.asarray(weights, np.float64)
        if w.ndim != 1 or not len(w) or (w <= 0).any():
            raise ValueError(f"weights must be positive, got {list(weights)}")
        self._p = tuple(int(round(x * scale_min_to / w.min())) for x in w)

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, k: int):
        # Peel datasets off one at a time: dataset i owns the positions at which the count of
        # "not i" elements (k * (R - p_i) // R) does not advance.
        remaining, cur, nxt = sum(self._p), k, k + 1
        for i, p in enumerate(self._p):
            a, b = (cur * (remaining - p)) // remaining, (nxt * (remaining - p)) // remaining
            if cur - a != nxt - b:
                return i, nxt - b - 1
            remaining -= p
            cur, nxt = a, b
        raise AssertionError("unreachable: the last dataset takes every remaining position")


def _task_seed(seed: int, task: int) -> int:
    return (_splitmix64((int(seed) << 8) ^ task) >> 32) % (2 ** 32)


class _ReadAndRender:
    """(stream index, record index) -> Rendered; the stream index keys CFG dropout."""

    def __init__(self, source, renderer: Renderer):
        self.source, self.renderer = source, renderer

    def __call__(self, index: int, record_index: int) -> Rendered:
        return self.renderer(index, self.source[record_index])


def task_dataset(source, renderer: Renderer, seed: int, shuffle: bool = True) -> grain.MapDataset:
    """One task's infinite, rendered stream over the whole source, shuffled (a new permutation
    each epoch), repeated. Element i depends only on (source, seed, i), on every process.

    Shuffles record INDICES, then reads: `MapDataset.source` would also estimate every record's
    byte size for its metrics (~20 us a record here, a third of a short example's cost).
    """
    ds = grain.MapDataset.range(len(source))
    if len(ds) == 0:
        raise ValueError(f"{renderer.name}: its source has no records")
    if shuffle:
        ds = ds.shuffle(seed=_task_seed(seed, renderer.task))
    return ds.repeat().map_with_index(_ReadAndRender(source, renderer))


# Packing ------------------------------------------------------------------------------------------
class BatchBuilder:
    """First-fit packing of Rendered examples into one [B, L, K] batch (plus clip slots)."""

    def __init__(self, batch_size: int, seq_len: int, k: int, layout: AudioLayout):
        b, l, self.layout = batch_size, seq_len, layout
        self.b, self.l = b, l
        self.tokens = np.zeros((b, l, k), np.int32)
        self.weights = np.zeros((b, l, k), np.float32)
        self.segment_ids = np.zeros((b, l), np.int32)
        self.positions = np.zeros((b, l), np.int32)
        self.task_ids = np.full((b, l), -1, np.int32)
        self.used = [0] * b
        self.segments = [0] * b
        self.clips = [0] * b
        self.row_tasks: list = [[] for _ in range(b)]  # task of each example placed, per row
        self.max_clips = layout.max_clips if layout.enabled else 0
        if layout.enabled:
            f, t = layout.max_clips, layout.mel_frames
            # np.zeros is lazily zeroed memory: untouched clip slots cost nothing to allocate.
            self.features = np.zeros((b, f, t, layout.n_mels), np.float32)
            self.mel_mask = np.zeros((b, f, t), bool)
            self.slots = np.full((b, l), -1, np.int32)
        self._arange = np.arange(l, dtype=np.int32)

    def fits_empty_row(self, e: Rendered) -> bool:
        return len(e) <= self.l and len(e.clips) <= self.max_clips

    def full(self, row: Optional[int] = None) -> bool:
        if row is not None:
            return self.used[row] == self.l
        return all(u == self.l for u in self.used)

    def place(self, e: Rendered, row: Optional[int] = None) -> bool:
        """Put e into the first row (or into `row`) with room for its tokens AND its clips;
        False if none has."""
        n, c = len(e), len(e.clips)
        for r in (range(self.b) if row is None else (row,)):
            if self.used[r] + n <= self.l and self.clips[r] + c <= self.max_clips:
                break
        else:
            return False
        s = self.used[r]
        sl = slice(s, s + n)
        self.tokens[r, sl] = e.tokens
        self.weights[r, sl] = e.loss_weights
        self.segments[r] += 1
        self.segment_ids[r, sl] = self.segments[r]
        self.positions[r, sl] = self._arange[:n]
        self.task_ids[r, sl] = e.task
        self.row_tasks[r].append(e.task)
        for pos, nf, mel in e.clips:
            c = self.clips[r]
            self.slots[r, s + pos:s + pos + nf] = self.layout.slot(c, self._arange[:nf])
            self.features[r, c, :len(mel)] = mel
            self.mel_mask[r, c, :len(mel)] = True
            self.clips[r] = c + 1
        self.used[r] = s + n
        return True

    def finish(self) -> dict:
        out = {"tokens": self.tokens, "loss_weights": self.weights, "segment_ids": self.segment_ids,
               "positions": self.positions, "task_ids": self.task_ids}
        if self.layout.enabled:
            out.update(audio_features=self.features, audio_mel_mask=self.mel_mask,
                       audio_slots=self.slots)
        return out


def fill_batch(builder: BatchBuilder, waiting: list, read, lookahead: int,
               row: Optional[int] = None):
    """Fill one batch (or only its row `row`): the waiting examples first (oldest first), then new
    ones from read() until `lookahead` examples wait or every row is full.
    -> (still waiting, placed, read exhausted). The oldest waiting example always fits an empty
    row, so none waits forever."""
    left, placed, exhausted = [], 0, False
    for e in waiting:
        if builder.place(e, row):
            placed += 1
        else:
            left.append(e)
    while len(left) < lookahead and not builder.full(row):
        try:
            e = read()
        except StopIteration:
            exhausted = True
            break
        if builder.place(e, row):
            placed += 1
        else:
            left.append(e)
    return left, placed, exhausted


class Packer:
    """First-fit packing of a stream of Rendered examples into this process's host batches (see
    fill_batch), skipping and counting examples that can never fit a row. Subclasses say where
    examples come from (`_fetch`) and how the position is saved (`get_state`/`set_state`)."""

    per_host = True  # batches are this process's rows already: the trainer must not slice them

    def __init__(self, batch_size: int, seq_len: int, k: int, layout: AudioLayout, lookahead: int,
                 task_names: Sequence[str] = (), fingerprint: Optional[dict] = None):
        self.batch_size, self.seq_len, self.k = batch_size, seq_len, k
        self.layout, self.lookahead = layout, max(1, int(lookahead))
        self.task_names = tuple(task_names)
        self.fingerprint = dict(fingerprint or {})
        self.report: list = []  # per-task rows for `mixture inspect`, set by the builder
        self.weights: dict = {}
        self._pending: list = []
        self.max_consecutive_skips = 100_000  # then the config, not the data, is wrong: say so
        self.counts = {"batches": 0, "examples": 0, "skipped_too_long": 0,
                       "skipped_too_many_clips": 0}
        self._skips_by_task: dict = {}  # (counter, task) -> skips, for one log line per task

    def _fetch(self) -> Rendered:
        """The next example of the stream (StopIteration at the end of a finite one)."""
        raise NotImplementedError

    def _unfit(self, e: Rendered) -> Optional[tuple]:
        """(counter, reason) when e can never fit a row, else None."""
        if len(e) > self.seq_len:
            return "skipped_too_long", f"{len(e)} tokens > seq_len {self.seq_len}"
        if len(e.clips) > (self.layout.max_clips if self.layout.enabled else 0):
            return ("skipped_too_many_clips",
                    f"{len(e.clips)} clips > max_clips_per_row {self.layout.max_clips}")
        return None

    def _read(self, fetch=None, tally=None) -> Rendered:
        """The next example that can fit a row, from `fetch` (default _fetch); the ones that never
        can are skipped and counted (also on `tally`, e.g. a row's RowPacker)."""
        fetch = fetch or self._fetch
        for _ in range(self.max_consecutive_skips):
            e = fetch()
            why = self._unfit(e)
            if why is None:
                return e
            self.counts[why[0]] += 1
            if tally is not None:
                setattr(tally, why[0], getattr(tally, why[0]) + 1)
            self._skip(why[0], e, why[1])
        raise ValueError(f"{self.max_consecutive_skips} examples in a row cannot fit a row of "
                         f"{self.seq_len} tokens: raise train.seq_len or data.max_clips_per_row "
                         f"({self.counts})")

    _FIX = {"skipped_too_long": "raise train.seq_len, or rebuild the task with a lower "
                                "--max-seconds so its examples fit",
            "skipped_too_many_clips": "raise data.max_clips_per_row, or split long audio"}

    def _skip(self, counter: str, e: Rendered, why: str) -> None:
        """One line per task and cause at its 1st, 10th, 100th, ... skip, naming the example
        (its place in the mixture's stream) and the fix (the caller has counted it)."""
        name = self.task_names[e.task] if e.task < len(self.task_names) else str(e.task)
        n = self._skips_by_task[(counter, name)] = self._skips_by_task.get((counter, name), 0) + 1
        if n in (1, 10, 100, 1000) or n % 10000 == 0:
            where = f"stream element {e.index}: " if e.index >= 0 else ""
            log.warning("task %s: %d example(s) skipped so far, %d in all tasks (%s%s); %s", name,
                        n, self.counts[counter], where, why, self._FIX.get(counter, ""))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        b = BatchBuilder(self.batch_size, self.seq_len, self.k, self.layout)
        self._pending, placed, exhausted = fill_batch(b, self._pending, self._read, self.lookahead)
        if exhausted and not placed and not self._pending:
            raise StopIteration  # a finite stream has ended (training streams repeat)
        self.counts["batches"] += 1
        self.counts["examples"] += placed
        return b.finish()

    def _check_fingerprint(self, state: Mapping) -> None:
        saved = dict(state.get("fingerprint", {}))
        for key, value in self.fingerprint.items():
            if key in saved and saved[key] != value:
                raise ValueError(f"data iterator state was saved with {key}={saved[key]!r} but "
                                 f"this pipeline has {key}={value!r}: resuming would not continue "
                                 f"the same stream")

    def stats(self) -> dict:
        return dict(self.counts)


class RowPacker:
    """One row of the global batch: its position in its share of the stream (next block), the
    examples it read that wait for room, and what it placed."""
    __slots__ = ("next", "pending", "examples", "tasks", "skipped_too_long",
                 "skipped_too_many_clips")

    def __init__(self, n_tasks: int):
        self.next, self.pending, self.examples = 0, [], 0
        self.tasks = [0] * n_tasks
        self.skipped_too_long = self.skipped_too_many_clips = 0

    def to_json(self) -> dict:
        return {"next": self.next, "pending": [int(e.index) for e in self.pending],
                "examples": self.examples, "tasks": list(self.tasks),
                "skipped_too_long": self.skipped_too_long,
                "skipped_too_many_clips": self.skipped_too_many_clips}


def block_slot(seed: int, block: int, rows: int, row: int) -> int:
    """Where row `row` reads inside block `block` of the stream: a seeded affine permutation of
    the rows per block, so a task pattern of the interleave never lines up with the rows."""
    if rows == 1:
        return 0
    h = _splitmix64((int(seed) << 20) ^ _splitmix64(int(block)))
    a = 1 + (h >> 32) % (rows - 1)
    while math.gcd(a, rows) != 1:
        a = a % (rows - 1) + 1
    return (a * row + (h & 0xFFFFFFFF)) % rows


class PackedIterator(Packer):
    """This process's rows of the global batch, packed from ONE global example stream.

    Every row g of the global batch (V rows) has its own packer reading its own share of the
    stream: in block j (elements j*V .. j*V+V-1) it takes element j*V + block_slot(j, g). What a
    row holds therefore depends on the global batch and the seed, never on how many processes
    there are: a process runs the packers of its rows, the checkpoint gathers every row's state,
    and a run resumes on any number of processes dividing V with the same global batches (each
    process takes its rows' states). State per row: next block, waiting example indices, counts.
    """

    def __init__(self, stream: grain.MapDataset, rows: int, seq_len: int, k: int,
                 layout: AudioLayout, lookahead: int, process_index: int = 0,
                 process_count: int = 1, seed: int = 0, task_names: Sequence[str] = (),
                 fingerprint: Optional[dict] = None):
        if rows % process_count:
            raise ValueError(f"the global batch of {rows} rows must be divisible by the "
                             f"{process_count} processes (each packs its own rows)")
        local = rows // process_count
        super().__init__(local, seq_len, k, layout, lookahead, task_names, fingerprint)
        self.stream, self.rows, self.seed = stream, int(rows), int(seed)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.global_rows = list(range(process_index * local, (process_index + 1) * local))
        n = max(len(self.task_names), 1)
        self.packers = {g: RowPacker(n) for g in self.global_rows}

    def _fetch_for(self, g: int) -> Rendered:
        p = self.packers[g]
        i = p.next * self.rows + block_slot(self.seed, p.next, self.rows, g)
        p.next += 1
        e = self.stream[i]
        e.index = i
        return e

    def __next__(self) -> dict:
        b = BatchBuilder(self.batch_size, self.seq_len, self.k, self.layout)
        for r, g in enumerate(self.global_rows):
            p = self.packers[g]
            before = b.segments[r]
            read = functools.partial(self._read, functools.partial(self._fetch_for, g), p)
            p.pending, placed, _ = fill_batch(b, p.pending, read, self.lookahead, row=r)
            p.examples += placed
            for t in b.row_tasks[r][before:]:
                p.tasks[t] += 1
        self.counts["batches"] += 1
        self._sum_counts()
        return b.finish()

    def _sum_counts(self) -> None:
        for key in ("examples", "skipped_too_long", "skipped_too_many_clips"):
            self.counts[key] = sum(getattr(p, key) for p in self.packers.values())

    def get_state(self) -> dict:
        return {"version": STATE_VERSION, "rows": self.rows, "batches": self.counts["batches"],
                "packers": {str(g): p.to_json() for g, p in self.packers.items()},
                "fingerprint": self.fingerprint}

    def set_state(self, state: Mapping) -> None:
        """Takes this process's rows from a state holding at least those rows: its own, or every
        process's merged (train/data.local_data_state), whatever the saving process count."""
        if int(state.get("version", -1)) != STATE_VERSION:
            raise ValueError(f"data iterator state version {state.get('version')!r} is not "
                             f"{STATE_VERSION} (saved by another version of the Grain "
                             "pipeline): resume this run's data with that version, or start "
                             "the data afresh in a new run dir")
        self._check_fingerprint(state)
        saved = state.get("packers", {})
        missing = [g for g in self.global_rows if str(g) not in saved]
        if missing:
            raise ValueError(f"the data iterator state holds no packer for row(s) "
                             f"{missing[:4]}{'...' if len(missing) > 4 else ''} of the "
                             f"{self.rows}-row global batch")
        for g in self.global_rows:
            s, p = saved[str(g)], self.packers[g]
            p.next, p.examples = int(s["next"]), int(s["examples"])
            p.tasks = [int(x) for x in s["tasks"]]
            p.skipped_too_long = int(s.get("skipped_too_long", 0))
            p.skipped_too_many_clips = int(s.get("skipped_too_many_clips", 0))
            p.pending = []
            for i in s["pending"]:
                e = self.stream[int(i)]
                e.index = int(i)
                p.pending.append(e)
        self.counts["batches"] = int(state.get("batches", 0))
        self._sum_counts()


# Building the pipeline ----------------------------------------------------------------------------
def _get(cfg_data, name, default=None):
    if isinstance(cfg_data, Mapping):
        return cfg_data.get(name, default)
    return getattr(cfg_data, name, default)


def make_iterator(sources: Mapping[str, object], cfg_data, vocab: JointVocab, batch_size: int,
                  seq_len: int, seed: int, n_mels: int = 0, mel_frames: int = 0,
                  frames_per_window: int = 0, process_index: int = 0, process_count: int = 1,
                  split: str = "train", mean_tokens: Optional[Mapping[str, float]] = None,
                  estimate_records: int = 512, lookahead: Optional[int] = None,
                  stream_weights: Optional[Sequence[float]] = None) -> PackedIterator:
    """The mixture of `cfg_data.mixture` over `sources` (name -> random-access source of record
    dicts: len + getitem), packed into GLOBAL batches of `batch_size` rows, of which this process
    (`process_index` of `process_count`) gets its contiguous batch_size / process_count rows.

    mean_tokens: per-task mean rendered length (e.g. from the builder's stats.json); tasks not in
    it are estimated from up to `estimate_records` records spread over the WHOLE source, so every
    host derives the same weights, counting records that can never fit a row as 0 tokens (they are
    skipped, so this keeps the realised token shares on target). CFG dropout: train split only.
    """
    if batch_size <= 0 or seq_len <= 0:
        raise ValueError(f"batch_size={batch_size} and seq_len={seq_len} must be positive")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must lie in [0, {process_count})")
    if int(_get(cfg_data, "read_threads", 0) or 0) > 0:
        log.warning("data.read_threads is no longer used: every row's packer reads its examples "
                    "by random access (the fastest path measured here)")
    entries = mix.parse_mixture(_get(cfg_data, "mixture", []))
    missing = [e.name for e in entries if e.name not in sources]
    if missing:
        raise ValueError(f"no source for mixture task(s) {', '.join(missing)}; "
                         f"sources given: {', '.join(sources) or 'none'}")
    layout = AudioLayout(n_mels, mel_frames, frames_per_window,
                         int(_get(cfg_data, "max_clips_per_row", 0) or 0))
    cfg_dropout = float(_get(cfg_data, "cfg_dropout", 0.0) or 0.0) if split == "train" else 0.0
    names = [e.name for e in entries]
    headers = str(_get(cfg_data, "supervise_headers", "assistant") or "assistant")
    id0_pad = bool(_get(cfg_data, "text_id0_as_pad", False))
    renderers = [Renderer(vocab, layout, i, seed, cfg_dropout, name=f"mixture task {e.name!r}",
                          supervise_headers=headers, stream_weights=stream_weights,
                          text_id0_as_pad=id0_pad)
                 for i, e in enumerate(entries)]
    fits = {n: functools.partial(r.packed_length, seq_len=seq_len) for n, r in zip(names, renderers)}
    means = mix.resolve_mean_tokens(entries, sources, fits, mean_tokens, estimate_records)
    weights = mix.sampling_weights(entries, means)
    active = [i for i, e in enumerate(entries) if weights[e.name] > 0]
    shuffle = bool(_get(cfg_data, "shuffle", True))
    datasets = [task_dataset(sources[entries[i].name], renderers[i], seed, shuffle=shuffle)
                for i in active]
    stream = grain.MapDataset.select_from_datasets(
        datasets, WeightedInterleave([weights[names[i]] for i in active]))
    k = max(vocab.num_codebooks, 1)
    # No process index or count: the stream and every row's packer are the same on any number
    # of processes (elastic resume).
    fingerprint = {"tasks": names, "seed": int(seed), "split": split, "rows": int(batch_size),
                   "seq_len": int(seq_len), "shuffle": shuffle}
    it = PackedIterator(stream, batch_size, seq_len, k, layout,
                        int(_get(cfg_data, "row_lookahead", 8)) if lookahead is None else lookahead,
                        process_index, process_count, seed, names, fingerprint)
    it.weights = weights
    it.report = mix.mixture_report(entries, {n: len(sources[n]) for n in names}, means)
    return it


def audio_args(model_cfg) -> dict:
    """make_iterator's audio arguments for a model (all 0 without an audio encoder)."""
    lay = AudioLayout.of_model(model_cfg, 1)
    return dict(n_mels=lay.n_mels, mel_frames=lay.mel_frames,
                frames_per_window=lay.frames_per_window)


def make_config_iterator(cfg, split: str = "train", process_index: Optional[int] = None,
                         process_count: Optional[int] = None, open_source=None,
                         check_build=None) -> PackedIterator:
    """The trainer's entry point: `cfg.data.mixture` entries opened from their built `path`s
    (data_pipelines.build.open_source unless `open_source(path, split)` is given), this host's
    share of `cfg.train.batch_size`, the model's vocab and audio-encoder window. The train split
    is seeded by cfg.seed, any other by cfg.data.eval_seed."""
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    if open_source is None:
        from data_pipelines.build import open_source
    from data_pipelines.staging import local_build_dir

    entries = mix.parse_mixture(cfg.data.mixture)
    for i, e in enumerate(entries):
        if not e.path:
            raise ValueError(f"data.mixture[{i}].path is empty: expected a built dataset folder "
                             f"(ualm data build ... --out DIR)")
    if cfg.train.batch_size % process_count:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} must be divisible by the "
                         f"{process_count} processes (each packs its own rows)")
    audio = audio_args(cfg.model)
    stage = getattr(cfg.data, "stage_dir", "")
    local = {e.name: local_build_dir(e.path, stage, f"data.mixture[{i}].path")
             for i, e in enumerate(entries)}
    if check_build is None:
        from data_pipelines.build import check_build_matches_model as check_build
    for i, e in enumerate(entries):
        check_build(local[e.name], cfg.model, f"data.mixture[{i}] ({e.name})")
    sources = {e.name: open_source(local[e.name], split) for e in entries}
    return make_iterator(sources, cfg.data,
                         vocab_of(cfg.model),
                         cfg.train.batch_size, cfg.train.seq_len,
                         cfg.seed if split == "train" else cfg.data.eval_seed,
                         process_index=process_index, process_count=process_count, split=split,
                         stream_weights=cfg.model.audio_stream_weights(), **audio)


# Measuring what comes out -------------------------------------------------------------------------
def packing_efficiency(batch: Mapping) -> float:
    """Fraction of positions holding an example (not padding)."""
    seg = np.asarray(batch["segment_ids"])
    return float((seg > 0).mean())


def realised_shares(iterator, n_batches: int, task_names: Optional[Sequence[str]] = None) -> dict:
    """Consume n_batches and measure what the mixture delivered: token share per task (positions,
    as the targets count them), packing efficiency (non-pad fraction) and CFG-free counts."""
    names = list(task_names or getattr(iterator, "task_names", ()))
    counts = np.zeros(max(len(names), 1), np.int64)
    filled = total = 0
    for _ in range(n_batches):
        ids = np.asarray(next(iterator)["task_ids"])
        valid = ids[ids >= 0]
        if valid.size and valid.max() >= len(counts):
            counts = np.pad(counts, (0, int(valid.max()) + 1 - len(counts)))
        counts += np.bincount(valid, minlength=len(counts))[:len(counts)]
        filled += valid.size
        total += ids.size
    names += [f"task{i}" for i in range(len(names), len(counts))]
    shares = {n: float(c) / max(filled, 1) for n, c in zip(names, counts)}
    return {"shares": shares, "tokens": {n: int(c) for n, c in zip(names, counts)},
            "packing_efficiency": filled / max(total, 1), "batches": n_batches}

