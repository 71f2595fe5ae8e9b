"""TFDS manifest builders: tiny real audio (and broken audio), a tiny BPE and a tiny SpectralCodec;
every kind built, its report checked line by line, its records read back through open_source."""
import json
import math

import numpy as np
import pytest

sf = pytest.importorskip("soundfile")
pytest.importorskip("tensorflow_datasets")

from data_pipelines.build import BuildError, build  # noqa: E402

from data_pipelines.sources import open_source, open_tf_dataset
from data_pipelines.builders import encoder_frames_of_mel, from_preference_record  # noqa: E402
from ualm_jax.format.records import from_record  # noqa: E402
from ualm_jax.format.template import render  # noqa: E402
from ualm_jax.format.vocab import JointVocab  # noqa: E402

K, C = 4, 16
CAPTIONS = ["a high tone rings", "a low hum", "a beep then silence", "birds sing at dawn"]


def tone(freq, seconds, sr):
    t = np.arange(int(round(seconds * sr))) / sr
    return (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Audio files, a tokenizer and a codec shared by every test here (librosa JITs once)."""
    from data_pipelines.codecs import SpectralCodec
    from data_pipelines.tokenizer import TextTokenizer, train_tiny_bpe
    from ualm_jax.format.template import AUDIO_TO_CAPTION_PROMPT, TEXT_TO_AUDIO_PROMPT

    root = tmp_path_factory.mktemp("builders")
    audio = root / "audio"
    audio.mkdir()
    stereo = np.stack([tone(440, 1.0, 44100), tone(660, 1.0, 44100)], axis=1)
    sf.write(audio / "hi44k.wav", stereo, 44100)  # 44.1 kHz stereo: converted, not rejected
    sf.write(audio / "low16k.wav", tone(220, 0.5, 16000), 16000)
    sf.write(audio / "long.wav", tone(330, 3.0, 16000), 16000)
    (audio / "corrupt.wav").write_bytes(np.random.default_rng(0).bytes(2048))
    sf.write(audio / "empty.wav", np.zeros(0, np.float32), 16000)
    nan = tone(440, 0.5, 16000)
    nan[100:200] = np.nan
    sf.write(audio / "nan.wav", nan, 16000, subtype="FLOAT")

    texts = CAPTIONS + [TEXT_TO_AUDIO_PROMPT, AUDIO_TO_CAPTION_PROMPT, "what do you hear? yes no"]
    tok_path = train_tiny_bpe(texts * 4, 400, str(root / "tok"))
    codec = SpectralCodec.fit([tone(f, 1.0, 16000) for f in (220, 330, 440, 660)], 16000, K=K, C=C)
    codec_dir = codec.save(str(root / "codec"))
    return {"root": root, "tokenizer": tok_path, "tok": TextTokenizer(tok_path),
            "codec": f"spectral:{codec_dir}"}


def write_manifest(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return str(path)


def check_report(report, lines, expected_skips):
    """Counts add up; each skipped line has the expected code and a reason naming the problem."""
    assert report["written"] + report["skipped"] == report["lines"] == lines
    got = {e["line"]: e for e in report["skipped_lines"]}
    assert sorted(got) == sorted(expected_skips)
    for line, (code, words) in expected_skips.items():
        assert got[line]["code"] == code, got[line]
        for w in words:
            assert w in got[line]["reason"], got[line]


def vocab_of(data):
    return JointVocab(data["tok"].vocab_size, K, C)


def test_captions(data):
    root = data["root"]
    manifest = write_manifest(root / "captions.jsonl", [
        {"audio": "audio/hi44k.wav", "caption": CAPTIONS[0]},
        {"audio": "audio/low16k.wav", "caption": CAPTIONS[1], "split": "validation"},
        {"audio": "audio/corrupt.wav", "caption": "x"},
        {"audio": "audio/empty.wav", "caption": "x"},
        {"audio": "audio/nan.wav", "caption": "x"},
        {"audio": "audio/long.wav", "caption": "x"},
        {"audio": "audio/hi44k.wav", "caption": "  "},
        '{"audio": "audio/hi44k.wav", "caption": ',
        {"audio": "audio/missing.wav", "caption": "x"},
        {"audio": "audio/hi44k.wav"},
    ])
    out = root / "out_captions"
    report = build("captions", manifest, str(out), codec=data["codec"], tokenizer=data["tokenizer"],
                   n_mels=80, max_seconds=2.5)
    check_report(report, 10, {
        3: ("audio_unreadable", ["corrupt.wav"]), 4: ("audio_empty", ["empty.wav", "no samples"]),
        5: ("audio_nan", ["nan.wav", "NaN"]), 6: ("audio_too_long", ["long.wav", "max_seconds"]),
        7: ("empty_text", ["empty caption"]), 8: ("bad_json", ["malformed JSON"]),
        9: ("audio_missing", ["missing.wav", "not found"]), 10: ("missing_key", ["'caption'"])})
    assert report["splits"] == {"train": {"lines": 1, "records": 2},
                                "validation": {"lines": 1, "records": 2}}
    assert json.loads((out / "build_report.json").read_text()) == report

    vocab, tok = vocab_of(data), data["tok"]
    stats = json.loads((out / "stats.json").read_text())
    for split, caption, seconds in (("train", CAPTIONS[0], 1.0), ("validation", CAPTIONS[1], 0.5)):
        src = open_source(str(out), split)
        recs = {r["task"]: r for r in (src[i] for i in range(len(src)))}
        assert sorted(recs) == ["caption", "t2a"]
        # t2a: user prompt + caption -> assistant codes [T, K] at 50 frames/s.
        task, segs, mels = from_record(recs["t2a"])
        assert task == "t2a" and mels == [] and [s.role for s in segs] == ["user", "assistant"]
        assert tok.decode(segs[0].content).endswith(caption)
        codes = segs[1].content
        assert codes.shape[1] == K and abs(codes.shape[0] - 50 * seconds) <= 1
        assert codes.min() >= 0 and codes.max() < C
        # caption: prompt + encoder input (mel) -> caption ids.
        task, segs, mels = from_record(recs["caption"], frames_of=encoder_frames_of_mel)
        assert [(s.role, s.modality) for s in segs] == [("user", "text"), ("user", "audio"),
                                                         ("assistant", "text")]
        assert tok.decode(segs[2].content) == caption
        assert mels[0].shape == (int(100 * seconds), 80) and mels[0].dtype == np.float16
        assert segs[1].content == int(25 * seconds)  # 25 encoder frames per second
        # stats: rendered lengths per task.
        for name, rec in recs.items():
            _, s, _ = from_record(rec, frames_of=encoder_frames_of_mel)
            t = stats[split]["tasks"][name]
            assert t["records"] == 1 and t["tokens"] == len(render(s, vocab)) == t["mean_tokens"]


def test_captions_single_task_and_tfrecord(data):
    """--task caption needs no codec; the tfrecord build reads through tf.data, not open_source."""
    root = data["root"]
    manifest = write_manifest(root / "cap_only.jsonl",
                              [{"audio": "audio/low16k.wav", "caption": CAPTIONS[1]}])
    out = str(root / "out_cap_tfrecord")
    report = build("captions", manifest, out, tokenizer=data["tokenizer"], task="caption",
                   file_format="tfrecord", n_mels=80)
    assert report["written"] == 1 and report["splits"]["train"]["records"] == 1
    recs = list(open_tf_dataset(out).as_numpy_iterator())
    assert len(recs) == 1 and recs[0]["task"] == b"caption" and recs[0]["mel"].shape == (50, 80)
    with pytest.raises(ValueError, match="tfrecord"):
        open_source(out)
    with pytest.raises(BuildError, match="codec"):
        build("captions", manifest, out, tokenizer=data["tokenizer"])  # t2a needs codes


def test_audio_qa(data):
    root = data["root"]
    q = "what do you hear?"
    manifest = write_manifest(root / "qa.jsonl", [
        {"messages": [{"role": "user", "content": q, "audio": "audio/hi44k.wav"},
                      {"role": "assistant", "content": "a high tone rings"}]},
        {"messages": [{"role": "system", "content": "yes"},
                      {"role": "user", "content": "", "audio": ["audio/low16k.wav"]},
                      {"role": "assistant", "content": "a low hum"},
                      {"role": "user", "content": "yes?"},
                      {"role": "assistant", "content": "no"}]},
        {"messages": [{"role": "user", "content": q, "audio": "audio/hi44k.wav"},
                      {"role": "assistant", "content": ""}]},
        {"messages": [{"role": "user", "content": q, "audio": "audio/corrupt.wav"},
                      {"role": "assistant", "content": "no"}]},
        {"conversation": []},
    ])
    out = str(root / "out_qa")
    report = build("audio-qa", manifest, out, tokenizer=data["tokenizer"], n_mels=80)
    check_report(report, 5, {3: ("empty_text", ["empty answer"]),
                             4: ("audio_unreadable", ["corrupt.wav"]),
                             5: ("unknown_key", ["'conversation'", "messages"])})
    src = open_source(out)
    assert len(src) == 2
    by_len = sorted((from_record(src[i], frames_of=encoder_frames_of_mel) for i in range(2)),
                    key=lambda r: len(r[1]))
    task, segs, mels = by_len[0]
    assert task == "audio_qa"
    assert [(s.role, s.modality) for s in segs] == [("user", "text"), ("user", "audio"),
                                                     ("assistant", "text")]
    assert data["tok"].decode(segs[0].content) == q and mels[0].shape == (100, 80)
    assert data["tok"].decode(segs[2].content) == "a high tone rings"
    task, segs, mels = by_len[1]  # system, user audio only (empty text), answer, text turn
    assert [s.role for s in segs] == ["system", "user", "assistant", "user", "assistant"]
    assert segs[1].modality == "audio" and mels[0].shape == (50, 80)


def test_text_sft_cli_eval_split(data, capsys):
    from ualm_jax.cli import main

    root = data["root"]
    good = [{"messages": [{"role": "system", "content": "yes"},
                          {"role": "user", "content": f"what do you hear? {i}"},
                          {"role": "assistant", "content": CAPTIONS[i % 4]}]} for i in range(16)]
    bad = [{"messages": [{"role": "user", "content": "yes"}, {"role": "assistant"}]},
           {"messages": [{"role": "robot", "content": "no"}]},
           {"messages": [{"role": "user", "content": "no", "audio": "a.wav"},
                         {"role": "assistant", "content": "no"}]},
           "not json"]
    manifest = write_manifest(root / "sft.jsonl", good + bad)
    out = str(root / "out_sft")
    args = ["data", "build", "text-sft", "--manifest", manifest, "--out", out,
            "--tokenizer", data["tokenizer"], "--eval-fraction", "0.5"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "16 written" in printed and "4 skipped" in printed and "build_report.json" in printed
    report = json.loads((root / "out_sft" / "build_report.json").read_text())
    check_report(report, 20, {17: ("missing_key", ["'content'"]), 18: ("bad_value", ["robot"]),
                              19: ("bad_value", ["audio"]), 20: ("bad_json", ["malformed JSON"])})
    n_train, n_val = report["splits"]["train"]["records"], report["splits"]["validation"]["records"]
    assert n_train + n_val == 16 and n_train > 0 and n_val > 0
    stats = json.loads((root / "out_sft" / "stats.json").read_text())
    assert stats["validation"]["tasks"]["text_sft"]["records"] == n_val
    val = open_source(out, "validation")
    users = sorted(data["tok"].decode(from_record(val[i])[1][1].content) for i in range(len(val)))
    # Deterministic: a rebuild puts the same lines in validation.
    assert main(args) == 0
    val2 = open_source(out, "validation")
    assert users == sorted(data["tok"].decode(from_record(val2[i])[1][1].content)
                           for i in range(len(val2)))
    # Usage errors: exit 2 with a message naming the file.
    assert main(["data", "build", "text-sft", "--manifest", str(root / "nope.jsonl"), "--out", out,
                 "--tokenizer", data["tokenizer"]]) == 2
    assert "nope.jsonl" in capsys.readouterr().err


def test_preference(data):
    root = data["root"]
    manifest = write_manifest(root / "pref.jsonl", [
        {"prompt": CAPTIONS[0], "chosen": "audio/hi44k.wav", "rejected": "audio/low16k.wav",
         "ref_logp_chosen": -120.5, "ref_logp_rejected": -130.25},
        {"prompt": CAPTIONS[1], "chosen": "audio/low16k.wav", "rejected": "audio/hi44k.wav"},
        {"prompt": CAPTIONS[2], "chosen": "audio/hi44k.wav", "rejected": "audio/missing.wav"},
        {"prompt": CAPTIONS[3], "chosen": "audio/hi44k.wav", "rejected": "audio/low16k.wav",
         "ref_logp_chosen": -1.0},
    ])
    out = str(root / "out_pref")
    report = build("preference", manifest, out, codec=data["codec"], tokenizer=data["tokenizer"])
    check_report(report, 4, {3: ("audio_missing", ["missing.wav"]),
                             4: ("missing_key", ["ref_logp_rejected"])})
    src = open_source(out)
    assert len(src) == 2
    pairs = {}
    for i in range(2):
        rec = src[i]
        assert rec["task"] == "preference"
        chosen, rejected, logps = from_preference_record(rec)
        caption = data["tok"].decode(chosen[1][0].content)
        pairs[caption] = (chosen, rejected, logps)
    chosen, rejected, logps = pairs[next(p for p in pairs if p.endswith(CAPTIONS[0]))]
    assert logps == (-120.5, -130.25)
    assert chosen[0] == rejected[0] == "t2a"
    assert chosen[1][1].content.shape == (50, K) and rejected[1][1].content.shape == (25, K)
    _, _, logps = pairs[next(p for p in pairs if p.endswith(CAPTIONS[1]))]
    assert logps is None
    stats = json.loads((root / "out_pref" / "stats.json").read_text())
    vocab = vocab_of(data)
    expected = sum(len(render(side[1], vocab)) for p in pairs.values() for side in p[:2])
    assert stats["train"]["tasks"]["preference"]["tokens"] == expected
    assert not math.isnan(stats["train"]["tasks"]["preference"]["mean_tokens"])


def test_builds_survive_lines_that_all_fail(data):
    """No parsable line: a report and no dataset. A split whose every line fails is left out."""
    root = data["root"]
    manifest = write_manifest(root / "bad.jsonl", ["{", "", "[1, 2]"])
    out = str(root / "out_bad")
    report = build("text-sft", manifest, out, tokenizer=data["tokenizer"])
    check_report(report, 3, {1: ("bad_json", ["malformed"]), 2: ("blank_line", ["empty line"]),
                             3: ("bad_json", ["JSON object"])})
    assert report["dataset_dir"] is None and report["splits"] == {}
    with pytest.raises(ValueError, match="no records"):
        open_source(out)

    manifest = write_manifest(root / "half_bad.jsonl", [
        {"audio": "audio/low16k.wav", "caption": CAPTIONS[1]},
        {"audio": "audio/corrupt.wav", "caption": "x", "split": "validation"}])
    out = str(root / "out_half_bad")
    report = build("captions", manifest, out, tokenizer=data["tokenizer"], task="caption", n_mels=80)
    check_report(report, 2, {2: ("audio_unreadable", ["corrupt.wav"])})
    assert list(report["splits"]) == ["train"] and len(open_source(out)) == 1
    with pytest.raises(KeyError, match="validation"):
        open_source(out, "validation")


def test_manifest_chunks_cover_every_line_once(tmp_path):
    """Beam workers read chunks by byte offset: together they give back every line in order."""
    from data_pipelines.builders.manifest import read_chunk, scan_manifest

    path = tmp_path / "m.jsonl"
    lines = [json.dumps({"i": i, "split": "validation" if i % 3 == 0 else "train"}) for i in range(7)]
    path.write_bytes(("\r\n".join(lines[:5]) + "\n\n" + "\n".join(lines[5:])).encode())  # no final \n
    scan = scan_manifest(str(path), 0.0, chunk_lines=3)
    assert scan.lines == 8 and [c.lines for c in scan.chunks] == [3, 3, 2]
    assert scan.candidates == {"train": 4, "validation": 3}
    got = [(n, raw.strip()) for c in scan.chunks for n, raw in read_chunk(str(path), c)]
    assert [n for n, _ in got] == list(range(1, 9))
    assert [r.decode() for _, r in got if r] == lines


def test_fast_record_decoding_equals_tfds(data):
    """open_source decodes flat records straight from their protobuf: the same dtypes, shapes and
    values as TFDS's own decoder, for records with codes, with mel and with neither."""
    import tensorflow_datasets as tfds

    from data_pipelines.sources import _dataset_dir, _decode_text

    root = data["root"]
    caps = write_manifest(root / "fast_caps.jsonl", [
        {"audio": "audio/hi44k.wav", "caption": CAPTIONS[0]},
        {"audio": "audio/low16k.wav", "caption": CAPTIONS[1]}])
    sft = write_manifest(root / "fast_sft.jsonl", [
        {"messages": [{"role": "user", "content": "what do you hear?"},
                      {"role": "assistant", "content": "yes"}]}])
    for kind, manifest in (("captions", caps), ("text-sft", sft)):
        out = root / f"fast_{kind}"
        build(kind, manifest, str(out), codec=data["codec"], tokenizer=data["tokenizer"], n_mels=80)
        fast = open_source(str(out))
        assert fast._raw is not None  # the fast path is taken
        slow = tfds.builder_from_directory(_dataset_dir(str(out))).as_data_source("train")
        assert len(fast) == len(slow) > 0
        for a, b in zip(fast.__getitems__(range(len(fast))), (_decode_text(slow[i]) for i in range(len(slow)))):
            assert a.keys() == b.keys()
            assert a["task"] == b["task"]
            for k in a.keys() - {"task"}:
                assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
                assert np.array_equal(a[k], b[k]), k
