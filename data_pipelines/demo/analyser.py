"""Recover the demo world's sound events from a waveform with plain DSP, and score audio against a
caption: the built-in judge for DPO pairs and a generation metric that needs no downloaded model.

    events = analyse(wave)              # [Event(type="tone", pitch="high", onset=0.1, ...), ...]
    caption_match(events, "a loud high tone then three clicks")   # 1.0 when everything matches
    judge(wave, caption)                    # the same score straight from audio, in [0, 1]

How (data_pipelines/demo/world.py defines the vocabulary):
  1. segmentation: 10 ms RMS envelope, threshold relative to the loudest frame and the noise floor;
     active runs closer than MERGE_GAP are one event (a click train stays one event; world events
     sit >= 0.3 s apart). Runs shorter than MIN_EVENT are dropped as specks.
  2. broadband or tonal: median spectral flatness of the event's core frames.
     broadband: >= 2 sharp envelope peaks -> clicks (count = peaks), else a noise burst.
     tonal: the dominant frequency per frame; its robust slope in octaves over the event says chirp
     (up / down) or tone (pitch class by the median frequency, split at the geometric midpoints).
  3. loudness: the event's RMS level against the midpoint of the world's loud and soft levels.
Works on SpectralCodec round trips (Griffin-Lim smears ~40 ms each way; the thresholds allow it).
"""
from __future__ import annotations

import math
import re
from typing import Optional, Sequence, Union

import numpy as np

from data_pipelines.demo.world import (CLICK_COUNTS, LEVEL_DB, NUMBER_WORDS, PITCH_HZ, SAMPLE_RATE,
                                  Event)

HOP = 160             # 10 ms frames
WIN = 320             # 20 ms envelope window
N_FFT = 1024          # spectral frames (64 ms): ~16 Hz bins for the dominant frequency
RANGE_DB = 35.0       # active: within this of the loudest frame ...
FLOOR_MARGIN_DB = 10.0  # ... and this far above the noise floor ...
ABS_FLOOR_DB = -65.0  # ... and above this absolute level
MERGE_GAP = 0.17      # s: shorter silences are inside one event
MIN_EVENT = 0.04      # s: shorter active runs are specks
FLATNESS_BROADBAND = 0.15
CLICK_PROMINENCE_DB = 8.0
CHIRP_OCTAVES = 0.5   # tonal events that move further than this are chirps
LOUD_SPLIT_DB = (LEVEL_DB["loud"] + LEVEL_DB["soft"]) / 2
FREQ_BAND = (80.0, 5000.0)  # Hz, where dominant frequencies are looked for
TIME_TOL = 0.1        # s: onset / end error still counted as exact
TIME_ZERO = 0.5       # s: the timing credit falls linearly to 0 at this error

_PITCHES = sorted(PITCH_HZ.items(), key=lambda kv: kv[1])
_PITCH_SPLITS = [math.sqrt(a[1] * b[1]) for a, b in zip(_PITCHES, _PITCHES[1:])]
_NUMBERS = {w: i for i, w in enumerate(NUMBER_WORDS)}


# Signal features ----------------------------------------------------------------------------------
def _frames(x: np.ndarray, win: int) -> np.ndarray:
    """Centred frames [1 + len(x) // HOP, win] (zero padded), frame t centred on sample t * HOP."""
    x = np.pad(x, (win // 2, win // 2))
    n = 1 + (len(x) - win) // HOP
    return np.lib.stride_tricks.sliding_window_view(x, win)[::HOP][:n]


def _db(power: np.ndarray) -> np.ndarray:
    return 10.0 * np.log10(np.maximum(power, 1e-12))


def _features(wave: np.ndarray, sr: int) -> dict:
    env = _db(np.mean(_frames(wave, WIN) ** 2, axis=1))
    spec = np.abs(np.fft.rfft(_frames(wave, N_FFT) * np.hanning(N_FFT), axis=1)) ** 2
    spec = spec[:len(env)]
    freqs = np.fft.rfftfreq(N_FFT, 1.0 / sr)
    band = (freqs >= FREQ_BAND[0]) & (freqs <= FREQ_BAND[1])
    p = spec[:, band] + 1e-12
    flatness = np.exp(np.mean(np.log(p), axis=1)) / np.mean(p, axis=1)
    # Dominant frequency with parabolic interpolation on the log spectrum (sub-bin accuracy).
    k = np.argmax(p, axis=1)
    lp = np.log(p)
    i = np.clip(k, 1, p.shape[1] - 2)
    a, b, c = lp[np.arange(len(i)), i - 1], lp[np.arange(len(i)), i], lp[np.arange(len(i)), i + 1]
    denom = a - 2 * b + c
    shift = np.where(np.abs(denom) > 1e-9, 0.5 * (a - c) / np.where(denom == 0, 1, denom), 0.0)
    dominant = freqs[band][0] + (i + np.clip(shift, -0.5, 0.5)) * (freqs[1] - freqs[0])
    return {"env": env, "flatness": flatness, "dominant": dominant}


def _active_runs(env: np.ndarray) -> list:
    """[(first, last)] frame runs above the threshold, short gaps merged, specks dropped."""
    floor = np.percentile(env, 10)
    thr = max(env.max() - RANGE_DB, floor + FLOOR_MARGIN_DB, ABS_FLOOR_DB)
    active = env > thr
    idx = np.flatnonzero(active)
    if not len(idx):
        return []
    runs, start, prev = [], idx[0], idx[0]
    gap = int(round(MERGE_GAP * SAMPLE_RATE / HOP))
    for t in idx[1:]:
        if t - prev > gap:
            runs.append((start, prev))
            start = t
        prev = t
    runs.append((start, prev))
    min_frames = int(round(MIN_EVENT * SAMPLE_RATE / HOP))
    return [(a, b) for a, b in runs if b - a + 1 >= min_frames]


def _count_peaks(env: np.ndarray) -> int:
    """Sharp envelope peaks (clicks): prominence against the event's own edges and dips."""
    from scipy.signal import find_peaks

    smooth = np.convolve(np.pad(env, 1, mode="edge"), np.ones(3) / 3, mode="valid")
    padded = np.concatenate([[smooth.min()], smooth, [smooth.min()]])
    peaks, _ = find_peaks(padded, prominence=CLICK_PROMINENCE_DB,
                          distance=max(1, int(0.06 * SAMPLE_RATE / HOP)))
    return len(peaks)


def _octave_slope(times: np.ndarray, freqs: np.ndarray) -> float:
    """Octaves per second of the dominant frequency, robust to stray frames (Theil-Sen)."""
    from scipy.stats import theilslopes

    if len(times) < 3:
        return 0.0
    step = max(1, len(times) // 40)  # Theil-Sen is quadratic in points
    return float(theilslopes(np.log2(freqs[::step]), times[::step])[0])


def _pitch_class(freq: float) -> str:
    for (name, _), split in zip(_PITCHES, _PITCH_SPLITS):
        if freq < split:
            return name
    return _PITCHES[-1][0]


def _classify(f: dict, a: int, b: int) -> Event:
    env = f["env"][a:b + 1]
    onset, duration = a * HOP / SAMPLE_RATE, (b - a + 1) * HOP / SAMPLE_RATE
    level = float(_db(np.mean(10 ** (env / 10))))
    core = np.flatnonzero(env >= env.max() - 12.0) + a  # skip fades and codec smear
    loudness = "loud" if level >= LOUD_SPLIT_DB else "soft"
    if float(np.median(f["flatness"][core])) >= FLATNESS_BROADBAND:
        peaks = _count_peaks(env)
        if peaks >= min(CLICK_COUNTS):
            return Event("clicks", round(onset, 3), round(duration, 3), count=peaks,
                         level_db=round(level, 1))
        return Event("noise", round(onset, 3), round(duration, 3), loudness=loudness,
                     level_db=round(level, 1))
    freqs = f["dominant"][core]
    times = core * HOP / SAMPLE_RATE
    moved = _octave_slope(times, freqs) * (times[-1] - times[0]) if len(times) > 1 else 0.0
    if abs(moved) >= CHIRP_OCTAVES:
        return Event("chirp", round(onset, 3), round(duration, 3),
                     direction="up" if moved > 0 else "down", loudness=loudness,
                     level_db=round(level, 1))
    freq = float(np.median(freqs))
    return Event("tone", round(onset, 3), round(duration, 3), pitch=_pitch_class(freq),
                 loudness=loudness, freq=round(freq, 1), level_db=round(level, 1))


def analyse(wave: np.ndarray, sr: int = SAMPLE_RATE) -> list:
    """The events of a clip, in time order (data_pipelines.demo.world.Event)."""
    from data_pipelines.features import resample, to_mono

    wave = resample(to_mono(np.asarray(wave, np.float32)), sr, SAMPLE_RATE).astype(np.float64)
    if len(wave) < WIN or not np.all(np.isfinite(wave)):
        return []
    f = _features(wave, SAMPLE_RATE)
    return [_classify(f, a, b) for a, b in _active_runs(f["env"])]


# Captions -> event specs --------------------------------------------------------------------------
_LAYOUT_ITEM = re.compile(r"([a-z][a-z ]*?)\s+from\s+(\d+(?:\.\d+)?)\s+to\s+(\d+(?:\.\d+)?)\s*s\b")
_SPLIT = re.compile(r"\bthen\b|\bfollowed by\b|,|;|\band\b")


def parse_phrase(phrase: str) -> dict:
    """'a soft rising chirp' -> {"type": "chirp", "direction": "up", "loudness": "soft"}.
    Only what the phrase states; type None when no known sound is named."""
    words = re.findall(r"[a-z]+|\d+", phrase.lower())
    spec: dict = {"type": None}
    if any(w in ("tone", "tones", "beep", "sine") for w in words):
        spec["type"] = "tone"
        for w in words:
            if w in PITCH_HZ:
                spec["pitch"] = w
    elif "noise" in words or "burst" in words:
        spec["type"] = "noise"
    elif any(w.startswith("chirp") or w == "sweep" for w in words):
        spec["type"] = "chirp"
        if any(w in ("rising", "up", "upward", "ascending", "rises") for w in words):
            spec["direction"] = "up"
        elif any(w in ("falling", "down", "downward", "descending", "falls") for w in words):
            spec["direction"] = "down"
    elif any(w.startswith("click") for w in words):
        spec["type"] = "clicks"
        for w in words:
            n = int(w) if w.isdigit() else _NUMBERS.get(w)
            if n is not None:
                spec["count"] = n
                break
    elif "voice" in words or "says" in words or "saying" in words:
        spec["type"] = "speech"
    if spec["type"] in ("tone", "noise", "chirp"):
        for w in words:
            if w in ("loud", "soft", "quiet"):
                spec["loudness"] = "soft" if w == "quiet" else w
    return spec


def parse_caption(caption: str) -> list:
    """Event specs of a caption: a rich caption's layout (with times) when it has one, else the
    phrases of a short caption ('... then ...'). Phrases naming no known sound are dropped."""
    text = caption.lower()
    if "layout:" in text:
        layout = text.split("layout:", 1)[1].split("details:", 1)[0]
        specs = []
        for phrase, start, stop in _LAYOUT_ITEM.findall(layout):
            phrase = re.sub(r"^(then|and)\s+", "", phrase.strip())
            spec = parse_phrase(phrase)
            if spec["type"]:
                specs.append({**spec, "onset": float(start), "end": float(stop)})
        if specs:
            return specs
    specs = [parse_phrase(p) for p in _SPLIT.split(text) if p.strip()]
    return [s for s in specs if s["type"]]


def _as_specs(spec: Union[str, Sequence]) -> list:
    if isinstance(spec, str):
        return parse_caption(spec)
    out = []
    for s in spec:
        d = s.to_dict() if isinstance(s, Event) else dict(s)
        if "onset" in d and "end" not in d and "duration" in d:
            d["end"] = d["onset"] + d["duration"]
        out.append(d)
    return out


# Scoring ------------------------------------------------------------------------------------------
_ATTRS = ("pitch", "direction", "count", "loudness", "word")


def _timing_credit(err: float) -> float:
    if err <= TIME_TOL:
        return 1.0
    return max(0.0, 1.0 - (err - TIME_TOL) / (TIME_ZERO - TIME_TOL))


def similarity(spec: dict, event: Event) -> float:
    """In [0, 1]: 0 for another type; half for the type, half for the stated attributes (and
    times, when the spec has them)."""
    if spec.get("type") != event.type:
        return 0.0
    checks = [float(getattr(event, k) == spec[k]) for k in _ATTRS if spec.get(k) is not None]
    if spec.get("onset") is not None:
        checks.append(_timing_credit(abs(event.onset - spec["onset"])))
    if spec.get("end") is not None:
        checks.append(_timing_credit(abs(event.end - spec["end"])))
    return 1.0 if not checks else 0.5 + 0.5 * float(np.mean(checks))


def _align(specs: list, events: list) -> tuple:
    """Order-preserving alignment maximising the summed similarity -> (total, matched pairs)."""
    n, m = len(specs), len(events)
    best = np.zeros((n + 1, m + 1))
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            best[i, j] = max(best[i - 1, j], best[i, j - 1],
                             best[i - 1, j - 1] + similarity(specs[i - 1], events[j - 1]))
    pairs, i, j = [], n, m
    while i and j:
        s = similarity(specs[i - 1], events[j - 1])
        if s > 0 and math.isclose(best[i, j], best[i - 1, j - 1] + s):
            pairs.append((i - 1, j - 1, s))
            i, j = i - 1, j - 1
        elif best[i - 1, j] >= best[i, j - 1]:
            i -= 1
        else:
            j -= 1
    return float(best[n, m]), pairs[::-1]


def caption_match(events: Sequence[Event], caption_or_spec: Union[str, Sequence],
                  strict: bool = False) -> Union[float, bool]:
    """How well `events` fit a caption (str) or an event list (Events or dicts) in order.

    -> a score in [0, 1]: aligned similarity over max(#specs, #events), so a missing or extra
    event costs its share. strict=True -> bool: same number of events and each one matches in
    type, every stated attribute and (when given) onset and end within TIME_TOL."""
    specs = _as_specs(caption_or_spec)
    events = list(events)
    if not specs and not events:
        return True if strict else 1.0
    total, pairs = _align(specs, events)
    if strict:
        return len(specs) == len(events) == len(pairs) and all(s == 1.0 for *_, s in pairs)
    return total / max(len(specs), len(events))


def judge(wave: np.ndarray, caption: str, sr: int = SAMPLE_RATE) -> float:
    """Score in [0, 1] of audio against its caption (short or rich): caption_match of what
    `analyse` hears. 0 for silence or a caption naming nothing the analyser knows."""
    specs = parse_caption(caption)
    if not specs:
        return 0.0
    return float(caption_match(analyse(wave, sr), specs))


def score_caption(wave: np.ndarray, caption: str, sr: int = SAMPLE_RATE) -> tuple[bool, float]:
    """(strict caption_match, judge score) of audio against its caption, analysing it once."""
    events = analyse(wave, sr)
    specs = parse_caption(caption)
    strict = bool(caption_match(events, caption, strict=True))
    return strict, float(caption_match(events, specs)) if specs else 0.0


def events_equal(truth: Sequence[Event], found: Sequence[Event],
                 time_tol: float = TIME_TOL) -> bool:
    """Exact recovery: same count and, in order, the type, every attribute the truth states
    (pitch, direction, count, loudness) and onset / end within time_tol."""
    if len(truth) != len(found):
        return False
    for t, f in zip(truth, found):
        if t.type != f.type or any(getattr(t, k) is not None and getattr(t, k) != getattr(f, k)
                                   for k in ("pitch", "direction", "count", "loudness")):
            return False
        if abs(t.onset - f.onset) > time_tol or abs(t.end - f.end) > time_tol:
            return False
    return True


def describe_mismatch(truth: Sequence[Event], found: Sequence[Event]) -> Optional[str]:
    """None when events_equal, else a one-line reason (for test failures and debugging)."""
    if events_equal(truth, found):
        return None
    def show(events):
        def attrs(e):
            return ",".join(str(getattr(e, k)) for k in ("pitch", "direction", "count", "loudness")
                            if getattr(e, k) is not None)
        return "; ".join(f"{e.type}[{attrs(e)}]@{e.onset:.2f}-{e.end:.2f}" for e in events)

    return f"truth {show(truth)} | found {show(found)}"
