"""A procedural audio world for the built-in demo: short 16 kHz mono clips of 1-3 sound events with
known parameters, their captions and question-answer pairs, and text-only reasoning problems.

    paths = make_world("world", n_clips=400, seed=0)
    build("captions", paths["captions"], "out/caps", codec=..., tokenizer=...)

Vocabulary (small and acoustically distinct, so a tiny model learns it in a few hundred steps and
data_pipelines/demo/analyser.py recovers it from a waveform, also after a SpectralCodec round trip):
  tone    a sine; pitch low | mid | high (300 / 600 / 1200 Hz); 0.2-0.5 s
  noise   a white-noise burst; 0.2-0.4 s
  chirp   an exponential sweep between ~400 and ~1600 Hz; direction up | down; 0.3-0.5 s
  clicks  2-4 sharp clicks, 0.15 s apart
  speech  (only with speech_clips > 0 and espeak-ng installed) a voice saying one word
Every tone, noise and chirp plays at -12 dBFS RMS (+-1.5 dB); with loudness=True each is loud
(-12) or soft (-32) and the captions say which. That is off by default because the demo's
SpectralCodec (K=4, C=32) does not carry it for tones: k-means spends its codes on white-noise
frames, so a loud and a soft tone of one pitch share their codes (with loudness, ~82% of clips
keep their exact event list through a codec round trip; without, 100%). Pitches carry no jitter
for the same reason (jittered pitches blur into one smeared centre).
Events never overlap and sit >= 0.3 s apart (the analyser merges gaps shorter than that into one
event, which is how a click train stays one event). Onsets and durations lie on a 0.05 s grid so the
captions' times stay short.

Output folder:
  clips/*.wav          16 kHz mono PCM-16
  captions.jsonl       {"audio", "caption"}: short captions        (builder kind "captions")
  rich_captions.jsonl  {"audio", "caption"}: rich captions         (kind "captions")
  audio_qa.jsonl       one question about one clip per line        (kind "audio-qa")
  text_sft.jsonl       text-only arithmetic and ordering problems  (kind "text-sft")
  reason.jsonl         enrichment: vague request -> rich caption -> audio (kind "reason")
  prompts.jsonl        held-out clips for generation eval: {"id", "prompt", "rich_caption",
                       "reference", "events"} (`prompt` is what `ualm generate --prompts` reads)
  train_prompts.jsonl  the same for the training clips (DPO pairs: `ualm dpo make-pairs`)
  world.json           settings and ground truth: each clip's events, captions and QA; each problem
Held-out clips and problems (an evenly spread `eval_fraction`) carry "split": "validation".
Everything follows from `seed`: clip i and problem j draw from their own streams, so a bigger world
begins with the same clips, and the same arguments write the same bytes.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, fields
from typing import Optional

import numpy as np

SAMPLE_RATE = 16000
GRID = 0.05           # s: onsets and durations are multiples of this
MARGIN = 0.1          # s: silence kept at both ends of a clip
MIN_GAP = 0.3         # s: between events
PITCH_HZ = {"low": 300.0, "mid": 600.0, "high": 1200.0}
CHIRP_HZ = (400.0, 1600.0)
CHIRP_JITTER = 0.1    # octaves, either way, on each end
LEVEL_DB = {"loud": -12.0, "soft": -32.0}  # RMS dBFS; the analyser splits them at the midpoint
LEVEL_JITTER_DB = 1.5
CLICK_SPACING = 0.15  # s between click onsets
CLICK_SECONDS = 0.01
CLICK_COUNTS = (2, 3, 4)
FADE_SECONDS = 0.01
DURATIONS = {"tone": (0.2, 0.5), "noise": (0.2, 0.4), "chirp": (0.3, 0.5)}  # s, on the grid
TYPES = ("tone", "noise", "chirp", "clicks")
EVENT_COUNT_P = (0.2, 0.4, 0.4)  # 1, 2, 3 events
NAMES = {"tone": "tone", "noise": "noise burst", "chirp": "chirp", "clicks": "clicks",
         "speech": "voice"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten")
SPOKEN_WORDS = NUMBER_WORDS[:10] + ("yes", "no", "hello", "stop", "go")


@dataclass
class Event:
    """One sound event: ground truth in the world, or what the analyser recovered."""
    type: str
    onset: float
    duration: float
    pitch: Optional[str] = None      # tone: low | mid | high
    direction: Optional[str] = None  # chirp: up | down
    count: Optional[int] = None      # clicks
    loudness: Optional[str] = None   # tone, noise, chirp: loud | soft
    word: Optional[str] = None       # speech
    freq: Optional[float] = None     # tone: Hz
    level_db: Optional[float] = None  # RMS dBFS over the event

    @property
    def end(self) -> float:
        return self.onset + self.duration

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict) -> "Event":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


# Words ------------------------------------------------------------------------------------------
def describe(e: Event, loudness: bool = True) -> str:
    """The short phrase for one event: 'a loud high tone', 'a soft rising chirp', 'three clicks'."""
    loud = f"{e.loudness} " if loudness and e.loudness else ""
    if e.type == "tone":
        return f"a {loud}{e.pitch} tone"
    if e.type == "noise":
        return f"a {loud}noise burst"
    if e.type == "chirp":
        return f"a {loud}{'rising' if e.direction == 'up' else 'falling'} chirp"
    if e.type == "clicks":
        return f"{NUMBER_WORDS[e.count]} clicks"
    if e.type == "speech":
        return f"a voice saying {e.word}"
    raise ValueError(f"unknown event type {e.type!r}")


def short_caption(events: list) -> str:
    return " then ".join(describe(e) for e in events)


def _detail(e: Event) -> str:
    if e.type == "tone":
        return f"a steady sine near {e.freq:.0f} Hz"
    if e.type == "noise":
        return "broadband white noise"
    if e.type == "chirp":
        lo, hi = CHIRP_HZ
        a, b = (lo, hi) if e.direction == "up" else (hi, lo)
        return f"a sweep from about {a:.0f} to {b:.0f} Hz"
    if e.type == "clicks":
        return f"{NUMBER_WORDS[e.count]} sharp clicks {CLICK_SPACING:.2f} s apart"
    return f"one spoken word, {e.word}"


def rich_caption(events: list) -> str:
    """The UALM-Reason plan: keywords; temporal layout with times; per-event description.
    analyser.parse_caption reads the layout part back."""
    keywords = list(dict.fromkeys(NAMES[e.type] for e in events))
    layout = ", then ".join(f"{describe(e)} from {e.onset:.2f} to {e.end:.2f} s" for e in events)
    details = "; ".join(_detail(e) for e in events)
    return f"keywords: {', '.join(keywords)}. layout: {layout}. details: {details}."


def vague_request(events: list) -> str:
    """What a user might ask for before the plan is written: the kinds of sound, nothing more."""
    kinds = list(dict.fromkeys("some clicks" if e.type == "clicks" else f"a {NAMES[e.type]}"
                               for e in events))
    what = kinds[0] if len(kinds) == 1 else ", ".join(kinds[:-1]) + " and " + kinds[-1]
    return f"Make a short clip with {what}."


def questions(events: list, rng: np.random.Generator, n: int) -> list:
    """Up to n (question, answer) pairs about one clip, drawn from those that apply."""
    qa = [("How many sounds are there?", NUMBER_WORDS[len(events)]),
          ("What is the first sound?", describe(events[0], loudness=False))]
    if len(events) > 1:
        qa.append(("What is the last sound?", describe(events[-1], loudness=False)))
    present = sorted({e.type for e in events} & set(TYPES))
    absent = [t for t in TYPES if t not in present]
    kind = str(rng.choice(present if (rng.random() < 0.5 or not absent) else absent))
    ask = "Are there clicks?" if kind == "clicks" else f"Is there a {NAMES[kind]}?"
    qa.append((ask, "yes" if kind in present else "no"))
    by_type = {t: [e for e in events if e.type == t] for t in TYPES}
    if by_type["tone"]:
        which = "the tone" if len(by_type["tone"]) == 1 else "the first tone"
        qa.append((f"Is {which} low, mid or high?", by_type["tone"][0].pitch))
    if by_type["chirp"]:
        which = "the chirp" if len(by_type["chirp"]) == 1 else "the first chirp"
        qa.append((f"Does {which} rise or fall?",
                   "it rises" if by_type["chirp"][0].direction == "up" else "it falls"))
    if by_type["clicks"]:
        qa.append(("How many clicks are there?", NUMBER_WORDS[by_type["clicks"][0].count]))
    if events[0].loudness:
        qa.append(("Is the first sound loud or soft?", events[0].loudness))
    kinds = list(dict.fromkeys(e.type for e in events))
    if len(kinds) > 1:
        i, j = sorted(rng.choice(len(kinds), 2, replace=False))
        first, second = NAMES[kinds[i]], NAMES[kinds[j]]
        pair = (first, second) if rng.random() < 0.5 else (second, first)
        qa.append((f"Which comes first, the {pair[0]} or the {pair[1]}?", f"the {first}"))
    pick = sorted(rng.choice(len(qa), min(n, len(qa)), replace=False))
    return [qa[k] for k in pick]


# Layout and synthesis -----------------------------------------------------------------------------
def _steps(seconds: float) -> int:
    return int(round(seconds / GRID))


def _click_steps(count: int) -> int:
    return math.ceil(((count - 1) * CLICK_SPACING + CLICK_SECONDS) / GRID - 1e-9)


def draw_events(rng: np.random.Generator, clip_seconds: float, loudness: bool = False) -> list:
    """1-3 non-overlapping events on the grid that fit the clip (ground truth, no audio yet)."""
    room = _steps(clip_seconds - 2 * MARGIN)
    for _ in range(100):
        n = int(rng.choice(3, p=EVENT_COUNT_P)) + 1
        drafts = []
        for _ in range(n):
            kind = str(rng.choice(TYPES))
            while kind == "clicks" and drafts and drafts[-1]["type"] == "clicks":
                kind = str(rng.choice(TYPES))  # two click trains in a row would read as one
            d = {"type": kind}
            if kind == "clicks":
                d["count"] = int(rng.choice(CLICK_COUNTS))
                d["steps"] = _click_steps(d["count"])
            else:
                lo, hi = DURATIONS[kind]
                d["steps"] = int(rng.integers(_steps(lo), _steps(hi) + 1))
                if loudness:
                    d["loudness"] = str(rng.choice(("loud", "soft")))
                if kind == "tone":
                    d["pitch"] = str(rng.choice(tuple(PITCH_HZ)))
                elif kind == "chirp":
                    d["direction"] = str(rng.choice(("up", "down")))
            drafts.append(d)
        slack = room - sum(d["steps"] for d in drafts) - (n - 1) * _steps(MIN_GAP)
        if slack >= 0:
            break
    else:  # practically unreachable for clips >= 1 s; a single short event rather than a failure
        n, drafts, slack = 1, [{"type": "noise", "steps": 4, "loudness": "loud"}], room - 4
    gaps = rng.multinomial(slack, [1.0 / (n + 1)] * (n + 1))  # silence spread around the events
    events, t = [], _steps(MARGIN) + int(gaps[0])
    for i, d in enumerate(drafts):
        onset = round(t * GRID, 2)
        if d["type"] == "clicks":
            duration = round((d["count"] - 1) * CLICK_SPACING + CLICK_SECONDS, 3)
        else:
            duration = round(d["steps"] * GRID, 2)
        events.append(Event(d["type"], onset, duration, pitch=d.get("pitch"),
                            direction=d.get("direction"), count=d.get("count"),
                            loudness=d.get("loudness")))
        t += d["steps"] + _steps(MIN_GAP) + (int(gaps[i + 1]) if i + 1 < len(drafts) else 0)
    return events


def _fade(x: np.ndarray, seconds: float) -> np.ndarray:
    n = min(int(seconds * SAMPLE_RATE), len(x) // 2)
    if n > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(n) / n)
        x[:n] *= ramp
        x[-n:] *= ramp[::-1]
    return x


def synth(e: Event, rng: np.random.Generator) -> np.ndarray:
    """The samples of one event (fills e.freq and e.level_db in for tones and levels)."""
    n = int(round(e.duration * SAMPLE_RATE))
    t = np.arange(n) / SAMPLE_RATE
    if e.type == "clicks":
        x = np.zeros(n)
        m = int(CLICK_SECONDS * SAMPLE_RATE)
        decay = np.exp(-np.arange(m) / (0.002 * SAMPLE_RATE))
        for k in range(e.count):
            s = int(round(k * CLICK_SPACING * SAMPLE_RATE))
            x[s:s + m] = 0.3 * rng.standard_normal(m) * decay
        return x
    level = LEVEL_DB[e.loudness or "loud"]
    rms = 10 ** ((level + rng.uniform(-LEVEL_JITTER_DB, LEVEL_JITTER_DB)) / 20)
    e.level_db = round(20 * math.log10(rms), 1)
    if e.type == "tone":
        e.freq = PITCH_HZ[e.pitch]
        x = math.sqrt(2) * rms * np.sin(2 * np.pi * e.freq * t + rng.uniform(0, 2 * np.pi))
    elif e.type == "noise":
        x = rms * rng.standard_normal(n)
    elif e.type == "chirp":
        lo, hi = (f * 2 ** rng.uniform(-CHIRP_JITTER, CHIRP_JITTER) for f in CHIRP_HZ)
        f0, f1 = (lo, hi) if e.direction == "up" else (hi, lo)
        k = math.log(f1 / f0) / e.duration  # exponential sweep: equal octaves per second
        x = math.sqrt(2) * rms * np.sin(2 * np.pi * f0 * (np.exp(k * t) - 1) / k)
    else:
        raise ValueError(f"cannot synthesise {e.type!r}")
    return _fade(x, FADE_SECONDS)


def render(events: list, rng: np.random.Generator, clip_seconds: float) -> np.ndarray:
    wave = np.zeros(int(round(clip_seconds * SAMPLE_RATE)))
    for e in events:
        x = synth(e, rng)
        s = int(round(e.onset * SAMPLE_RATE))
        wave[s:s + len(x)] += x[:len(wave) - s]
    return np.clip(wave, -0.99, 0.99).astype(np.float32)


# Speech (optional) --------------------------------------------------------------------------------
def espeak() -> Optional[str]:
    return shutil.which("espeak-ng")


def spoken_clip(word: str, rng: np.random.Generator, clip_seconds: float, exe: str) -> tuple:
    """-> (wave, Event) of one word said by espeak-ng at a random speed and pitch."""
    import soundfile as sf

    from data_pipelines.features import resample, to_mono

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "word.wav")
        subprocess.run([exe, "-v", "en-us", "-s", str(int(rng.integers(140, 181))),
                        "-p", str(int(rng.integers(30, 71))), "-w", path, word],
                       check=True, capture_output=True)
        voice, sr = sf.read(path, dtype="float32", always_2d=True)
    voice = resample(to_mono(voice), sr, SAMPLE_RATE)
    loud = np.flatnonzero(np.abs(voice) > 0.01 * (np.abs(voice).max() + 1e-9))
    voice = voice[loud[0]:loud[-1] + 1] if len(loud) else voice  # espeak pads with silence
    limit = int((clip_seconds - 2 * MARGIN) * SAMPLE_RATE)
    voice = _fade(voice[:limit].astype(np.float64), FADE_SECONDS)
    voice *= 10 ** (LEVEL_DB["loud"] / 20) / (np.sqrt(np.mean(voice ** 2)) + 1e-9)
    room = _steps(clip_seconds - 2 * MARGIN - len(voice) / SAMPLE_RATE)
    onset = round((_steps(MARGIN) + int(rng.integers(0, max(room, 0) + 1))) * GRID, 2)
    wave = np.zeros(int(round(clip_seconds * SAMPLE_RATE)))
    s = int(round(onset * SAMPLE_RATE))
    wave[s:s + len(voice)] = voice[:len(wave) - s]
    event = Event("speech", onset, round(len(voice) / SAMPLE_RATE, 3), word=word,
                  level_db=LEVEL_DB["loud"])
    return np.clip(wave, -0.99, 0.99).astype(np.float32), event


# Text-only reasoning ------------------------------------------------------------------------------
PEOPLE = ("Ann", "Bob", "Cy", "Dee", "Eve", "Finn")


def text_problem(rng: np.random.Generator) -> tuple:
    """-> (kind, question, short answer): small arithmetic and ordering puzzles."""
    kind = str(rng.choice(("add", "sub", "mul", "two_step", "compare", "sort", "sound_order",
                           "people_order", "clicks")))
    a, b, c = (int(v) for v in rng.integers(1, 21, 3))
    if kind == "add":
        return kind, f"What is {a} + {b}?", str(a + b)
    if kind == "sub":
        a, b = max(a, b), min(a, b)
        return kind, f"What is {a} - {b}?", str(a - b)
    if kind == "mul":
        a, b = (int(v) for v in rng.integers(2, 10, 2))
        return kind, f"What is {a} times {b}?", str(a * b)
    if kind == "two_step":
        c = min(c, a + b)
        steps = f"{a} + {b} = {a + b}, {a + b} - {c} = {a + b - c}"
        return kind, f"What is {a} + {b} - {c}?", steps
    if kind == "compare":
        a, b = (int(v) for v in rng.choice(np.arange(1, 100), 2, replace=False))
        return kind, f"Which is larger, {a} or {b}?", str(max(a, b))
    if kind == "sort":
        xs = [int(v) for v in rng.choice(np.arange(1, 50), 3, replace=False)]
        return kind, f"Sort from smallest to largest: {', '.join(map(str, xs))}.", \
            ", ".join(map(str, sorted(xs)))
    if kind == "clicks":
        a, b = (int(v) for v in rng.integers(1, 10, 2))
        return kind, f"I hear {a} clicks, then {b} more. How many clicks do I hear?", str(a + b)
    if kind == "sound_order":
        names = [NAMES[t] for t in rng.permutation(TYPES)[:3]]
        facts = [f"The {names[1]} comes after the {names[0]}.",
                 f"The {names[2]} comes after the {names[1]}."]
        facts = facts if rng.random() < 0.5 else facts[::-1]
        first = rng.random() < 0.5
        ask = "Which sound comes first?" if first else "Which sound comes last?"
        return kind, " ".join(facts + [ask]), f"the {names[0] if first else names[2]}"
    names = [str(p) for p in rng.permutation(PEOPLE)[:3]]  # people_order, tallest first
    facts = [f"{names[0]} is taller than {names[1]}.", f"{names[1]} is taller than {names[2]}."]
    facts = facts if rng.random() < 0.5 else facts[::-1]
    tallest = rng.random() < 0.5
    ask = "Who is the tallest?" if tallest else "Who is the shortest?"
    return kind, " ".join(facts + [ask]), names[0] if tallest else names[2]


# The world ----------------------------------------------------------------------------------------
def held_out(i: int, fraction: float) -> bool:
    """Exactly floor(n * fraction) of the first n indices, evenly spread, for every n."""
    return math.floor((i + 1) * fraction) > math.floor(i * fraction)


def _write_jsonl(path: str, rows: list) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
    return path


def _with_split(row: dict, validation: bool) -> dict:
    return {**row, "split": "validation"} if validation else row


def make_world(out_dir: str, n_clips: int, seed: int, clip_seconds: float = 2.0, *,
               eval_fraction: float = 0.1, qa_per_clip: int = 3, n_text: Optional[int] = None,
               loudness: bool = False, speech_clips: int = 0) -> dict:
    """Write the world into out_dir; -> {"captions", "rich_captions", "audio_qa", "text_sft",
    "reason", "prompts", "train_prompts", "world"} paths. n_text defaults to n_clips. loudness:
    loud / soft events (see the module doc). speech_clips > 0 adds clips of one spoken word each when espeak-ng is
    installed (skipped, and said so in world.json, when not)."""
    import soundfile as sf

    if n_clips < 1:
        raise ValueError(f"n_clips must be positive, got {n_clips}")
    if clip_seconds < 1.0:
        raise ValueError(f"clip_seconds must be at least 1.0, got {clip_seconds}")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must lie in [0, 1), got {eval_fraction}")
    n_text = n_clips if n_text is None else n_text
    clip_dir = os.path.join(out_dir, "clips")
    os.makedirs(clip_dir, exist_ok=True)
    for name in os.listdir(clip_dir):  # a smaller rebuild must not leave stale clips behind
        if name.endswith(".wav") and name.startswith(("clip_", "speech_")):
            os.remove(os.path.join(clip_dir, name))

    from tqdm import tqdm

    clips = []
    for i in tqdm(range(n_clips), desc="world clips", unit="clip", disable=None, leave=False):
        rng = np.random.default_rng([seed, 0, i])
        events = draw_events(rng, clip_seconds, loudness)
        wave = render(events, rng, clip_seconds)  # fills in freq / level_db
        clips.append({"id": f"clip_{i:05d}", "wave": wave, "events": events,
                      "validation": held_out(i, eval_fraction), "qa_rng": rng})

    exe = espeak() if speech_clips > 0 else None
    speech_note = "off" if speech_clips <= 0 else ("espeak-ng" if exe else "skipped: no espeak-ng")
    for j in range(speech_clips if exe else 0):
        rng = np.random.default_rng([seed, 2, j])
        word = str(rng.choice(SPOKEN_WORDS))
        wave, event = spoken_clip(word, rng, clip_seconds, exe)
        clips.append({"id": f"speech_{j:05d}", "wave": wave, "events": [event],
                      "validation": held_out(j, eval_fraction), "qa_rng": rng})

    captions, rich, qa_rows, reason, prompts, train_prompts, truth = [], [], [], [], [], [], []
    for c in clips:
        rel = f"clips/{c['id']}.wav"
        sf.write(os.path.join(out_dir, rel), c["wave"], SAMPLE_RATE, subtype="PCM_16")
        events, val = c["events"], c["validation"]
        short, plan = short_caption(events), rich_caption(events)
        if events[0].type == "speech":
            qa = [("What word does the voice say?", events[0].word)]
        else:
            qa = questions(events, c["qa_rng"], qa_per_clip)
        captions.append(_with_split({"audio": rel, "caption": short}, val))
        rich.append(_with_split({"audio": rel, "caption": plan}, val))
        qa_rows += [_with_split({"messages": [{"role": "user", "content": q, "audio": rel},
                                              {"role": "assistant", "content": a}]}, val)
                    for q, a in qa]
        reason.append(_with_split({"behaviour": "enrichment", "prompt": vague_request(events),
                                   "rich_caption": plan, "audio": rel}, val))
        if events[0].type != "speech":
            (prompts if val else train_prompts).append(
                {"id": c["id"], "prompt": short, "rich_caption": plan, "reference": rel,
                 "events": [e.to_dict() for e in events]})
        truth.append({"id": c["id"], "audio": rel, "split": "validation" if val else "train",
                      "events": [e.to_dict() for e in events], "caption": short,
                      "rich_caption": plan, "qa": [{"question": q, "answer": a} for q, a in qa]})

    problems, text_rows = [], []
    for j in range(n_text):
        kind, q, a = text_problem(np.random.default_rng([seed, 1, j]))
        val = held_out(j, eval_fraction)
        problems.append({"kind": kind, "question": q, "answer": a,
                         "split": "validation" if val else "train"})
        text_rows.append(_with_split({"messages": [{"role": "user", "content": q},
                                                   {"role": "assistant", "content": a}]}, val))

    paths = {name: os.path.join(out_dir, f"{name}.jsonl") for name in
             ("captions", "rich_captions", "audio_qa", "text_sft", "reason", "prompts",
              "train_prompts")}
    for name, rows in (("captions", captions), ("rich_captions", rich), ("audio_qa", qa_rows),
                       ("text_sft", text_rows), ("reason", reason), ("prompts", prompts),
                       ("train_prompts", train_prompts)):
        _write_jsonl(paths[name], rows)
    paths["world"] = os.path.join(out_dir, "world.json")
    settings = {"seed": seed, "n_clips": n_clips, "clip_seconds": clip_seconds,
                "sample_rate": SAMPLE_RATE, "eval_fraction": eval_fraction,
                "qa_per_clip": qa_per_clip, "n_text": n_text, "loudness": loudness,
                "speech": speech_note,
                "speech_clips": sum(c["id"].startswith("speech_") for c in clips),
                "types": list(TYPES), "pitch_hz": PITCH_HZ, "chirp_hz": list(CHIRP_HZ),
                "level_db": LEVEL_DB, "click_spacing": CLICK_SPACING, "min_gap": MIN_GAP,
                "grid": GRID}
    with open(paths["world"], "w") as f:
        json.dump({"settings": settings, "clips": truth, "text_problems": problems}, f, indent=1,
                  sort_keys=True)
        f.write("\n")
    return paths


def load_world(out_dir_or_file: str) -> dict:
    """world.json with each clip's events as Event objects."""
    path = out_dir_or_file if out_dir_or_file.endswith(".json") else \
        os.path.join(out_dir_or_file, "world.json")
    with open(path) as f:
        world = json.load(f)
    for c in world["clips"]:
        c["events"] = [Event.from_dict(e) for e in c["events"]]
    return world
