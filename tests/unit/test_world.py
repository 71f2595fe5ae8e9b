"""The demo world: generated deterministically, its manifests built by the real builders, and the
analyser / judge that score audio against captions, on clean clips and on SpectralCodec round trips
(generated audio is decoded that way). Accuracies and timings are printed (pytest -s), not asserted
beyond sensible floors."""
import json
import os
import re
import stat
import time

import numpy as np
import pytest

sf = pytest.importorskip("soundfile")

from data_pipelines.demo import analyser as A  # noqa: E402
from data_pipelines.demo.world import (MIN_GAP, NUMBER_WORDS, Event, load_world,  # noqa: E402
                                  make_world)

N_CLIPS = 60
N_ROUND_TRIP = 40
K, C = 4, 32  # the tiny preset's codec shape


def _files(root) -> dict:
    out = {}
    for base, _, names in os.walk(root):
        for name in names:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def _waves(root, world) -> list:
    return [sf.read(os.path.join(root, c["audio"]), dtype="float32")[0] for c in world["clips"]]


def _accuracy(world, waves) -> tuple:
    bad = [A.describe_mismatch(c["events"], A.analyse(x)) for c, x in zip(world["clips"], waves)]
    bad = [b for b in bad if b]
    return 1.0 - len(bad) / len(waves), bad


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("world") / "w")
    t = time.perf_counter()
    paths = make_world(root, N_CLIPS, seed=0)
    per_clip = (time.perf_counter() - t) / N_CLIPS
    print(f"\nworld generation: {1000 * per_clip:.2f} ms per clip (wav + manifests)")
    w = load_world(paths["world"])
    return {"root": root, "paths": paths, "world": w, "waves": _waves(root, w)}


@pytest.fixture(scope="module")
def round_trips(world):
    """The clips after SpectralCodec encode -> decode (Griffin-Lim), codec fitted on the world."""
    from data_pipelines.codecs import SpectralCodec

    waves = world["waves"]
    codec = SpectralCodec.fit(waves[:30], 16000, K=K, C=C, seed=0)
    t = time.perf_counter()
    out = [codec.decode(codec.encode(x, 16000)) for x in waves[:N_ROUND_TRIP]]
    print(f"\ncodec round trip: {1000 * (time.perf_counter() - t) / N_ROUND_TRIP:.0f} ms per clip")
    return out


# Generation ---------------------------------------------------------------------------------------
def test_same_seed_same_bytes_other_seed_differs(world, tmp_path):
    first = _files(world["root"])
    make_world(str(tmp_path / "again"), N_CLIPS, seed=0)
    assert _files(tmp_path / "again") == first
    make_world(str(tmp_path / "other"), N_CLIPS, seed=1)
    other = _files(tmp_path / "other")
    assert sorted(other) == sorted(first)
    for name in ("captions.jsonl", "audio_qa.jsonl", "text_sft.jsonl", "world.json"):
        assert other[name] != first[name]
    wavs = [k for k in first if k.endswith(".wav")]
    assert sum(other[k] != first[k] for k in wavs) >= 0.9 * len(wavs)
    # A smaller world is a prefix of a bigger one (clip i draws from its own stream).
    make_world(str(tmp_path / "small"), 10, seed=0)
    small = _files(tmp_path / "small")
    assert all(small[k] == first[k] for k in small if k.endswith(".wav"))
    assert small["captions.jsonl"] == b"".join(first["captions.jsonl"].splitlines(True)[:10])


def test_world_contents(world):
    w, paths = world["world"], world["paths"]
    clips = w["clips"]
    assert len(clips) == N_CLIPS and {len(c["events"]) for c in clips} == {1, 2, 3}
    seen_types = set()
    for c in clips:
        evs = c["events"]
        seen_types |= {e.type for e in evs}
        end = w["settings"]["clip_seconds"] - 0.1
        assert evs[0].onset >= 0.1 - 1e-9 and evs[-1].end <= end + 1e-9
        assert all(b.onset - a.end >= MIN_GAP - 1e-9 for a, b in zip(evs, evs[1:]))
        # Both captions describe exactly the ground truth (the rich one with its times).
        assert A.caption_match(evs, c["caption"], strict=True), c["caption"]
        assert A.caption_match(evs, c["rich_caption"], strict=True), c["rich_caption"]
        for qa in c["qa"]:
            if qa["question"] == "How many sounds are there?":
                assert qa["answer"] == NUMBER_WORDS[len(evs)]
    assert seen_types == {"tone", "noise", "chirp", "clicks"}

    lines = {k: [json.loads(x) for x in open(p)] for k, p in paths.items() if k != "world"}
    val = [c["id"] for c in clips if c["split"] == "validation"]
    assert len(val) == int(N_CLIPS * 0.1)
    assert sum(x.get("split") == "validation" for x in lines["captions"]) == len(val)
    assert [p["id"] for p in lines["prompts"]] == val
    assert all(p["prompt"] == next(c["caption"] for c in clips if c["id"] == p["id"])
               for p in lines["prompts"])
    assert len(lines["audio_qa"]) == 3 * N_CLIPS
    for p in w["text_problems"]:  # the arithmetic is right
        m = re.fullmatch(r"What is (\d+) (\+|-|times) (\d+)\?", p["question"])
        if m:
            a, op, b = int(m[1]), m[2], int(m[3])
            assert int(p["answer"]) == {"+": a + b, "-": a - b, "times": a * b}[op]


def test_loudness_option(tmp_path):
    paths = make_world(str(tmp_path / "loud"), 20, seed=4, loudness=True)
    w = load_world(paths["world"])
    words = " ".join(c["caption"] for c in w["clips"])
    assert "loud" in words and "soft" in words
    acc, bad = _accuracy(w, _waves(str(tmp_path / "loud"), w))
    print(f"\nanalyser with loudness, clean: {acc:.3f}")
    assert acc >= 0.95, bad[:5]


def test_speech_clips_with_and_without_espeak(tmp_path, monkeypatch):
    path = os.environ.get("PATH", "")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no espeak-ng: skipped, and said so
    w = load_world(make_world(str(tmp_path / "none"), 3, seed=0, speech_clips=2)["world"])
    assert w["settings"]["speech"].startswith("skipped") and w["settings"]["speech_clips"] == 0
    # A stand-in espeak-ng that writes a padded 22.05 kHz tone exercises the real code path.
    fake = tmp_path / "bin"
    fake.mkdir()
    t = np.arange(int(0.4 * 22050)) / 22050
    sf.write(fake / "voice.wav", np.pad(0.3 * np.sin(2 * np.pi * 200 * t), 2000), 22050)
    exe = fake / "espeak-ng"
    exe.write_text("#!/bin/sh\nwhile [ $# -gt 0 ]; do "
                   f'[ "$1" = "-w" ] && cp "{fake}/voice.wav" "$2"; shift; done\n')
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(fake) + os.pathsep + path)
    paths = make_world(str(tmp_path / "speech"), 3, seed=0, speech_clips=2)
    w = load_world(paths["world"])
    speech = [c for c in w["clips"] if c["id"].startswith("speech_")]
    assert len(speech) == 2 and w["settings"]["speech"] == "espeak-ng"
    e = speech[0]["events"][0]
    assert e.type == "speech" and 0.35 < e.duration < 0.45
    assert speech[0]["qa"][0]["answer"] == e.word
    assert speech[0]["caption"] == f"a voice saying {e.word}"
    wave, sr = sf.read(os.path.join(tmp_path / "speech", speech[0]["audio"]))
    assert sr == 16000 and len(wave) == 32000
    assert not any("speech_" in json.loads(x)["reference"] for x in open(paths["prompts"]))


# Builders -----------------------------------------------------------------------------------------
def test_real_builders_accept_every_manifest(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from data_pipelines.build import build
    from data_pipelines.sources import open_source
    from data_pipelines.codecs import SpectralCodec
    from ualm_jax.format.records import from_record
    from data_pipelines.tokenizer import TextTokenizer, train_tiny_bpe

    root = str(tmp_path / "w")
    paths = make_world(root, 12, seed=3, n_text=20)
    w = load_world(paths["world"])
    texts = [c["caption"] for c in w["clips"]] + [c["rich_caption"] for c in w["clips"]]
    for name in ("audio_qa", "text_sft", "reason"):
        for line in open(paths[name]):
            d = json.loads(line)
            texts += [m["content"] for m in d.get("messages", [])] + [d.get("prompt", "")]
    tok = train_tiny_bpe(texts, 400, str(tmp_path / "tok"))
    codec = SpectralCodec.fit(_waves(root, w), 16000, K=K, C=C).save(str(tmp_path / "codec"))
    kinds = {"captions": "captions", "rich_captions": "captions", "audio_qa": "audio-qa",
             "text_sft": "text-sft", "reason": "reason"}
    for name, kind in kinds.items():
        out = str(tmp_path / f"out_{name}")
        report = build(kind, paths[name], out, codec=f"spectral:{codec}", tokenizer=tok, n_mels=16)
        assert report["skipped"] == 0 and report["written"] == report["lines"] > 0, \
            (name, report["skipped_lines"][:3])
        assert report["splits"]["validation"]["lines"] >= 1, name
    # A captioning record reads back as its caption.
    src = open_source(str(tmp_path / "out_captions"))
    task, segs, _ = next(from_record(src[i]) for i in range(len(src))
                         if from_record(src[i])[0] == "caption")
    assert TextTokenizer(tok).decode(segs[-1].content) in {c["caption"] for c in w["clips"]}


# Analyser and judge -------------------------------------------------------------------------------
def test_analyser_recovers_clean_clips(world):
    acc, bad = _accuracy(world["world"], world["waves"])
    print(f"\nanalyser exact event lists, clean: {acc:.3f} of {N_CLIPS}")
    assert acc >= 0.95, bad[:5]
    # Another rate and stereo are taken too.
    from data_pipelines.features import resample

    c, x = world["world"]["clips"][0], world["waves"][0]
    x44 = resample(x, 16000, 44100)
    assert A.events_equal(c["events"], A.analyse(np.stack([x44, x44], 1), sr=44100))
    assert A.analyse(np.zeros(16000)) == []


def test_analyser_after_codec_round_trip(world, round_trips):
    w = {"clips": world["world"]["clips"][:N_ROUND_TRIP]}
    acc, bad = _accuracy(w, round_trips)
    print(f"analyser exact event lists, SpectralCodec K={K} C={C} round trip: {acc:.3f} "
          f"of {N_ROUND_TRIP}")
    assert acc >= 0.85, bad[:5]


def test_judge_prefers_the_right_caption(world, round_trips):
    clips = world["world"]["clips"]
    right, wins, n = [], 0, 0
    for i, x in enumerate(round_trips):
        score = A.judge(x, clips[i]["caption"])
        right.append(score)
        wrong = clips[(i + 7) % len(clips)]["caption"]
        if wrong != clips[i]["caption"]:
            n += 1
            wins += score > A.judge(x, wrong)
    print(f"judge on round trips: mean {np.mean(right):.3f} for the right caption; "
          f"beats a wrong one on {wins}/{n}")
    assert np.mean(right) >= 0.9 and wins >= 0.9 * n
    assert A.judge(round_trips[0], clips[0]["rich_caption"]) >= 0.9
    assert A.judge(np.zeros(32000, np.float32), clips[0]["caption"]) == 0.0


def test_caption_match_scores_order_count_and_attributes():
    evs = [Event("tone", 0.1, 0.3, pitch="high"), Event("clicks", 0.8, 0.31, count=3)]
    assert A.parse_caption("a high tone then three clicks") == [
        {"type": "tone", "pitch": "high"}, {"type": "clicks", "count": 3}]
    assert A.caption_match(evs, "a high tone then three clicks") == 1.0
    assert A.caption_match(evs, "a high tone then three clicks", strict=True) is True
    assert A.caption_match(evs, "a tone and some clicks") == 1.0  # unstated attributes are free
    wrong_pitch = A.caption_match(evs, "a low tone then three clicks")
    wrong_order = A.caption_match(evs, "three clicks then a high tone")
    extra = A.caption_match(evs, "a high tone then three clicks then a noise burst")
    assert 0.5 < wrong_pitch < 1.0 and wrong_order == 0.5 and extra == pytest.approx(2 / 3)
    assert A.caption_match(evs, "a low tone then three clicks", strict=True) is False
    assert A.caption_match(evs, [e.to_dict() for e in evs], strict=True) is True
    rich = "layout: a high tone from 0.10 to 0.40 s, then three clicks from 1.20 to 1.51 s."
    assert 0.5 < A.caption_match(evs, rich) < 1.0  # the clicks start 0.4 s late
