"""Reading JSON-lines manifests, one line at a time, with per-line error capture.

Life of one manifest line (`iter_lines`: ends at \n, \r\n or a lone \r):
  1. `parse_line`: JSON object -> its split ("split" field, else a `Splitter`: `eval_fraction`
     by a hash of the line's audio paths or of its parsed content). Malformed lines are logged
     once, by the first split's pass; so are lines over the `Limits` (line_too_long, too_deep:
     checked before the JSON parser runs) and numbers too long to convert (number_too_long). It
     raises nothing but Skip.
  2. `Converter.check_keys` then `Converter.check` (builders/converter.py).
  3. `Converter.records`: the expensive part (audio decode, codec, mel), -> records.
Every line ends as exactly one log entry (builders/report.py): written or skipped with a `code`
and a `reason`. Nothing raised by one line stops a build. `scan_manifest` cuts the file into
byte-offset chunks, the unit of (Beam) work.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import posixpath
import re
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Union


import ualm_jax.storage as storage


SPLITS = ("train", "validation")
SPLIT_ALIASES = {"train": "train", "validation": "validation", "valid": "validation",
                 "val": "validation", "eval": "validation", "dev": "validation"}
CHUNK_LINES = 1000  # manifest lines per unit of (Beam) work
MAX_LINE_BYTES = 16 << 20  # a longer manifest line is skipped (line_too_long), never read whole
MAX_JSON_DEPTH = 64  # deeper nesting is skipped (too_deep) before the JSON parser recurses
# Keys every kind accepts: the split, and an identifier (make-pairs writes one) no builder reads.
COMMON_KEYS = ("split", "id")
SPLIT_BY = ("audio", "line")  # what eval_fraction hashes (Splitter)


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
    return path if storage.is_url(path) else posixpath.normpath(path.strip())


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
    with storage.open_file(path) as f:
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
    with storage.open_file(path) as f:
        f.seek(chunk.start)
        lines = iter_lines(f, limits.max_line_bytes)
        for i, (_, raw) in zip(range(chunk.lines), lines):
            yield chunk.first_line + i, raw
