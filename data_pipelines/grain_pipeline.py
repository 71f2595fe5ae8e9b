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

Rendering (render.py) and first-fit packing (packing.py) are the pieces every path shares; this
module owns the mixing and the per-row packers over the one global stream. Batches follow the
batch contract (ualm_jax/format/batch.py); clips are laid out as ualm_jax/format/layout.py says
(one encoder window per clip slot). An example that does not fit its row's free positions or clip
slots waits for that row's next batch; one longer than L (or with more than F clips) can never fit
and is skipped and counted.
"""
from __future__ import annotations

import functools
import logging
import sys
from typing import Mapping, Optional, Sequence

import grain
import numpy as np

from data_pipelines import mixture as mix
from data_pipelines.packing import BatchBuilder, Packer, RowPacker, block_slot, fill_batch
from data_pipelines.render import Rendered, Renderer, splitmix64
from ualm_jax.format.layout import AudioLayout
from ualm_jax.format.vocab import JointVocab, vocab_of

log = logging.getLogger(__name__)
STATE_VERSION = 2  # 2: one packer per global row (elastic resume); 1: one per process


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
    return (splitmix64((int(seed) << 8) ^ task) >> 32) % (2 ** 32)


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
        from data_pipelines.sources import open_source
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
        from data_pipelines.sources import check_build_matches_model as check_build
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

