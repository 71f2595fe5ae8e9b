"""The `Converter` base every builder extends: one parsed manifest line -> records (text ids,
audio checks, codec codes, log-mel, token counts), with the checks that turn a bad line into a
`Skip` naming the problem and the file; and the TFDS features of a stored record.
"""
from __future__ import annotations

import difflib
import math
import os
from typing import Optional, Sequence

import numpy as np
import tensorflow_datasets as tfds

import ualm_jax.storage as storage
from data_pipelines import features as F
from ualm_jax.format.records import to_record
from ualm_jax.format.template import Segment, render
from ualm_jax.format.vocab import JointVocab

from data_pipelines.builders.manifest import COMMON_KEYS, Skip, _short


def encoder_frames_of_mel(n_mel_frames: int) -> int:
    """Encoder frames for a stored mel of n valid frames: pass as `from_record(rec, frames_of=...)`.
    Stored mels hold the valid frames of consecutive 30 s windows, so n * HOP samples is exact."""
    return F.encoder_frames(int(n_mel_frames) * F.HOP)


def require_text(obj: dict, key: str, what: str, allow_empty: bool = False) -> str:
    if key not in obj:
        raise Skip("missing_key", f"missing key {key!r}" + (f" ({what})" if what != key else ""))
    value = obj[key]
    if not isinstance(value, str):
        raise Skip("bad_value", f"{what} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise Skip("empty_text", f"empty {what}")
    return value


def check_keys(obj: dict, known: Sequence[str], where: str = "") -> None:
    """A key outside `known` is a typo or a field no builder reads (`"splt": "validation"` would
    otherwise train the line): Skip unknown_key, naming the close match when there is one."""
    for key in obj:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else "known: " + ", ".join(sorted(known))
            raise Skip("unknown_key", f"unknown key {_short(key)}{where} ({hint})")


def strings(*values) -> list:
    """The non-blank strings among values, stripped (what the builders encode)."""
    return [v.strip() for v in values if isinstance(v, str) and v.strip()]


def paths(*values) -> list:
    """The non-blank strings among values, as written (audio paths: what the builders open)."""
    return [v for v in values if isinstance(v, str) and v.strip()]


def resolve_codec(codec):
    """None | a Codec | a spec `load_codec` reads ('DIR', 'spectral:DIR') -> Codec or None."""
    if codec is None or not isinstance(codec, (str, os.PathLike)):
        return codec
    from data_pipelines.codecs import load_codec

    return load_codec(codec)


def resolve_tokenizer(tokenizer):
    """A TextTokenizer, or a tokenizer.json path (or its folder)."""
    if tokenizer is None or not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from data_pipelines.tokenizer import TextTokenizer

    return TextTokenizer(os.fspath(tokenizer))


class Converter:
    """Manifest line (parsed JSON) -> records. Subclasses set `kind`, `default_task`, `needs_codec`,
    `keys` and implement `check`, `records`, `texts` and `audio_refs`. Instances travel to Beam
    workers, so they hold only picklable things (a codec given as a spec string is loaded lazily
    on each worker)."""

    kind = ""
    default_task = ""
    needs_codec = False
    config_name: Optional[str] = None  # TFDS builder config (captions: which tasks)
    keys: tuple = ()  # the top-level keys this kind reads (COMMON_KEYS are accepted too)
    names_audio = True  # lines name audio files: eval_fraction splits by audio by default

    # What a line holds, without a converter (tokenizer / codec fitting, splits) ----------------
    @classmethod
    def known_keys(cls, data: dict) -> tuple:
        """The keys a line may hold (a kind whose keys depend on the line overrides this)."""
        return tuple(cls.keys) + COMMON_KEYS

    @classmethod
    def texts(cls, data: dict) -> list:
        """The line's text that records encode (stripped, non-blank); never raises."""
        return []

    @classmethod
    def audio_refs(cls, data: dict) -> list:
        """The audio paths the line names, as written (strings only); never raises."""
        return []

    def check_keys(self, data: dict) -> None:
        check_keys(data, self.known_keys(data))

    def __init__(self, *, manifest_dir: str, tokenizer, codec=None, n_mels: int = 128,
                 min_seconds: float = 0.1, max_seconds: float = 600.0, task: Optional[str] = None):
        if tokenizer is None:
            raise ValueError(f"{self.kind} needs a text tokenizer (tokenizer.json)")
        if n_mels < 1:
            raise ValueError(f"n_mels must be positive, got {n_mels}")
        if min_seconds < 0 or max_seconds <= min_seconds:
            raise ValueError(f"need 0 <= min_seconds < max_seconds, got {min_seconds}, {max_seconds}")
        self.manifest_dir = manifest_dir
        self._tokenizer_spec, self._codec_spec = tokenizer, codec
        self._tokenizer = self._codec = self._vocab = None
        self.n_mels = int(n_mels)
        self.min_seconds, self.max_seconds = float(min_seconds), float(max_seconds)
        self.task = task or self.default_task
        if self.needs_codec and self.codec is None:
            raise ValueError(f"{self.kind} ({self.task}) writes codec codes: give a codec")

    def __getstate__(self):
        from data_pipelines.codecs import SpectralCodec

        state = dict(self.__dict__)
        # A neural codec named by a path is reloaded on each worker rather than pickled with its
        # weights; a SpectralCodec (a few arrays) travels as it is.
        by_path = isinstance(self._codec_spec, (str, os.PathLike))
        if by_path and not isinstance(self._codec, SpectralCodec):
            state["_codec"] = None
        return state

    # Lazily loaded parts ---------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = resolve_tokenizer(self._tokenizer_spec)
        return self._tokenizer

    @property
    def codec(self):
        if self._codec is None and self._codec_spec is not None:
            self._codec = resolve_codec(self._codec_spec)
        return self._codec

    @property
    def code_columns(self) -> int:
        """K of the stored codes. Without a codec 1 (always empty): TFDS cannot decode an empty
        array whose fixed dimension is 0."""
        return self.codec.num_codebooks if self.codec is not None else 1

    @property
    def vocab(self) -> JointVocab:
        """The joint vocab token counts are measured in (K = C = 0 without a codec)."""
        if self._vocab is None:
            c = self.codec
            self._vocab = JointVocab(self.tokenizer.vocab_size, c.num_codebooks if c else 0,
                                     c.codebook_size if c else 0)
        return self._vocab

    def metadata(self) -> dict:
        c = self.codec
        return {"kind": self.kind, "task": self.task, "n_mels": self.n_mels,
                "text_vocab_size": self.tokenizer.vocab_size,
                "num_codebooks": c.num_codebooks if c else 0,
                "codebook_size": c.codebook_size if c else 0,
                "codec_frame_rate": float(c.frame_rate) if c else None,
                "codec_sample_rate": int(c.sample_rate) if c else None,
                "min_seconds": self.min_seconds, "max_seconds": self.max_seconds,
                "mel": "Whisper log-mel (16 kHz, 10 ms), valid frames of consecutive 30 s windows"}

    # What subclasses implement ------------------------------------------------------------------
    def check(self, data: dict) -> None:
        """Cheap checks (keys, types, empty text); raise Skip."""

    def records(self, data: dict) -> list:
        """-> [(task, example, tokens)]; raise Skip. Runs the codec / mel."""
        raise NotImplementedError

    def features(self) -> dict:
        """TFDS features of one stored example (default: one record)."""
        return record_features(self.code_columns, self.n_mels)

    # Helpers ------------------------------------------------------------------------------------
    def encode(self, text: str) -> list:
        return list(self.tokenizer.encode(text))

    def tokens(self, segments: Sequence[Segment]) -> int:
        """Rendered sequence length (what the mixture's token shares count)."""
        return len(render(segments, self.vocab))

    def record(self, task: str, segments: Sequence[Segment], mels: Sequence[np.ndarray] = ()) -> tuple:
        rec = to_record(task, segments, mels, num_codebooks=self.code_columns, n_mels=self.n_mels)
        return task, rec, self.tokens(segments)

    def audio_path(self, rel) -> str:
        if not isinstance(rel, str) or not rel.strip():
            raise Skip("bad_value", f"an audio path must be a non-empty string, got {rel!r}")
        return storage.resolve(rel, self.manifest_dir)

    def load_wave(self, rel: str, sr: int) -> np.ndarray:
        """Checked, mono, resampled audio; raise Skip naming the file and the problem."""
        path = self.audio_path(rel)
        with storage.local_copy(path) as local:
            if local is None:
                raise Skip("audio_missing", f"audio file not found: {rel}")
            import soundfile as sf

            try:  # the header first: an absurdly long file is refused before it is decoded
                info = sf.info(local)
            except Exception as e:  # libsndfile's errors vary by format
                raise Skip("audio_unreadable",
                           f"cannot read audio file {rel}: {str(e).replace(local, rel)}") from None
            if info.frames == 0:
                raise Skip("audio_empty", f"audio file {rel} holds no samples")
            self._check_duration(rel, info.frames / info.samplerate)
            try:
                wave = F.load_audio(local, sr)
            except ValueError as e:
                msg = str(e)
                code = ("audio_nan" if "NaN" in msg else
                        "audio_empty" if "no samples" in msg else "audio_unreadable")
                raise Skip(code, msg.replace(local, rel)) from None
        self._check_duration(rel, len(wave) / sr)
        return wave

    def _check_duration(self, rel: str, seconds: float) -> None:
        if seconds < self.min_seconds:
            raise Skip("audio_too_short",
                       f"audio file {rel} lasts {seconds:.3f} s, below min_seconds {self.min_seconds}")
        if seconds > self.max_seconds:
            raise Skip("audio_too_long",
                       f"audio file {rel} lasts {seconds:.2f} s, above max_seconds {self.max_seconds}")

    def mel(self, wave16k: np.ndarray) -> np.ndarray:
        """Encoder input: each 30 s window's Whisper log-mel (padded to 30 s before the log, as
        Whisper does), valid frames only, concatenated; float16 [F, n_mels]."""
        mels, mask = F.window_log_mels(wave16k, self.n_mels)
        return mels[mask].astype(np.float16)

    def user_audio(self, wave16k: np.ndarray, rel: str) -> tuple:
        """-> (Segment with the encoder-frame count, mel)."""
        n = F.encoder_frames(len(wave16k))
        if n <= 0:
            raise Skip("audio_too_short", f"audio file {rel} gives no encoder frames")
        return Segment("user", "audio", n), self.mel(wave16k)

    def codes(self, wave: np.ndarray, sr: int, rel: str) -> np.ndarray:
        codes = np.asarray(self.codec.encode(wave, sr), np.int32)
        if codes.ndim != 2 or codes.shape[0] == 0:
            raise Skip("audio_too_short", f"audio file {rel} gives no codec frames")
        return codes


def record_features(code_columns: int, n_mels: int) -> dict:
    """TFDS features of `records.to_record`'s fields. The mel is stored as raw float16 bytes
    (half the size of a float list); codes as varint ints (small values, compact)."""
    ints = lambda: tfds.features.Tensor(shape=(None,), dtype=np.int32)  # noqa: E731
    return {
        "task": tfds.features.Text(),
        "roles": ints(), "modalities": ints(), "kinds": ints(), "lengths": ints(), "text": ints(),
        "codes": tfds.features.Tensor(shape=(None, code_columns), dtype=np.int32),
        "mel": tfds.features.Tensor(shape=(None, n_mels), dtype=np.float16,
                                    encoding=tfds.features.Encoding.BYTES),
    }


def check_finite(value, what: str) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    try:
        ok = ok and math.isfinite(value)
    except OverflowError:  # an int beyond any float
        ok = False
    if not ok:
        raise Skip("bad_value", f"{what} must be a finite number, got {_short(value)}")
    return float(value)
