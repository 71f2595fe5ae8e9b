"""SeqIO Tasks and Mixtures over stored records, rendering, and packing in the batch contract.

Every SeqIO task the trainer reads emits the STORED RECORD features (ualm_jax/format/records.py:
task, roles, modalities, kinds, lengths, text, codes, mel), whether it is one of our builds
(registered under its `data.mixture` entry name) or a user's own Task with its own source and
preprocessors. Rendering (template, delay pattern, loss weights, CFG dropout) happens after the
task, with the same Renderer as the Grain path, keyed by the example's position in its task's
stream (as Grain keys it), so one registered task serves train and held-out splits alike.

Our builds' Mixture keeps the Grain path's token-share weights AND its deterministic interleave
(a `sample_fn`), so with `data.shuffle=false` both paths give the same rendered examples in the
same order (the Grain path then packs them per row of the global batch, this one per host).
Reading is checkpointable tf.data all the way (range + map for random-access builds,
TFRecordDataset for TFRecord builds; no Python generators), so the trainer can save the iterator
(seqio_pipeline.py).

`PackedStreamsConverter` packs rendered examples into the Grain path's row contract with the same
first-fit packer; seqio's own packers are 1-D only and find lengths by counting non-zero ids,
which breaks on [L, K] rows whose encoder placeholders and CFG-dropped prefixes are pad 0.

SeqIO and TensorFlow are imported here only (~5 s / 900 MB): the Grain path never loads them.
"""
from __future__ import annotations

import functools
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf

from data_pipelines import mixture as mix
from data_pipelines.grain_pipeline import WeightedInterleave
from data_pipelines.packing import Packer
from data_pipelines.render import Rendered, Renderer
from ualm_jax.format.layout import AudioLayout
from ualm_jax.format.vocab import JointVocab

RECORD_SIGNATURE = {
    "task": tf.TensorSpec([], tf.string),
    "roles": tf.TensorSpec([None], tf.int32),
    "modalities": tf.TensorSpec([None], tf.int32),
    "kinds": tf.TensorSpec([None], tf.int32),
    "lengths": tf.TensorSpec([None], tf.int32),
    "text": tf.TensorSpec([None], tf.int32),
    "codes": tf.TensorSpec([None, None], tf.int32),
    "mel": tf.TensorSpec([None, None], tf.float16),
}
RECORD_FIELDS = tuple(RECORD_SIGNATURE)


# Sources ------------------------------------------------------------------------------------------
def records_dataset(source) -> tf.data.Dataset:
    """A random-access source of record dicts (len, [i]) as tf.data, in index order. Range + map:
    checkpointable (a generator-based dataset would silently restart on restore)."""
    dtypes = [RECORD_SIGNATURE[f].dtype for f in RECORD_FIELDS]

    def read(i):
        rec = source[int(i)]
        task = rec["task"]
        return (task.encode("utf-8") if isinstance(task, str) else bytes(task),
                *(np.asarray(rec[f], d.as_numpy_dtype) for f, d in zip(RECORD_FIELDS[1:], dtypes[1:])))

    def fn(i):
        out = tf.numpy_function(read, [i], dtypes, stateful=False)
        for x, f in zip(out, RECORD_FIELDS):
            x.set_shape(RECORD_SIGNATURE[f].shape)
        return dict(zip(RECORD_FIELDS, out))

    return tf.data.Dataset.range(len(source)).map(fn)


class TFRecordSplit:
    """One split of a TFRecord build, read in stored order through tf.data (no random access)."""

    def __init__(self, path: str, split: str, records: int):
        self.path, self.split, self.records = path, split, int(records)

    def __len__(self) -> int:
        return self.records

    def dataset(self) -> tf.data.Dataset:
        from data_pipelines.sources import open_tf_dataset

        ds = open_tf_dataset(self.path, self.split)
        return ds.map(lambda r: {f: r[f] if f == "task" else tf.cast(r[f], RECORD_SIGNATURE[f].dtype)
                                 for f in RECORD_FIELDS})

    def sample(self, n: int) -> list:
        """The first n records as numpy dicts (TFDS shuffles records at build time, so the head
        of a split is a fair sample for mean token counts)."""
        out = []
        for x in self.dataset().take(n).as_numpy_iterator():
            out.append({**x, "task": x["task"].decode("utf-8")})
        return out


def split_dataset(src) -> tf.data.Dataset:
    return src.dataset() if isinstance(src, TFRecordSplit) else records_dataset(src)


def build_splits_of(path: str) -> dict:
    """{split: source} of a built folder: random access for ArrayRecord builds, TFRecordSplit
    for TFRecord ones."""
    from data_pipelines.sources import build_splits, open_source

    fmt, sizes = build_splits(path)
    if fmt == "array_record":
        return {s: open_source(path, s) for s in sizes}
    return {s: TFRecordSplit(path, s, n) for s, n in sizes.items()}


# Rendering ----------------------------------------------------------------------------------------
TASK_FEATURE_NAMES = ("tokens", "loss_weights", "task_id", "clip_positions", "clip_frames",
                      "clip_mel", "clip_mel_frames")


def _arrays(e: Rendered, layout: AudioLayout) -> tuple:
    """Rendered -> fixed-rank arrays (tf.numpy_function returns a flat tuple)."""
    c = len(e.clips)
    t, m = (layout.mel_frames, layout.n_mels) if layout.enabled else (0, 0)
    mel = np.zeros((c, t, m), np.float16)
    for i, (_, _, w) in enumerate(e.clips):
        mel[i, :len(w)] = w
    return (e.tokens, e.loss_weights, np.int32(e.task),
            np.asarray([p for p, _, _ in e.clips], np.int32).reshape(c),
            np.asarray([n for _, n, _ in e.clips], np.int32).reshape(c),
            mel, np.asarray([len(w) for _, _, w in e.clips], np.int32).reshape(c))


def check_record_features(ds: tf.data.Dataset, where: str) -> None:
    missing = [f for f in RECORD_FIELDS if f not in ds.element_spec]
    if missing:
        raise ValueError(f"{where} does not emit the record feature(s) {', '.join(missing)}: a "
                         f"SeqIO task read by data.source=seqio must output {', '.join(RECORD_FIELDS)} "
                         f"(ualm_jax/format/records.py); it outputs {', '.join(ds.element_spec)}")


def render_preprocessor(ds: tf.data.Dataset, renderer: Renderer) -> tf.data.Dataset:
    """Records -> rendered features. The CFG key's index is the record's position in this task's
    stream, as the Grain path keys by position in its task stream."""
    layout, k = renderer.layout, renderer.k

    def py(index, *fields):
        rec = dict(zip(RECORD_FIELDS, fields))
        rec["task"] = bytes(rec["task"]).decode("utf-8")
        return _arrays(renderer(int(index), rec), layout)

    def fn(index, rec):
        out = tf.numpy_function(py, [index] + [rec[f] for f in RECORD_FIELDS],
                                [tf.int32, tf.float32, tf.int32, tf.int32, tf.int32, tf.float16,
                                 tf.int32], stateful=False)
        t, m = (layout.mel_frames, layout.n_mels) if layout.enabled else (0, 0)
        shapes = ([None, k], [None, k], [], [None], [None], [None, t, m], [None])
        for x, s in zip(out, shapes):
            x.set_shape(s)
        feats = dict(zip(TASK_FEATURE_NAMES, out))
        return feats if layout.enabled else {n: feats[n] for n in TASK_FEATURE_NAMES[:3]}

    return ds.enumerate().map(fn, num_parallel_calls=1, deterministic=True)


def rendered_of(x: Mapping, layout: AudioLayout) -> Rendered:
    """One rendered element (numpy) -> Rendered."""
    clips = ()
    if layout.enabled:
        clips = [(int(p), int(n), x["clip_mel"][i, :int(m)]) for i, (p, n, m) in
                 enumerate(zip(x["clip_positions"], x["clip_frames"], x["clip_mel_frames"]))]
    return Rendered(int(x["task_id"]), x["tokens"], x["loss_weights"], clips)


# Registration -------------------------------------------------------------------------------------
def record_features() -> dict:
    """The record fields as seqio output features (seqio keeps only declared features)."""
    ids = seqio.PassThroughVocabulary(size=0)
    feat = functools.partial(seqio.Feature, ids, add_eos=False, required=False)
    ranks = {"task": 0, "codes": 2, "mel": 2}
    return {f: feat(dtype=RECORD_SIGNATURE[f].dtype, rank=ranks.get(f, 1)) for f in RECORD_FIELDS}


def interleave_sample_fn(datasets: Sequence[tf.data.Dataset], rates: Sequence[float],
                         seed=None) -> tf.data.Dataset:
    """A seqio Mixture `sample_fn`: the Grain path's deterministic weighted interleave (its first
    n elements hold within 1 of n x rate_i elements of task i), instead of random sampling."""
    if len(datasets) == 1:
        return datasets[0]
    select = WeightedInterleave(list(rates))

    def choice(k):
        return np.int64(select[int(k)][0])

    choices = tf.data.Dataset.range(np.iinfo(np.int64).max).map(
        lambda k: tf.ensure_shape(tf.numpy_function(choice, [k], tf.int64, stateful=False), []))
    return tf.data.Dataset.choose_from_datasets(list(datasets), choices, stop_on_empty_dataset=True)


def _split_sources(source, split: str) -> dict:
    """A source, or a mapping split -> source."""
    return dict(source) if isinstance(source, Mapping) else {split: source}


def register_tasks(sources: Mapping[str, object], cfg_data, vocab: JointVocab, seq_len: int,
                   seed: int = 0, n_mels: int = 0, mel_frames: int = 0, frames_per_window: int = 0,
                   split: str = "train", prefix: str = "",
                   mean_tokens: Optional[Mapping[str, float]] = None,
                   estimate_records: int = 512, shuffle_buffer: int = 256,
                   stream_weights=None) -> tuple[list, str]:
    """Register one record-level seqio Task per `cfg_data.mixture` entry (named after the entry,
    `{prefix}_{name}` with a prefix) and a Mixture (`{prefix or 'ualm'}_mixture`) whose rates
    realise the token-share targets, mixed by the Grain path's interleave. sources: task name ->
    source (random access, or TFRecordSplit), or -> {split: source}. Re-registering the same names
    replaces them. -> (task names, mixture name)."""
    get = (lambda n, d=None: cfg_data.get(n, d)) if isinstance(cfg_data, Mapping) else (
        lambda n, d=None: getattr(cfg_data, n, d))
    entries = mix.parse_mixture(get("mixture", []))
    layout = AudioLayout(n_mels, mel_frames, frames_per_window, int(get("max_clips_per_row", 0) or 0))
    split_sources = {e.name: _split_sources(sources[e.name], split) for e in entries}
    for e in entries:
        if split not in split_sources[e.name]:
            raise ValueError(f"mixture task {e.name!r} has no {split!r} split; it has "
                             f"{', '.join(split_sources[e.name])}")
    renderers = {e.name: Renderer(vocab, layout, i, seed, 0.0, f"mixture task {e.name!r}",
                                  supervise_headers=str(get("supervise_headers", "assistant")),
                                  stream_weights=stream_weights,
                                  text_id0_as_pad=bool(get("text_id0_as_pad", False)))
                 for i, e in enumerate(entries)}
    lengths = {n: functools.partial(r.packed_length, seq_len=seq_len) for n, r in renderers.items()}
    samples = {n: (s[split].sample(estimate_records) if isinstance(s[split], TFRecordSplit)
                   else s[split]) for n, s in split_sources.items()}
    means = mix.resolve_mean_tokens(entries, samples, lengths, mean_tokens, estimate_records)
    rates = mix.sampling_weights(entries, means)
    names = []
    for e in entries:
        name = f"{prefix}_{e.name}" if prefix else e.name
        srcs = split_sources[e.name]
        seqio.TaskRegistry.remove(name)
        seqio.TaskRegistry.add(
            name,
            source=seqio.FunctionDataSource(
                functools.partial(_dataset_fn, srcs), splits=list(srcs),
                num_input_examples={s: len(v) for s, v in srcs.items()}),
            preprocessors=[], output_features=record_features(),
            shuffle_buffer_size=int(shuffle_buffer))
        names.append(name)
    mixture_name = f"{prefix or 'ualm'}_mixture"
    seqio.MixtureRegistry.remove(mixture_name)
    seqio.MixtureRegistry.add(mixture_name, [(n, rates[e.name]) for n, e in zip(names, entries)
                                             if rates[e.name] > 0], sample_fn=interleave_sample_fn)
    return names, mixture_name


def _dataset_fn(sources: Mapping[str, object], split: str, shuffle_files: bool = False,
                seed: Optional[int] = None) -> tf.data.Dataset:
    """FunctionDataSource's dataset_fn: records in stored order (seqio shards examples i::n, the
    Grain path's host split; shuffling is the Task's buffer)."""
    if split not in sources:
        raise ValueError(f"no {split!r} split; have {', '.join(sources)}")
    return split_dataset(sources[split])


# Mixing rendered tasks ----------------------------------------------------------------------------
def provider_tasks(name: str, order: Sequence[str] = ()) -> tuple[list, list, Callable]:
    """A registered seqio Mixture or Task -> (tasks, rates normalised, sample_fn). seqio orders a
    Mixture's tasks by name; `order` (task names) puts those it names first, in its order (our
    builds' Mixture: the data.mixture order, which the Grain interleave follows)."""
    try:
        provider = seqio.get_mixture_or_task(name)
    except ValueError as e:
        known = sorted(set(seqio.MixtureRegistry.names()) | set(seqio.TaskRegistry.names()))
        raise ValueError(f"{name!r} is not a registered seqio Mixture or Task (registered: "
                         f"{', '.join(known) or 'none'}; register it in a module named by "
                         f"data.seqio.modules)") from e
    if isinstance(provider, seqio.Mixture):
        rank = {n: i for i, n in enumerate(order)}
        tasks = sorted(provider.tasks, key=lambda t: (rank.get(t.name, len(rank)), t.name))
        rates = [float(provider.get_rate(t)) for t in tasks]
        sample_fn = getattr(provider, "_sample_fn", None) or functools.partial(
            tf.data.Dataset.sample_from_datasets, stop_on_empty_dataset=True)
    else:
        tasks, rates, sample_fn = [provider], [1.0], interleave_sample_fn
    total = sum(rates)
    if not total > 0:
        raise ValueError(f"seqio mixture {name!r} has no task with a positive rate")
    return tasks, [r / total for r in rates], sample_fn


def rendered_mixture(tasks: Sequence, rates: Sequence[float], sample_fn: Callable,
                     renderers: Sequence[Renderer], split: str = "train", shuffle: bool = True,
                     seed: int = 0, shard_index: int = 0, num_shards: int = 1,
                     num_epochs: Optional[int] = None) -> tf.data.Dataset:
    """Each task's records (its own source and preprocessors; this host's shard; shuffled by its
    buffer; repeated) rendered by its renderer (task id = its index), mixed by sample_fn. Tasks
    without `split` are left out (held-out data is optional per task)."""
    datasets, kept = [], []
    for task, rate, renderer in zip(tasks, rates, renderers):
        if split not in task.splits:
            continue
        ds = task.get_dataset(sequence_length=None, split=split, use_cached=False, shuffle=shuffle,
                              seed=seed, shard_info=seqio.ShardInfo(shard_index, num_shards),
                              num_epochs=num_epochs, trim_output_features=False,
                              try_in_mem_cache=False)  # an in-memory cache would enter the state
        check_record_features(ds, f"seqio task {task.name!r}")
        ds = ds.map(lambda x: {f: x[f] for f in RECORD_FIELDS})
        datasets.append(render_preprocessor(ds, renderer))
        kept.append(rate)
    if not datasets:
        raise ValueError(f"no task of the seqio mixture has a {split!r} split")
    total = sum(kept)
    out = sample_fn(datasets, [r / total for r in kept], seed)
    opts = tf.data.Options()
    opts.deterministic = True
    return out.with_options(opts)


# Packing ------------------------------------------------------------------------------------------
class StreamPacker(Packer):
    """Packs rendered examples read from an iterator of rendered numpy features (finite or not);
    `index` counts the examples read."""

    def __init__(self, elements, rows: int, seq_len: int, k: int, layout: AudioLayout,
                 lookahead: int, task_names: Sequence[str] = (), fingerprint: Optional[dict] = None):
        super().__init__(rows, seq_len, k, layout, lookahead, task_names, fingerprint)
        self.elements, self.read_count = elements, 0

    def _element(self) -> Mapping:
        return next(self.elements)

    def _fetch(self) -> Rendered:
        e = rendered_of(self._element(), self.layout)
        e.index = self.read_count
        self.read_count += 1
        return e


class PackedStreamsConverter(seqio.FeatureConverter):
    """Rendered examples -> packed rows of the Grain batch contract (one row per element; batch
    with ds.batch(B)): tokens [L,K], loss_weights [L,K], segment_ids, positions, task_ids [L]
    and, with an audio layout, audio_features [F,T_mel,n_mels], audio_mel_mask, audio_slots.

    Packs with the Grain path's first-fit packer over `rows` rows at a time; examples longer than
    L (or with more clips than F) are skipped and counted in `counts`. seqio's base is told
    pack=False (its packing path is 1-D only); the packing is ours. (The trainer packs the same
    way outside tf.data, so that its position can be checkpointed: seqio_pipeline.py.)
    """

    TASK_FEATURES = {}
    MODEL_FEATURES = {}

    def __init__(self, vocab: JointVocab, layout: AudioLayout = AudioLayout(), rows: int = 8,
                 lookahead: int = 16):
        spec = seqio.FeatureConverter.FeatureSpec
        self.layout, self.k = layout, max(vocab.num_codebooks, 1)
        self.rows, self.lookahead = rows, lookahead
        self.TASK_FEATURES = {"tokens": spec(tf.int32, rank=2),
                              "loss_weights": spec(tf.float32, rank=2),
                              "task_id": spec(tf.int32, rank=0)}
        self.MODEL_FEATURES = {"tokens": spec(tf.int32, rank=2),
                               "loss_weights": spec(tf.float32, rank=2),
                               "segment_ids": spec(tf.int32), "positions": spec(tf.int32),
                               "task_ids": spec(tf.int32)}
        if layout.enabled:
            self.TASK_FEATURES.update(clip_positions=spec(tf.int32), clip_frames=spec(tf.int32),
                                      clip_mel=spec(tf.float16, rank=3),
                                      clip_mel_frames=spec(tf.int32))
            self.MODEL_FEATURES.update(audio_features=spec(tf.float32, rank=3),
                                       audio_mel_mask=spec(tf.bool, rank=2),
                                       audio_slots=spec(tf.int32))
        self.counts = {"examples": 0, "rows": 0, "skipped_too_long": 0, "skipped_too_many_clips": 0}
        super().__init__(pack=False, apply_length_check=False)

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict:
        n = task_feature_lengths["tokens"]
        out = {k: n for k in ("tokens", "loss_weights", "segment_ids", "positions", "task_ids")}
        if self.layout.enabled:
            out.update(audio_features=self.layout.max_clips, audio_mel_mask=self.layout.max_clips,
                       audio_slots=n)
        return out

    def _rows(self, ds: tf.data.Dataset, seq_len: int):
        packer = StreamPacker(ds.as_numpy_iterator(), self.rows, seq_len, self.k, self.layout,
                              self.lookahead)
        keys = ("examples", "skipped_too_long", "skipped_too_many_clips")
        try:
            for batch in packer:
                for r in range(self.rows):
                    if batch["segment_ids"][r].any():
                        self.counts["rows"] += 1
                        yield {k: v[r] for k, v in batch.items()}
                self.counts.update({k: packer.counts[k] for k in keys})
        finally:  # the skips read at the end of the stream count too
            self.counts.update({k: packer.counts[k] for k in keys})

    def _convert_features(self, ds: tf.data.Dataset,
                          task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        n, k, lay = task_feature_lengths["tokens"], self.k, self.layout
        sig = {"tokens": tf.TensorSpec([n, k], tf.int32),
               "loss_weights": tf.TensorSpec([n, k], tf.float32),
               "segment_ids": tf.TensorSpec([n], tf.int32), "positions": tf.TensorSpec([n], tf.int32),
               "task_ids": tf.TensorSpec([n], tf.int32)}
        if lay.enabled:
            sig.update(audio_features=tf.TensorSpec([lay.max_clips, lay.mel_frames, lay.n_mels],
                                                    tf.float32),
                       audio_mel_mask=tf.TensorSpec([lay.max_clips, lay.mel_frames], tf.bool),
                       audio_slots=tf.TensorSpec([n], tf.int32))
        return tf.data.Dataset.from_generator(lambda: self._rows(ds, n), output_signature=sig)


def task_feature_lengths(seq_len: int, layout: AudioLayout) -> dict:
    """The task_feature_lengths seqio wants for PackedStreamsConverter."""
    return {"tokens": seq_len, "loss_weights": seq_len, "task_id": 0, "clip_positions": 0,
            "clip_frames": 0, "clip_mel": 0, "clip_mel_frames": 0} if layout.enabled else {
        "tokens": seq_len, "loss_weights": seq_len, "task_id": 0}


def get_packed_dataset(mixture_or_task: str, seq_len: int, vocab: JointVocab,
                       layout: AudioLayout = AudioLayout(), split: str = "train",
                       shuffle: bool = True, seed: int = 0, shard_index: int = 0,
                       num_shards: int = 1, num_epochs: Optional[int] = 1,
                       converter: Optional[PackedStreamsConverter] = None,
                       cfg_dropout: float = 0.0, order: Sequence[str] = (),
                       **renderer_args) -> tf.data.Dataset:
    """Packed rows of the batch contract from a registered Mixture or Task of record features
    (rendered here, then packed by the converter): the SeqIO-tooling view of what the trainer
    reads. order: see provider_tasks. renderer_args: Renderer keywords (supervise_headers, stream_weights, text_id0_as_pad)."""
    tasks, rates, sample_fn = provider_tasks(mixture_or_task, order)
    renderers = [Renderer(vocab, layout, i, seed, cfg_dropout, f"seqio task {t.name!r}",
                          **renderer_args) for i, t in enumerate(tasks)]
    ds = rendered_mixture(tasks, rates, sample_fn, renderers, split, shuffle, seed, shard_index,
                          num_shards, num_epochs)
    conv = converter or PackedStreamsConverter(vocab, layout)
    return conv(ds, task_feature_lengths(seq_len, layout))
