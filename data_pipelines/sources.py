"""Reading built records back: a build folder's report and settings, its tokenizer and codec,
and its records as a random-access source (Grain) or a tf.data.Dataset (SeqIO). The trainer
reads builds through this module alone; writing them is data_pipelines/build.py.

    src = open_source("out/caps", "train")      # random access, records as numpy dicts
    task, segments, mels = from_record(src[0], frames_of=encoder_frames_of_mel)
"""
from __future__ import annotations

import os

import numpy as np

import ualm_jax.storage as storage

REPORT_FILE = "build_report.json"
STATS_FILE = "stats.json"
TOKENIZER_FILE = "tokenizer.json"  # the build's copy of its tokenizer
CODEC_DIR = "codec"  # the build's copy of a small codec (a SpectralCodec)


def _dataset_dir(out_dir: str) -> str:
    report = read_report(out_dir)
    if report is None:
        raise FileNotFoundError(f"no {REPORT_FILE} in {out_dir}: not a build output folder (build "
                                f"it first: `ualm data build KIND --manifest M --out {out_dir}`; the "
                                "demo's datasets are built by `make demo`)")
    rel = report.get("dataset_dir")
    if rel is None:
        raise ValueError(f"the build in {out_dir} wrote no records (see {REPORT_FILE})")
    return storage.join(os.fspath(out_dir), rel)


def read_report(out_dir: str) -> dict | None:
    """A build folder's build_report.json, or None when it has none."""
    import json

    path = storage.join(os.fspath(out_dir), REPORT_FILE)
    if not storage.exists(path):
        return None
    with storage.open_file(path, "r") as f:
        return json.load(f)


def build_artefacts(out_dir: str) -> dict:
    """{"tokenizer": path of the build's tokenizer copy or None, "codec": the folder of the codec
    it was built with or None} of a build folder, as paths that resolve where the folder now is
    (copies inside it are joined to it; a neural codec's absolute path or URL is kept). Older
    reports' "spectral:DIR" reads as DIR."""
    from data_pipelines.codecs import codec_dir

    out_dir = os.fspath(out_dir)
    base = out_dir if storage.is_url(out_dir) else os.path.abspath(out_dir)
    report = read_report(out_dir) or {}

    def inside(rel):
        if not rel:
            return None
        rel = codec_dir(rel)
        return rel if storage.is_url(rel) or os.path.isabs(rel) else storage.join(base, rel)

    return {"tokenizer": inside(report.get("tokenizer")), "codec": inside(report.get("codec"))}


def build_settings(out_dir: str) -> dict:
    """The builder settings a build recorded (its report's `settings`: kind, task, n_mels,
    text_vocab_size, num_codebooks, codebook_size, ...); {} for a build without them."""
    return (read_report(out_dir) or {}).get("settings") or {}


def holds_encoder_audio(settings: dict) -> bool:
    """Whether a build's records carry clips for the audio encoder (captioning, audio QA and
    reasoning records; not text-to-audio or text), from its `build_settings`."""
    return settings.get("kind") in ("audio-qa", "reason") or (
        settings.get("kind") == "captions" and settings.get("task") != "t2a")


def check_build_matches_model(out_dir: str, model_cfg, where: str) -> None:
    """Refuses (naming both values) a build whose features the model cannot read: mel bins of
    encoder-input audio, codec K / C of audio codes, a tokenizer larger than the text vocab."""
    s = build_settings(out_dir)
    if not s:
        return
    enc = model_cfg.audio_encoder
    has_mel = holds_encoder_audio(s)
    if has_mel and enc.enabled and s.get("n_mels") not in (None, enc.n_mels):
        raise ValueError(f"{where} ({out_dir}) was built with --n-mels {s['n_mels']} but "
                         f"model.audio_encoder.n_mels={enc.n_mels}: rebuild it with "
                         f"--n-mels {enc.n_mels} or set model.audio_encoder.n_mels={s['n_mels']}")
    k, c = int(s.get("num_codebooks") or 0), int(s.get("codebook_size") or 0)
    if k and (k, c) != (model_cfg.num_codebooks, model_cfg.codebook_size):
        raise ValueError(f"{where} ({out_dir}) holds codes of a codec with {k} codebooks of {c} "
                         f"but the model has model.num_codebooks={model_cfg.num_codebooks}, "
                         f"model.codebook_size={model_cfg.codebook_size}")
    vocab = s.get("text_vocab_size")
    if vocab and int(vocab) > model_cfg.text_vocab_size:
        raise ValueError(f"{where} ({out_dir}) was tokenised with a {vocab}-entry tokenizer but "
                         f"model.text_vocab_size={model_cfg.text_vocab_size}")


def _decode_text(rec):
    """tfds gives Text features as bytes: `task` (at any depth) back to str."""
    if isinstance(rec, dict):
        return {k: _decode_text(v) for k, v in rec.items()}
    return rec.decode("utf-8") if isinstance(rec, bytes) else rec


_INT_FIELDS = ("roles", "modalities", "kinds", "lengths", "text")
_RECORD_FIELDS = frozenset(("task", "codes", "mel") + _INT_FIELDS)


class CorruptRecordError(ValueError):
    """A stored record that cannot be read back (a truncated or damaged shard)."""


_DECODE_ERRORS: tuple = ()


def _decode_errors() -> tuple:
    """What reading a damaged record raises: ArrayRecord's RuntimeError, protobuf's DecodeError,
    and the IndexError / KeyError / ValueError of decoding an empty or partial example."""
    global _DECODE_ERRORS
    if not _DECODE_ERRORS:
        from google.protobuf.message import DecodeError

        _DECODE_ERRORS = (IndexError, KeyError, ValueError, TypeError, RuntimeError, DecodeError)
    return _DECODE_ERRORS


class RecordSource:
    """Random access over built records (len, [i]), each a numpy dict with `task` as str.
    Grain can read it directly (`grain.MapDataset.source(src)`). A record that cannot be decoded
    (e.g. a truncated shard, which reads back as empty records) raises CorruptRecordError naming
    the shard file.

    Records of the flat schema (records.to_record) are decoded straight from their protobuf
    (~5 us) instead of through TFDS's generic feature decoder (~85 us, a third of a short
    example's whole pipeline cost); other schemas (preference pairs) go through TFDS."""

    def __init__(self, source, features=None, where: str = ""):
        self._source = source
        self._where = where
        self._raw = None
        if features is not None and set(features.keys()) == _RECORD_FIELDS \
                and hasattr(source, "data_source"):
            from tensorflow_datasets.proto import tf_example_pb2

            self._raw, self._example = source.data_source, tf_example_pb2.Example
            self._code_columns = int(features["codes"].shape[1])
            self._n_mels = int(features["mel"].shape[1])

    def __len__(self) -> int:
        return len(self._source)

    def _shard(self, index: int) -> str:
        """The file holding record `index` (ArrayRecord sources), else the dataset folder."""
        ds = getattr(self._source, "data_source", self._source)
        try:
            reader, _ = ds._reader_idx_and_position(index)
            return os.fspath(ds._read_instructions[reader].filename)
        except Exception:  # another source type: name what we know
            return self._where or "the dataset"

    def _corrupt(self, index: int, e: BaseException) -> CorruptRecordError:
        return CorruptRecordError(
            f"record {index} of {self._shard(index)} cannot be read ({type(e).__name__}: {e}): "
            "the shard is truncated or damaged; rebuild it")

    def _decode(self, raw: bytes) -> dict:
        if not raw:  # ArrayRecord gives b"" for records of a shard that lost its end
            raise ValueError("empty record")
        f = self._example.FromString(raw).features.feature
        out = {"task": f["task"].bytes_list.value[0].decode("utf-8")}
        for key in _INT_FIELDS:
            out[key] = np.asarray(f[key].int64_list.value, np.int32)
        codes = np.asarray(f["codes"].int64_list.value, np.int32)
        c = self._code_columns
        out["codes"] = codes.reshape(-1, c) if c else np.zeros((0, 0), np.int32)
        mel = f["mel"].bytes_list.value
        out["mel"] = np.frombuffer(mel[0] if mel else b"", np.float16).reshape(-1, self._n_mels)
        return out

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):  # a bad index is the caller's error, as it was
            return self._decode(self._raw[index]) if self._raw is not None \
                else _decode_text(self._source[index])
        try:
            if self._raw is not None:
                return self._decode(self._raw[index])
            return _decode_text(self._source[index])
        except Exception as e:
            if isinstance(e, _decode_errors()):
                raise self._corrupt(index, e) from e
            raise

    def __getitems__(self, indices) -> list:
        indices = list(indices)
        try:
            if self._raw is not None:
                return [self._decode(r) for r in self._raw.__getitems__(indices)]
            getitems = getattr(self._source, "__getitems__", None)
            recs = getitems(indices) if getitems else [self._source[i] for i in indices]
            return [_decode_text(r) for r in recs]
        except Exception:  # find the record at fault, one by one, for a message naming it
            for i in indices:
                self[i]
            raise

    def __repr__(self) -> str:
        return f"RecordSource({len(self)} records)"


def open_source(out_dir: str, split: str = "train") -> RecordSource:
    """The ArrayRecord records of one split of a build, as a random-access source."""
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(_dataset_dir(out_dir))
    fmt = builder.info.file_format
    if fmt is not None and getattr(fmt, "value", fmt) != "array_record":
        raise ValueError(f"{out_dir} was built as {getattr(fmt, 'value', fmt)}: random access needs "
                         "array_record; use open_tf_dataset for tf.data / SeqIO")
    if split not in builder.info.splits:
        raise KeyError(f"no split {split!r} in {out_dir}; built: {list(builder.info.splits.keys())}")
    return RecordSource(builder.as_data_source(split), builder.info.features,
                        where=str(builder.data_dir))


def build_splits(out_dir: str) -> tuple[str, dict]:
    """(file format, {split: records}) of a build, from its TFDS metadata."""
    import tensorflow_datasets as tfds

    info = tfds.builder_from_directory(_dataset_dir(out_dir)).info
    fmt = getattr(info.file_format, "value", info.file_format) or "tfrecord"
    return str(fmt), {name: int(s.num_examples) for name, s in info.splits.items()}


def open_tf_dataset(out_dir: str, split: str = "train"):
    """A tf.data.Dataset of the records of a TFRecord build (the SeqIO path), in stored order
    (files one after another: the order ArrayRecord's random access numbers them in)."""
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(_dataset_dir(out_dir))
    if split not in builder.info.splits:
        raise KeyError(f"no split {split!r} in {out_dir}; built: {list(builder.info.splits.keys())}")
    return builder.as_dataset(split=split, shuffle_files=False,
                              read_config=tfds.ReadConfig(interleave_cycle_length=1))
