"""First-fit packing of rendered examples into rows of the batch contract, shared by every path
that trains (Grain, SeqIO, the synthetic stream) and by inference prompts.

`BatchBuilder` places one example at a time into the first row (or a given row) with room for
its tokens AND its clips: tokens and loss weights copied, segment ids counting the row's examples
from 1, positions restarting at 0 per example, task ids (-1 on padding), and each clip in the
row's next clip slot (features from the slot's start, mel mask on its frames, audio_slots
numbered as ualm_jax/format/layout.py says). `fill_batch` is the look-ahead loop over a stream;
`Packer` adds skipping (and counting) of examples that can never fit a row; `RowPacker` and
`block_slot` are one row's state and its read order in the Grain path's global stream.
Batches follow the batch contract (ualm_jax/format/batch.py).
"""
from __future__ import annotations

import logging
import math
from typing import Mapping, Optional, Sequence

import numpy as np

from data_pipelines.render import Rendered, splitmix64
from ualm_jax.format.layout import AudioLayout

log = logging.getLogger(__name__)


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
    h = splitmix64((int(seed) << 20) ^ splitmix64(int(block)))
    a = 1 + (h >> 32) % (rows - 1)
    while math.gcd(a, rows) != 1:
        a = a % (rows - 1) + 1
    return (a * row + (h & 0xFFFFFFFF)) % rows
