"""`data.source=seqio`: the trainer's iterator over a SeqIO Mixture or Task, resumable exactly.

    data.seqio.modules imported (registering the user's Tasks/Mixtures; our data.mixture builds
    are registered first, under their entry names, so a user's Mixture may name them)
    -> per task: its source and preprocessors, this host's shard (seqio.ShardInfo), its shuffle
       buffer (seeded), repeated -> rendered (template, CFG dropout; seqio_tasks.py)
    -> mixed by the Mixture's own rates and sample_fn (ours: the Grain interleave)
    -> first-fit packed into this host's rows, outside tf.data.

Resume: the tf.data iterator's own state (TF's iterator serialisation: shuffle buffers, file
positions, sampler RNG) is saved as a snapshot every `data.seqio.snapshot_every` batches, never
per step (a snapshot holds every shuffle buffer). A checkpoint's data state is the newest snapshot
older than every example still waiting in the packer's look-ahead, plus the number of examples read
since it and the positions of the waiting ones; restoring replays at most a few batches' worth
of examples from the snapshot. The stream is deterministic from the seed, so 3 steps + resume + 3
steps equals 6 straight, bit for bit (tested). T5X saves its tf.data iterator the same way
(`checkpoint_dataset`); SeqIO's own deterministic pipeline needs an offline Beam cache of every
task, which a user's Tasks may not have.
"""
from __future__ import annotations

import collections
import importlib
import json
from typing import Callable, Mapping, Optional, Sequence

import tensorflow as tf

from data_pipelines import mixture as mix
from data_pipelines import seqio_tasks as st
from data_pipelines.grain_pipeline import audio_args
from data_pipelines.render import Renderer
from ualm_jax.format.layout import AudioLayout
from ualm_jax.format.vocab import vocab_of

STATE_VERSION = 1
_REGISTERED: dict = {}  # what register_config registered, keyed by the settings it used


class SeqioPackedIterator(st.StreamPacker):
    """Packed host batches over a tf.data dataset of rendered examples; checkpointable (see the
    module docstring). `make_dataset()` must build the same deterministic dataset every call."""

    def __init__(self, make_dataset: Callable[[], tf.data.Dataset], batch_size: int, seq_len: int,
                 k: int, layout: AudioLayout, lookahead: int, task_names: Sequence[str] = (),
                 fingerprint: Optional[dict] = None, snapshot_every: int = 4):
        super().__init__(None, batch_size, seq_len, k, layout, lookahead, task_names, fingerprint)
        self.snapshot_every = max(1, int(snapshot_every))
        self._dataset = make_dataset()
        self._open()

    def _open(self, snapshot: Optional[str] = None, at: int = 0) -> None:
        self._it = iter(self._dataset)
        if snapshot is not None:
            self._it._restore(tf.constant(snapshot))  # TF's own iterator deserialisation
        self.read_count = at
        self._snapshots = collections.deque([(at, snapshot or self._snapshot())])
        self._batches = 0

    def _snapshot(self) -> str:
        return self._it._save().numpy().decode("ascii")  # base64 pieces, comma-joined

    def _element(self) -> Mapping:
        return {k: v.numpy() for k, v in next(self._it).items()}

    def __next__(self) -> dict:
        batch = super().__next__()
        self._batches += 1
        if self._batches % self.snapshot_every == 0:
            self._snapshots.append((self.read_count, self._snapshot()))
        # Keep the newest snapshot taken before every waiting example was read.
        oldest = min((e.index for e in self._pending), default=self.read_count)
        while len(self._snapshots) > 1 and self._snapshots[1][0] <= oldest:
            self._snapshots.popleft()
        return batch

    def get_state(self) -> dict:
        at, snapshot = self._snapshots[0]
        return {"version": STATE_VERSION, "source": "seqio", "snapshot": snapshot,
                "snapshot_at": at, "read": self.read_count,
                "pending": [int(e.index) for e in self._pending], "counts": dict(self.counts),
                "fingerprint": self.fingerprint}

    def set_state(self, state: Mapping) -> None:
        if state.get("source") != "seqio" or int(state.get("version", -1)) != STATE_VERSION:
            raise ValueError(f"data iterator state (source {state.get('source', 'mixture')!r}, "
                             f"version {state.get('version')!r}) was not saved by the seqio "
                             f"pipeline version {STATE_VERSION}: resume with the data.source "
                             "that wrote it")
        self._check_fingerprint(state)
        self._open(state["snapshot"], int(state["snapshot_at"]))
        want = [int(i) for i in state.get("pending", [])]
        wanted, kept = set(want), {}
        while self.read_count < int(state["read"]):  # replay from the snapshot
            e = self._fetch()
            if e.index in wanted:
                kept[e.index] = e
        self._pending = [kept[i] for i in want]
        self.counts.update({k: int(v) for k, v in state.get("counts", {}).items()})


# Resolving what to read ---------------------------------------------------------------------------
def register_config(cfg) -> Optional[str]:
    """Register the `data.mixture` builds as record Tasks (entry names) and their Mixture
    (`ualm_mixture`), once per settings; -> the Mixture name, or None without entries."""
    d = cfg.data
    if not d.mixture:
        return None
    from data_pipelines.sources import check_build_matches_model
    from data_pipelines.staging import local_build_dir

    entries = mix.parse_mixture(d.mixture)
    key = json.dumps([d.mixture, d.stage_dir, d.max_clips_per_row, d.supervise_headers,
                      d.text_id0_as_pad, d.seqio.shuffle_buffer, cfg.train.seq_len,
                      vocab_of(cfg.model).padded_size, audio_args(cfg.model)], default=str)
    if key in _REGISTERED:
        return _REGISTERED[key]
    sources = {}
    for i, e in enumerate(entries):
        if not e.path:
            raise ValueError(f"data.mixture[{i}].path is empty: expected a built dataset folder "
                             f"(ualm data build ... --out DIR [--format tfrecord])")
        path = local_build_dir(e.path, d.stage_dir, f"data.mixture[{i}].path")
        check_build_matches_model(path, cfg.model, f"data.mixture[{i}] ({e.name})")
        sources[e.name] = st.build_splits_of(path)
    _, name = st.register_tasks(sources, d, vocab_of(cfg.model), cfg.train.seq_len, seed=cfg.seed,
                                shuffle_buffer=d.seqio.shuffle_buffer,
                                stream_weights=cfg.model.audio_stream_weights(),
                                **audio_args(cfg.model))
    _REGISTERED[key] = name
    return name


def import_modules(modules: Sequence[str]) -> None:
    for i, m in enumerate(modules):
        try:
            importlib.import_module(m)
        except ImportError as e:
            raise ValueError(f"data.seqio.modules[{i}]={m!r} cannot be imported ({e}); it must be "
                             "an importable module that registers seqio Tasks/Mixtures") from e


def resolve(cfg) -> tuple[str, list, list, Callable, list]:
    """-> (provider name, tasks, rates, sample_fn, task names). Task ids follow `data.mixture`
    order for our builds' Mixture (a share-0 entry keeps its id), else the Mixture's task order."""
    built = register_config(cfg)
    import_modules(cfg.data.seqio.modules)
    name = cfg.data.seqio.mixture or built
    entries = [e.name for e in mix.parse_mixture(cfg.data.mixture)] if built else []
    tasks, rates, sample_fn = st.provider_tasks(name, entries if name == built else ())
    names = entries if name == built else [t.name for t in tasks]
    return name, tasks, rates, sample_fn, names


def task_names(cfg) -> tuple[str, ...]:
    return tuple(resolve(cfg)[4])


def make_seqio_iterator(cfg, split: str = "train", process_index: Optional[int] = None,
                        process_count: Optional[int] = None) -> SeqioPackedIterator:
    """The trainer's entry point for data.source=seqio: this host's share of
    `cfg.train.batch_size` rows. The train split is seeded by cfg.seed, any other by
    cfg.data.eval_seed (and has no CFG dropout), as on the Grain path."""
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    if cfg.train.batch_size % process_count:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} must be divisible by the "
                         f"{process_count} processes (each packs its own rows)")
    name, tasks, rates, sample_fn, names = resolve(cfg)
    d = cfg.data
    seed = cfg.seed if split == "train" else d.eval_seed
    vocab = vocab_of(cfg.model)
    audio = audio_args(cfg.model)
    layout = AudioLayout(audio["n_mels"], audio["mel_frames"], audio["frames_per_window"],
                         d.max_clips_per_row)
    dropout = d.cfg_dropout if split == "train" else 0.0
    renderers = [Renderer(vocab, layout, names.index(t.name) if t.name in names else i, seed,
                          dropout, f"seqio task {t.name!r}", supervise_headers=d.supervise_headers,
                          stream_weights=cfg.model.audio_stream_weights(),
                          text_id0_as_pad=d.text_id0_as_pad)
                 for i, t in enumerate(tasks)]

    def make_dataset():
        return st.rendered_mixture(tasks, rates, sample_fn, renderers, split, d.shuffle, seed,
                                   process_index, process_count)

    rows = cfg.train.batch_size // process_count
    fingerprint = {"seqio": name, "tasks": names, "seed": int(seed), "split": split,
                   "batch_size": int(cfg.train.batch_size), "seq_len": int(cfg.train.seq_len),
                   "process_index": int(process_index), "process_count": int(process_count),
                   "shuffle": bool(d.shuffle)}
    it = SeqioPackedIterator(make_dataset, rows, cfg.train.seq_len, max(vocab.num_codebooks, 1),
                             layout, max(4, 2 * rows), names, fingerprint,
                             snapshot_every=d.seqio.snapshot_every)
    it.weights = {t.name: r for t, r in zip(tasks, rates)}
    it.report = [{"name": t.name, "path": "", "examples": _examples(t, split),
                  "validation_examples": _examples(t, "validation"), "sampling_weight": r}
                 for t, r in zip(tasks, rates)]
    return it


def _examples(task, split: str) -> Optional[int]:
    """Records in a task's split, when its source can say (None without the split)."""
    if split not in task.splits:
        return None
    try:
        n = task.num_input_examples(split)
    except Exception:  # a source that cannot say
        return None
    return None if n is None else int(n)
