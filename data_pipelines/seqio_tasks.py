"""The same tasks as SeqIO Tasks and one Mixture, for the tf.data path (and SeqIO tooling).

Each task reads the same stored records (FunctionDataSource over a random-access source), renders
them with the same Renderer as the Grain path (one template, one CFG-dropout key scheme), and the
Mixture's rates are the example weights that realise the token-share targets (mixture.py).
`PackedStreamsConverter` packs rendered examples into the Grain path's row contract with the same
first-fit packer; seqio's own packers are 1-D only and find lengths by counting non-zero ids,
which breaks on [L, K] rows whose encoder placeholders and CFG-dropped prefixes are pad 0.

SeqIO and TensorFlow are imported here only (~5 s / 900 MB): the Grain path never loads them.
"""
from __future__ import annotations

import functools
from typing import Mapping, Optional

import numpy as np
import seqio
import tensorflow as tf

from data_pipelines import mixture as mix
from data_pipelines.grain_pipeline import (AudioLayout, BatchBuilder, Rendered, Renderer,
                                           fill_batch)
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
_FIELDS = tuple(RECORD_SIGNATURE)


# Source -------------------------------------------------------------------------------------------
def _record_dataset_fn(sources: Mapping[str, object], split: str, shuffle_files: bool = False,
                       seed: Optional[int] = None) -> tf.data.Dataset:
    """A tf.data view of a random-access source of record dicts, in index order (seqio shards
    it as source[i::n], exactly the Grain path's host split)."""
    if split not in sources:
        raise ValueError(f"no {split!r} split; have {', '.join(sources)}")
    src = sources[split]

    def gen():
        for i in range(len(src)):
            rec = src[i]
            yield {f: rec[f] for f in _FIELDS}

    return tf.data.Dataset.from_generator(gen, output_signature=RECORD_SIGNATURE)


# Preprocessor -------------------------------------------------------------------------------------
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


def render_preprocessor(ds: tf.data.Dataset, renderer: Renderer) -> tf.data.Dataset:
    """Records -> rendered features. The CFG key's index is the record's position in this task's
    stream, as the Grain path keys by position in its task stream."""
    layout, k = renderer.layout, renderer.k

    def py(index, *fields):
        rec = dict(zip(_FIELDS, fields))
        return _arrays(renderer(int(index), rec), layout)

    def fn(index, rec):
        out = tf.numpy_function(py, [index] + [rec[f] for f in _FIELDS],
                                [tf.int32, tf.float32, tf.int32, tf.int32, tf.int32, tf.float16,
                                 tf.int32], stateful=False)
        t, m = (layout.mel_frames, layout.n_mels) if layout.enabled else (0, 0)
        shapes = ([None, k], [None, k], [], [None], [None], [None, t, m], [None])
        for x, s in zip(out, shapes):
            x.set_shape(s)
        feats = dict(zip(TASK_FEATURE_NAMES, out))
        return feats if layout.enabled else {n: feats[n] for n in TASK_FEATURE_NAMES[:3]}

    return ds.enumerate().map(fn, num_parallel_calls=1, deterministic=True)


def output_features(vocab: JointVocab, layout: AudioLayout) -> dict:
    """Every rendered feature is declared: seqio Mixtures keep only declared output features."""
    ids = seqio.PassThroughVocabulary(size=vocab.padded_size)
    feat = functools.partial(seqio.Feature, ids, add_eos=False, required=False)
    out = {"tokens": feat(dtype=tf.int32, rank=2), "loss_weights": feat(dtype=tf.float32, rank=2),
           "task_id": feat(dtype=tf.int32, rank=0)}
    if layout.enabled:
        out.update(clip_positions=feat(dtype=tf.int32), clip_frames=feat(dtype=tf.int32),
                   clip_mel=feat(dtype=tf.float16, rank=3), clip_mel_frames=feat(dtype=tf.int32))
    return out


# Registration -------------------------------------------------------------------------------------
def _split_sources(source, split: str) -> dict:
    """A source, or a mapping split -> source."""
    return dict(source) if isinstance(source, Mapping) else {split: source}


def register_tasks(sources: Mapping[str, object], cfg_data, vocab: JointVocab, seq_len: int,
                   seed: int = 0, n_mels: int = 0, mel_frames: int = 0, frames_per_window: int = 0,
                   split: str = "train", prefix: str = "ualm",
                   mean_tokens: Optional[Mapping[str, float]] = None,
                   estimate_records: int = 512) -> tuple[list, str]:
    """Register one seqio Task per `cfg_data.mixture` entry and a Mixture whose rates realise the
    token-share targets. sources: task name -> source, or -> {split: source}. Re-registering the
    same names replaces them. -> (task names, mixture name)."""
    get = (lambda n, d=None: cfg_data.get(n, d)) if isinstance(cfg_data, Mapping) else (
        lambda n, d=None: getattr(cfg_data, n, d))
    entries = mix.parse_mixture(get("mixture", []))
    layout = AudioLayout(n_mels, mel_frames, frames_per_window, int(get("max_clips_per_row", 0) or 0))
    cfg_dropout = float(get("cfg_dropout", 0.0) or 0.0)
    split_sources = {e.name: _split_sources(sources[e.name], split) for e in entries}
    renderers = {e.name: Renderer(vocab, layout, i, seed, cfg_dropout, f"mixture task {e.name!r}",
                                  text_id0_as_pad=bool(get("text_id0_as_pad", False)))
                 for i, e in enumerate(entries)}
    lengths = {n: functools.partial(r.packed_length, seq_len=seq_len) for n, r in renderers.items()}
    means = mix.resolve_mean_tokens(entries, {n: s[split] for n, s in split_sources.items()},
                                    lengths, mean_tokens, estimate_records)
    rates = mix.sampling_weights(entries, means)
    names = []
    for e in entries:
        name = f"{prefix}_{e.name}"
        seqio.TaskRegistry.remove(name)
        seqio.TaskRegistry.add(
            name,
            source=seqio.FunctionDataSource(
                functools.partial(_record_dataset_fn, split_sources[e.name]),
                splits=list(split_sources[e.name]),
                num_input_examples={s: len(v) for s, v in split_sources[e.name].items()}),
            preprocessors=[functools.partial(render_preprocessor, renderer=renderers[e.name])],
            output_features=output_features(vocab, layout))
        names.append(name)
    mixture_name = f"{prefix}_mixture"
    seqio.MixtureRegistry.remove(mixture_name)
    seqio.MixtureRegistry.add(mixture_name, [(n, rates[e.name]) for n, e in zip(names, entries)
                                             if rates[e.name] > 0])
    return names, mixture_name


def task_feature_lengths(seq_len: int, layout: AudioLayout) -> dict:
    """The task_feature_lengths seqio wants for PackedStreamsConverter."""
    return {"tokens": seq_len, "loss_weights": seq_len, "task_id": 0, "clip_positions": 0,
            "clip_frames": 0, "clip_mel": 0, "clip_mel_frames": 0} if layout.enabled else {
        "tokens": seq_len, "loss_weights": seq_len, "task_id": 0}


# Feature converter --------------------------------------------------------------------------------
class PackedStreamsConverter(seqio.FeatureConverter):
    """Rendered examples -> packed rows of the Grain batch contract (one row per element; batch
    with ds.batch(B)): tokens [L,K], loss_weights [L,K], segment_ids, positions, task_ids [L]
    and, with an audio layout, audio_features [F,T_mel,n_mels], audio_mel_mask, audio_slots.

    Packs with the Grain path's first-fit packer over `rows` rows at a time; examples longer than
    L (or with more clips than F) are skipped and counted in `counts`. seqio's base is told
    pack=False (its packing path is 1-D only); the packing is ours.
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

    def _rendered(self, x: dict) -> Rendered:
        clips = ()
        if self.layout.enabled:
            clips = [(int(p), int(n), x["clip_mel"][i, :int(m)]) for i, (p, n, m) in
                     enumerate(zip(x["clip_positions"], x["clip_frames"], x["clip_mel_frames"]))]
        return Rendered(int(x["task_id"]), x["tokens"], x["loss_weights"], clips)

    def _rows(self, ds: tf.data.Dataset, seq_len: int):
        source = ds.as_numpy_iterator()
        max_clips = self.layout.max_clips if self.layout.enabled else 0

        def read():
            while True:
                e = self._rendered(next(source))
                if len(e) > seq_len:
                    self.counts["skipped_too_long"] += 1
                elif len(e.clips) > max_clips:
                    self.counts["skipped_too_many_clips"] += 1
                else:
                    return e

        waiting, exhausted = [], False
        while not exhausted or waiting:
            b = BatchBuilder(self.rows, seq_len, self.k, self.layout)
            waiting, placed, done = fill_batch(b, waiting, read if not exhausted else _empty,
                                               self.lookahead)
            exhausted = exhausted or done
            self.counts["examples"] += placed
            batch = b.finish()
            for r in range(self.rows):
                if b.used[r]:
                    self.counts["rows"] += 1
                    yield {k: v[r] for k, v in batch.items()}

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


def _empty():
    raise StopIteration


def get_packed_dataset(mixture_or_task: str, seq_len: int, vocab: JointVocab,
                       layout: AudioLayout = AudioLayout(), split: str = "train",
                       shuffle: bool = True, seed: Optional[int] = None, shard_index: int = 0,
                       num_shards: int = 1, num_epochs: Optional[int] = 1,
                       converter: Optional[PackedStreamsConverter] = None) -> tf.data.Dataset:
    """seqio.get_dataset with the packing converter: packed rows of the batch contract."""
    conv = converter or PackedStreamsConverter(vocab, layout)
    return seqio.get_dataset(mixture_or_task, task_feature_lengths(seq_len, layout),
                             dataset_split=split, shuffle=shuffle, num_epochs=num_epochs,
                             shard_info=seqio.ShardInfo(shard_index, num_shards), seed=seed,
                             use_cached=False, feature_converter=conv,
                             trim_output_features=False)  # over-long: skipped, never truncated
