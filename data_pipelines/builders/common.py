"""What every manifest builder shares: reading JSON-lines manifests with per-line error capture,
the `Converter` base (text ids, audio checks, codec codes, log-mel, token counts), the build log
that becomes `build_report.json` and `stats.json`, and the TFDS plumbing (features of a stored
record, `ManifestBuilder`, the Beam transform).

Life of one manifest line (`iter_lines`: ends at \n, \r\n or a lone \r):
  1. `parse_line`: JSON object -> its split ("split" field, else a `Splitter`: `eval_fraction`
     by a hash of the line's audio paths or of its parsed content). Malformed lines are logged
     here, once, by the first split's pass; so are lines over the `Limits` (line_too_long,
     too_deep: checked before the JSON parser runs) and numbers too long to convert
     (number_too_long). It raises nothing but Skip.
  2. `Converter.check_keys` (a key the kind does not read is a typo: unknown_key, with the close
     match) then `Converter.check`: cheap structure checks (keys, types, empty text).
  3. `Converter.records`: the expensive part (audio decode, codec, mel), -> records.
Every line ends as exactly one log entry: written (with records and tokens per task) or skipped
(with `code`, a short category, and `reason`, a sentence naming the problem and the file). Nothing
raised by one line stops a build.

Beam: `_generate_examples(split)` yields (key, example) for a plain local build; with Beam options
`ManifestBuilder` returns a PTransform instead that runs the same per-chunk function on workers and
writes its log entries as JSON lines next to the dataset (see data_pipelines/build.py).
"""
from __future__ import annotations

import contextlib
import difflib
import glob
import hashlib
import inspect
import itertools
import json
import math
import os
import posixpath
import re
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import features as F
from ualm_jax.format.records import to_record
from ualm_jax.format.template import Segment, render
from ualm_jax.format.vocab import JointVocab

SPLITS = ("train", "validation")
SPLIT_ALIASES = {"train": "train", "validation": "validation", "valid": "validation",
                 "val": "validation", "eval": "validation", "dev": "validation"}
CHUNK_LINES = 1000  # manifest lines per unit of (Beam) work
LOG_DIR = "_build_log"  # Beam workers' log shards, merged into the report
MAX_LINE_BYTES = 16 << 20  # a longer manifest line is skipped (line_too_long), never read whole
MAX_JSON_DEPTH = 64  # deeper nesting is skipped (too_deep) before the JSON parser recurses
# Keys every kind accepts: the split, and an identifier (make-pairs writes one) no builder reads.
COMMON_KEYS = ("split", "id")
SPLIT_BY = ("audio", "line")  # what eval_fraction hashes (Splitter)


def encoder_frames_of_mel(n_mel_frames: int) -> int:
    """Encoder frames for a stored mel of n valid frames: pass as `from_record(rec, frames_of=...)`.
    Stored mels hold the valid frames of consecutive 30 s windows, so n * HOP samples is exact."""
    return F.encoder_frames(int(n_mel_frames) * F.HOP)


# Errors and log entries ---------------------------------------------------------------------------
class Skip(Exception):
    """A manifest line that cannot become a record. code: short category; reason: for humans."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


MAX_REASON_CHARS = 500  # a reason quoting a huge value from a line is cut


def skipped_entry(line: int, split: Optional[str], skip: Skip) -> dict:
    reason = str(skip.reason)
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[:MAX_REASON_CHARS] + "..."
    return {"line": line, "split": split, "code": str(skip.code), "reason": reason}


# Manifest reading ---------------------------------------------------------------------------------
def _open(path: str, mode: str = "rb"):
    if "://" in str(path):  # gs:// etc. for Beam workers; local files need no etils
        from etils import epath

        return epath.Path(path).open(mode)
    return open(path, mode)


@dataclass(frozen=True)
class Limits:
    """What one manifest line may hold. A line over a limit is skipped (line_too_long, too_deep)
    before it is decoded: no line can exhaust memory or the parser's recursion."""
    max_line_bytes: int = MAX_LINE_BYTES
    max_json_depth: int = MAX_JSON_DEPTH

    def __post_init__(self):
        if self.max_line_bytes < 1 or self.max_json_depth < 1:
            raise ValueError(f"line limits must be positive, got max_line_bytes "
                             f"{self.max_line_bytes}, max_json_depth {self.max_json_depth}")


@dataclass(frozen=True)
class Chunk:
    """A run of manifest lines: bytes [start, stop), first line number (1-based), line count."""
    start: int
    stop: int
    first_line: int
    lines: int


class LongLine:
    """A line read no further than the limit: its size in bytes (terminator excluded)."""

    def __init__(self, size: int):
        self.size = size

    def __repr__(self) -> str:
        return f"LongLine({self.size})"


_EOL = re.compile(rb"[\r\n]")
_BLOCK = 1 << 16


def iter_lines(f, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple]:
    """(end offset, raw) for each line of binary file `f` from where it stands, universal newlines
    (\\n, \\r\\n and a lone \\r each end a line, as Python's text mode has it); raw is the line's
    bytes without its terminator, or a LongLine when it holds more than `max_line_bytes` (the rest
    of such a line is counted, never kept). Offsets are absolute, for byte-offset chunks."""
    pos = f.tell()  # offset of buf[0]
    buf, parts, size = b"", [], 0
    while True:
        if not buf:
            buf = f.read(_BLOCK)
            if not buf:  # end of file: a last line without a terminator still counts
                if size or parts:
                    yield pos, (LongLine(size) if size > max_line_bytes else b"".join(parts))
                return
        m = _EOL.search(buf)
        piece = buf[:m.start()] if m else buf
        size += len(piece)
        if size <= max_line_bytes:
            parts.append(piece)
        else:
            parts = []
        if not m:
            pos, buf = pos + len(buf), b""
            continue
        end = m.end()
        if buf[m.start():end] == b"\r":  # \r\n is one terminator, even across a block boundary
            if end == len(buf):
                pos, buf, end = pos + end, f.read(_BLOCK), 0
            if buf[end:end + 1] == b"\n":
                end += 1
        pos, buf = pos + end, buf[end:]
        yield pos, (LongLine(size) if size > max_line_bytes else b"".join(parts))
        parts, size = [], 0


def json_depth_over(text: str, limit: int) -> bool:
    """Whether JSON `text` nests arrays/objects deeper than `limit`, found without recursion
    (brackets inside strings do not count). Cheap when the line holds few brackets."""
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    for m in _JSON_TOKEN.finditer(text):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > limit:
                return True
        elif c in "]}":
            depth -= 1
    return False


_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]', re.S)
_DIGITS = re.compile(r"\d{%d,}" % (sys.get_int_max_str_digits() + 1 if hasattr(
    sys, "get_int_max_str_digits") else 4301))


def parse_line(raw, splitter: Union["Splitter", float], limits: Limits = Limits()) -> tuple:
    """-> (split, data) or raise Skip; never raises anything else. Blank lines count as input
    lines, so they are skipped too. `splitter`: a Splitter, or an eval_fraction (by line)."""
    try:
        return _parse_line(raw, as_splitter(splitter), limits)
    except Skip:
        raise
    except Exception as e:  # whatever a hostile line triggers: the line is skipped, not the build
        raise Skip("bad_json", f"cannot read the line: {type(e).__name__}: {e}") from None


def _parse_line(raw, splitter: "Splitter", limits: Limits) -> tuple:
    if isinstance(raw, LongLine):
        raise Skip("line_too_long", f"line of {raw.size} bytes, above the limit of "
                                    f"{limits.max_line_bytes} (max_line_bytes)")
    if len(raw) > limits.max_line_bytes:
        raise Skip("line_too_long", f"line of {len(raw)} bytes, above the limit of "
                                    f"{limits.max_line_bytes} (max_line_bytes)")
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise Skip("bad_json", f"line is not UTF-8 text: {e}") from None
    if not text:
        raise Skip("blank_line", "empty line")
    if json_depth_over(text, limits.max_json_depth):
        raise Skip("too_deep", f"JSON nested deeper than {limits.max_json_depth} levels "
                               "(max_json_depth)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise Skip("bad_json", f"malformed JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:
        raise Skip("too_deep", "JSON nested too deeply to parse") from None
    except ValueError as e:  # a number beyond what Python converts (int_max_str_digits)
        m = _DIGITS.search(text)
        where = f" at column {m.start() + 1} ({m.end() - m.start()} digits)" if m else ""
        raise Skip("number_too_long", f"a number too long to read{where}: "
                                      f"{str(e).split(';')[0]}") from None
    if not isinstance(data, dict):
        raise Skip("bad_json", f"a line must hold a JSON object, got {type(data).__name__}")
    split = data.get("split")
    if split is not None:
        if not isinstance(split, str) or split.lower() not in SPLIT_ALIASES:
            raise Skip("bad_value", f"unknown split {_short(split)} (use train or validation)")
        return SPLIT_ALIASES[split.lower()], data
    return splitter.split_of(data), data


def _short(value, n: int = 80) -> str:
    """repr of a value from a line, cut to n characters (lines may hold huge values)."""
    try:
        r = repr(value)
    except Exception as e:  # e.g. an int too long to print
        return f"<{type(value).__name__}: {type(e).__name__}>"
    return r if len(r) <= n else r[:n] + "..."


def _hash_fraction(text: str) -> float:
    """A stable place in [0, 1): content, not position, picks a split, so reordering or appending
    to a manifest moves no example between splits."""
    # surrogatepass: JSON escapes may decode to lone surrogates, which plain UTF-8 refuses.
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def canonical_json(data) -> str:
    """One text per parsed value: re-serialising a line (key order, spacing, escapes) keeps it."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def audio_key(path: str) -> str:
    """An audio path as written, normalised ("./a//b.wav" -> "a/b.wav"): manifests in one folder
    that name one file agree. URLs stay as they are."""
    return path if "://" in path else posixpath.normpath(path.strip())


@dataclass(frozen=True)
class Splitter:
    """The split of a line that names none: "validation" for a share `eval_fraction` of lines,
    picked by a hash of content, never of position.
      by="audio": each audio path the line names (`audio_of`, normalised by `audio_key`) is
        hashed on its own, and the line is held out when ANY of its clips is. A held-out clip is
        therefore validation in every line, manifest and kind that names it, and never trained
        (the same fraction, the same folder layout); a line naming a held-out clip and others
        takes those others with it. A line naming no audio falls back to "line".
      by="line": the parsed JSON, canonically serialised (`canonical_json`)."""
    eval_fraction: float = 0.0
    by: str = "line"
    audio_of: Optional[Callable[[dict], list]] = None  # a converter class's `audio_refs`

    def __post_init__(self):
        if self.by not in SPLIT_BY:
            raise ValueError(f"split_by must be one of {', '.join(SPLIT_BY)}, got {self.by!r}")

    def keys(self, data: dict) -> list:
        """The texts whose hashes decide the line's split."""
        if self.by == "audio" and self.audio_of is not None:
            try:
                paths = [audio_key(p) for p in self.audio_of(data)]
            except Exception:  # a malformed line: it is skipped later, any split will do
                paths = []
            if paths:
                return paths
        return [canonical_json(data)]

    def held_out(self, data: dict) -> bool:
        return self.eval_fraction > 0 and any(
            _hash_fraction(k) < self.eval_fraction for k in self.keys(data))

    def split_of(self, data: dict) -> str:
        return "validation" if self.held_out(data) else "train"


def as_splitter(split: Union[Splitter, float]) -> Splitter:
    return split if isinstance(split, Splitter) else Splitter(float(split))


@dataclass
class Scan:
    lines: int = 0
    candidates: dict = field(default_factory=dict)  # split -> lines that parsed
    chunks: list = field(default_factory=list)
    limits: Limits = field(default_factory=Limits)

    @property
    def splits(self) -> list:
        return [s for s in SPLITS if self.candidates.get(s)]


def scan_manifest(path: str, splitter: Union[Splitter, float], chunk_lines: int = CHUNK_LINES,
                  limits: Limits = Limits()) -> Scan:
    """One streaming pass: line count, parsed lines per split, byte-offset chunks for workers."""
    scan = Scan(limits=limits)
    splitter = as_splitter(splitter)
    with _open(path) as f:
        start, first, n, stop = 0, 1, 0, 0
        for stop, raw in iter_lines(f, limits.max_line_bytes):
            scan.lines += 1
            n += 1
            with contextlib.suppress(Skip):
                split, _ = parse_line(raw, splitter, limits)
                scan.candidates[split] = scan.candidates.get(split, 0) + 1
            if n == chunk_lines:
                scan.chunks.append(Chunk(start, stop, first, n))
                start, first, n = stop, first + n, 0
        if n:
            scan.chunks.append(Chunk(start, stop, first, n))
    return scan


def read_chunk(path: str, chunk: Chunk, limits: Limits = Limits()) -> Iterator[tuple]:
    """(line number, raw bytes or LongLine) for each line of one chunk."""
    with _open(path) as f:
        f.seek(chunk.start)
        lines = iter_lines(f, limits.max_line_bytes)
        for i, (_, raw) in zip(range(chunk.lines), lines):
            yield chunk.first_line + i, raw


# Converters ---------------------------------------------------------------------------------------
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
        if "://" in rel or os.path.isabs(rel):
            return rel
        if "://" in self.manifest_dir:
            return posixpath.join(self.manifest_dir, rel)
        return os.path.join(self.manifest_dir, rel)

    def load_wave(self, rel: str, sr: int) -> np.ndarray:
        """Checked, mono, resampled audio; raise Skip naming the file and the problem."""
        path = self.audio_path(rel)
        with _local_copy(path) as local:
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


@contextlib.contextmanager
def _local_copy(path: str):
    """A local file for soundfile: the path itself, or a temporary copy of a remote object;
    None when it does not exist."""
    if "://" not in path:
        yield path if os.path.isfile(path) else None
        return
    from etils import epath

    src = epath.Path(path)
    if not src.exists():
        yield None
        return
    with tempfile.NamedTemporaryFile(suffix=os.path.splitext(path)[1]) as tmp:
        tmp.write(src.read_bytes())
        tmp.flush()
        yield tmp.name


# One line, one chunk ------------------------------------------------------------------------------
def convert_line(converter: Converter, line: int, split: str, data: dict) -> tuple:
    """-> (examples [(key, example)], log entry). Never raises for a bad line."""
    try:
        converter.check_keys(data)
        converter.check(data)
        written = converter.records(data)
    except Skip as s:
        return [], skipped_entry(line, split, s)
    except Exception as e:  # a bug, an exotic file or a hostile value: log it, keep building
        return [], skipped_entry(line, split, Skip("error", _describe(e)))
    tasks: dict = {}
    for task, _, tokens in written:
        n, t = tasks.get(task, (0, 0))
        tasks[task] = (n + 1, t + int(tokens))
    examples = [(f"{line:010d}/{task}/{i}", ex) for i, (task, ex, _) in enumerate(written)]
    return examples, {"line": line, "split": split, "records": {k: list(v) for k, v in tasks.items()}}


def _describe(e: BaseException) -> str:
    try:
        return f"{type(e).__name__}: {e}"
    except Exception:  # an exception whose message cannot be formed
        return type(e).__name__


def chunk_outcomes(converter: Converter, manifest: str, chunk: Chunk, split: str,
                   splitter: Union[Splitter, float], log_unparsed: bool,
                   limits: Limits = Limits()) -> Iterator[tuple]:
    """(examples, log entry) for each line of `chunk` in `split`; lines that do not parse are
    logged only when `log_unparsed` (one split's pass owns them, so each is logged once)."""
    for line, raw in read_chunk(manifest, chunk, limits):
        try:
            line_split, data = parse_line(raw, splitter, limits)
        except Skip as s:
            if log_unparsed:
                yield [], skipped_entry(line, None, s)
            continue
        if line_split == split:
            yield convert_line(converter, line, split, data)


# Report and stats ---------------------------------------------------------------------------------
def summarize(kind: str, entries: Iterable[dict], lines: int, built_splits: Sequence[str]) -> tuple:
    """Log entries -> (report, stats). written + skipped == lines when every line was logged."""
    entries = sorted(entries, key=lambda e: e["line"])
    skipped = [e for e in entries if "code" in e]
    written = [e for e in entries if "records" in e]
    stats, by_code = {}, {}
    for e in skipped:
        by_code[e["code"]] = by_code.get(e["code"], 0) + 1
    for e in written:
        s = stats.setdefault(e["split"], {"lines": 0, "records": 0, "tokens": 0, "tasks": {}})
        s["lines"] += 1
        for task, (n, tokens) in e["records"].items():
            t = s["tasks"].setdefault(task, {"records": 0, "tokens": 0})
            t["records"] += n
            t["tokens"] += tokens
            s["records"] += n
            s["tokens"] += tokens
    for s in stats.values():
        for t in s["tasks"].values():
            t["mean_tokens"] = t["tokens"] / t["records"]
    stats = {k: stats[k] for k in SPLITS if k in stats and k in built_splits}
    report = {
        "kind": kind, "lines": lines, "written": len(written), "skipped": len(skipped),
        "splits": {k: {"lines": v["lines"], "records": v["records"]} for k, v in stats.items()},
        "skipped_by_code": dict(sorted(by_code.items())),
        "skipped_lines": [{k: e[k] for k in ("line", "code", "reason")} for e in skipped],
        # Which lines were held out, so another build (or a person) can check for leaks.
        "validation_lines": [e["line"] for e in written if e["split"] == "validation"],
    }
    if len(written) + len(skipped) != lines:
        report["unaccounted_lines"] = lines - len(written) - len(skipped)
    return report, stats


def write_json(path: str, obj) -> None:
    if "://" in str(path):
        from etils import epath

        epath.Path(path).write_text(json.dumps(obj, indent=2))
        return
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def read_beam_logs(log_dir: str) -> list:
    """Log entries the Beam workers wrote (JSON lines)."""
    if "://" in log_dir:
        from etils import epath

        files = sorted(str(p) for p in epath.Path(log_dir).glob("*.jsonl*"))
    else:
        files = sorted(glob.glob(os.path.join(log_dir, "*.jsonl*")))
    entries = []
    for path in files:
        with _open(path, "r") as f:
            entries += [json.loads(x) for x in f if x.strip()]
    return entries


# TFDS ---------------------------------------------------------------------------------------------
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


@dataclass
class BuildPlan:
    """What a builder needs to write a dataset (kept separate so Beam gets a small object)."""
    converter: Converter
    manifest: str
    scan: Scan
    splitter: Splitter = field(default_factory=Splitter)
    beam_log_dir: Optional[str] = None  # set: generate with Beam

    @property
    def limits(self) -> Limits:
        return self.scan.limits


class ManifestBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A TFDS builder over one manifest. Subclasses set `name`, `converter_cls` (and configs where
    they have any); `build.build` makes the converter and the plan."""

    converter_cls = Converter
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Records of ualm_jax.format.records (to_record fields)."}

    # TFDS prints "Downloading and preparing dataset ..." and "... downloaded and prepared" for
    # every build although nothing downloads; `ualm data build` prints its own summary instead.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # TFDS's own lookup for builders inside a package needs `importlib_resources`, which the
        # stack does not install; the source file is all it wants (for checksum files: none here).
        from etils import epath

        return epath.Path(inspect.getfile(cls))

    def __init__(self, *, plan: BuildPlan, **kwargs):
        self.plan = plan
        self.log: list = []  # local builds: one entry per line, filled while the splits are written
        super().__init__(**kwargs)

    def _info(self):
        conv = self.plan.converter
        return tfds.core.DatasetInfo(
            builder=self, description=f"UALM {conv.kind} records ({conv.task}) from a manifest.",
            features=tfds.features.FeaturesDict(conv.features()),
            metadata=tfds.core.MetadataDict(conv.metadata()))

    def _split_generators(self, dl_manager):
        gens = {}
        for i, split in enumerate(self.plan.scan.splits):
            if self.plan.beam_log_dir is not None:
                gens[split] = beam_split(self.plan, split, log_unparsed=i == 0)
                continue
            # A split whose every line fails would make TFDS raise ("No examples were yielded"):
            # start each generator here and declare only splits that yield something.
            gen = self._generate_examples(split, log_unparsed=i == 0)
            first = next(gen, None)
            if first is not None:
                gens[split] = itertools.chain([first], gen)
            else:
                gen.close()
        return gens

    def _generate_examples(self, split: str, log_unparsed: bool = False):
        """Yields (key, example); the line's log entry goes to self.log."""
        from tqdm import tqdm

        p = self.plan
        total = sum(c.lines for c in p.scan.chunks)
        # Progress with ETA on a terminal (tqdm disables itself when stderr is not one).
        with tqdm(total=total, desc=f"building {split}", unit="line", disable=None,
                  leave=False) as bar:
            for chunk in p.scan.chunks:
                for examples, entry in chunk_outcomes(p.converter, p.manifest, chunk, split,
                                                      p.splitter, log_unparsed, p.limits):
                    self.log.append(entry)
                    bar.update(1)
                    yield from examples


def beam_split(plan: BuildPlan, split: str, log_unparsed: bool):
    """The Beam version of `_generate_examples`: chunks of lines fan out to workers; examples go to
    TFDS, log entries to `plan.beam_log_dir/<split>-*.jsonl`."""
    import apache_beam as beam

    class ConvertChunk(beam.DoFn):
        def process(self, chunk):
            for examples, entry in chunk_outcomes(plan.converter, plan.manifest, chunk, split,
                                                  plan.splitter, log_unparsed, plan.limits):
                yield from examples
                yield beam.pvalue.TaggedOutput("log", json.dumps(entry))

    @beam.ptransform_fn
    def generate(pipeline):
        out = (pipeline
               | "Chunks" >> beam.Create(plan.scan.chunks)
               | "Spread" >> beam.Reshuffle()
               | "Convert" >> beam.ParDo(ConvertChunk()).with_outputs("log", main="examples"))
        _ = out.log | "WriteLog" >> beam.io.WriteToText(
            posixpath.join(plan.beam_log_dir, split), file_name_suffix=".jsonl")
        return out.examples

    return generate()


def check_finite(value, what: str) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    try:
        ok = ok and math.isfinite(value)
    except OverflowError:  # an int beyond any float
        ok = False
    if not ok:
        raise Skip("bad_value", f"{what} must be a finite number, got {_short(value)}")
    return float(value)
