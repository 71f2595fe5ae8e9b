"""One's own clips, end to end: `ualm data tokenizer` and `ualm data codec` on real audio files,
a build that carries its SpectralCodec and survives being moved, held-out clips that stay held
out across kinds (split by audio), splits that survive re-serialising, unknown keys refused with
a did-you-mean, and a build that wrote nothing failing in the CLI."""
import json
import os
import shutil

import numpy as np
import pytest

sf = pytest.importorskip("soundfile")
pytest.importorskip("tensorflow_datasets")

from data_pipelines.build import BuildError, build  # noqa: E402

from data_pipelines.sources import build_artefacts, open_source
from data_pipelines.builders import manifest as common  # noqa: E402
from ualm_jax.cli import main  # noqa: E402

SR = 16000
N_CLIPS = 12
WORDS = ["chirp", "hum", "buzz", "whistle"]


def tone(freq, seconds=0.3, sr=SR):
    t = np.arange(int(seconds * sr)) / sr
    return (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def caption(i):
    return f"a {WORDS[i % 4]} at {200 + 50 * i} hertz"


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """12 short clips (mono 16 kHz, one 44.1 kHz stereo), a corrupt file, a captions manifest and
    an audio-QA manifest over the same clips, a tiny tokenizer and codec."""
    from data_pipelines.codecs import SpectralCodec
    from data_pipelines.tokenizer import train_tiny_bpe
    from ualm_jax.format.template import AUDIO_TO_CAPTION_PROMPT, TEXT_TO_AUDIO_PROMPT

    root = tmp_path_factory.mktemp("own")
    (root / "clips").mkdir()
    for i in range(N_CLIPS):
        sf.write(root / "clips" / f"c{i:02d}.wav", tone(200 + 50 * i), SR)
    sf.write(root / "clips" / "stereo.wav", np.stack([tone(300, 0.3, 44100)] * 2, 1), 44100)
    (root / "clips" / "corrupt.wav").write_bytes(np.random.default_rng(0).bytes(1024))
    caps = write_lines(root / "caps.jsonl", [{"audio": f"clips/c{i:02d}.wav", "caption": caption(i)}
                                             for i in range(N_CLIPS)])
    # The QA manifest names the same files written differently ("./", doubled slashes).
    qa = write_lines(root / "qa.jsonl", [
        {"messages": [{"role": "user", "content": "what is it?",
                       "audio": f"./clips//c{i:02d}.wav"},
                      {"role": "assistant", "content": WORDS[i % 4]}]} for i in range(N_CLIPS)])
    texts = [caption(i) for i in range(N_CLIPS)] + WORDS + ["what is it?", TEXT_TO_AUDIO_PROMPT,
                                                           AUDIO_TO_CAPTION_PROMPT]
    tok = train_tiny_bpe(texts * 4, 300, str(root / "tok"))
    codec = SpectralCodec.fit([tone(f) for f in (200, 400, 800)], SR, K=2, C=8)
    return {"root": root, "caps": caps, "qa": qa, "tokenizer": tok,
            "codec_dir": codec.save(str(root / "codec")), "codec": codec}


def one_line(text):
    lines = text.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# ualm data tokenizer ------------------------------------------------------------------------------
def test_tokenizer_command_trains_on_the_manifests_text(own, tmp_path, capsys):
    from data_pipelines.builders.contents import manifest_texts
    from data_pipelines.tokenizer import TextTokenizer, train_tiny_bpe

    root = own["root"]
    held = write_lines(root / "held.jsonl", [
        {"audio": "clips/c00.wav", "caption": "zyzzyva " * 20, "split": "validation"},
        {"behaviour": "enrichment", "prompt": "quetzalcoatl " * 20, "rich_caption": "plan",
         "audio": "clips/c01.wav"},
        "not json"])
    out = tmp_path / "tok"
    assert main(["data", "tokenizer", "--manifest", own["caps"], own["qa"], held,
                 "--vocab-size", "400", "--out", str(out)]) == 0
    printed = one_line(capsys.readouterr().out)
    assert str(out / "tokenizer.json") in printed and "vocab" in printed
    tok = TextTokenizer(str(out))
    # Captions, message contents and a reason prompt were learned; held-out text was not.
    assert len(tok.encode(" whistle")) == 1 and len(tok.encode(" hertz")) == 1
    assert len(tok.encode(" quetzalcoatl")) == 1
    assert len(tok.encode(" zyzzyva")) > 2
    assert tok.vocab_size <= 400 and str(tok.vocab_size) in printed
    # The same as the library functions the command composes.
    again = train_tiny_bpe(manifest_texts([own["caps"], own["qa"], held]), 400, str(tmp_path / "b"))
    assert open(again).read() == (out / "tokenizer.json").read_text()


def test_tokenizer_command_errors(own, tmp_path, capsys):
    root = own["root"]
    missing = str(root / "nope.jsonl")
    out = str(tmp_path / "tok")
    assert main(["data", "tokenizer", "--manifest", own["caps"], missing, "--vocab-size", "300",
                 "--out", out]) == 2
    err = one_line(capsys.readouterr().err)
    assert "nope.jsonl" in err and "not found" in err
    no_text = write_lines(root / "no_text.jsonl", [{"audio": "clips/c00.wav"}, "[1]", ""])
    assert main(["data", "tokenizer", "--manifest", no_text, "--vocab-size", "300",
                 "--out", out]) == 2
    err = one_line(capsys.readouterr().err)
    assert "no text" in err and "no_text.jsonl" in err
    assert main(["data", "tokenizer", "--manifest", own["caps"], "--vocab-size", "100",
                 "--out", out]) == 2
    assert "--vocab-size" in one_line(capsys.readouterr().err)
    assert not os.path.exists(out)


# ualm data codec ----------------------------------------------------------------------------------
def test_codec_command_fits_on_the_audio_the_manifests_name(own, tmp_path, capsys):
    from data_pipelines.codecs import SpectralCodec, load_codec
    from data_pipelines.features import load_audio

    root = own["root"]
    sub = root / "sub"
    sub.mkdir(exist_ok=True)
    # Paths are relative to each manifest; validation lines and unreadable files are left out.
    other = write_lines(sub / "pairs.jsonl", [
        {"prompt": "x", "chosen": "../clips/stereo.wav", "rejected": "../clips/corrupt.wav"},
        {"prompt": "y", "chosen": "../clips/c11.wav", "rejected": "../clips/c10.wav",
         "split": "validation"}])
    caps = write_lines(root / "caps_some.jsonl", [
        {"audio": f"clips/c{i:02d}.wav", "caption": caption(i)} for i in range(3)])
    out = tmp_path / "codec"
    assert main(["data", "codec", "--manifest", caps, own["qa"], other, "--codebooks", "2",
                 "--codes", "8", "--out", str(out)]) == 0
    printed = one_line(capsys.readouterr().out)
    assert str(out) in printed and "1 unreadable" in printed and "corrupt.wav" in printed
    codec = load_codec(str(out))
    assert isinstance(codec, SpectralCodec)
    assert (codec.num_codebooks, codec.codebook_size) == (2, 8)
    files = [root / "clips" / f"c{i:02d}.wav" for i in range(N_CLIPS)]
    files.append(root / "clips" / "stereo.wav")
    expected = SpectralCodec.fit([load_audio(str(f)) for f in files], SR, K=2, C=8)
    np.testing.assert_array_equal(codec.codebooks, expected.codebooks)


def test_codec_command_errors(own, tmp_path, capsys):
    root = own["root"]
    out = str(tmp_path / "codec")
    args = ["--codebooks", "2", "--codes", "8", "--out", out]
    assert main(["data", "codec", "--manifest", str(root / "gone.jsonl"), *args]) == 2
    assert "gone.jsonl" in one_line(capsys.readouterr().err)
    text_only = write_lines(root / "text_only.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}])
    assert main(["data", "codec", "--manifest", text_only, *args]) == 2
    err = one_line(capsys.readouterr().err)
    assert "no audio" in err and "text_only.jsonl" in err
    broken = write_lines(root / "broken.jsonl", [{"audio": "clips/corrupt.wav", "caption": "x"},
                                                 {"audio": "clips/absent.wav", "caption": "y"}])
    assert main(["data", "codec", "--manifest", broken, *args]) == 2
    err = one_line(capsys.readouterr().err)
    assert "no readable audio" in err and "broken.jsonl" in err and "corrupt.wav" in err
    assert not os.path.exists(out)


# A build carries its codec ------------------------------------------------------------------------
def test_spectral_codec_spec_is_copied_and_the_build_can_move(own, tmp_path):
    from data_pipelines.codecs import load_codec
    from data_pipelines.tokenizer import TextTokenizer

    spec = f"spectral:{own['codec_dir']}"
    assert load_codec(spec).config() == own["codec"].config()  # the one loader reads it
    out = tmp_path / "here" / "t2a"
    report = build("captions", own["caps"], str(out), codec=spec, tokenizer=own["tokenizer"],
                   task="t2a")
    assert report["written"] == N_CLIPS
    assert report["codec"] == "codec" and report["tokenizer"] == "tokenizer.json"
    assert sorted(os.listdir(out / "codec")) == ["codebooks.npz", "config.json"]
    moved = tmp_path / "elsewhere" / "t2a"
    moved.parent.mkdir()
    shutil.move(str(out), str(moved))
    arts = build_artefacts(str(moved))
    assert arts == {"tokenizer": str(moved / "tokenizer.json"), "codec": str(moved / "codec")}
    codec = load_codec(arts["codec"])
    np.testing.assert_array_equal(codec.codebooks, own["codec"].codebooks)
    assert TextTokenizer(arts["tokenizer"]).vocab_size > 0
    assert len(open_source(str(moved))) == N_CLIPS
    # A report of an older build (an absolute "spectral:DIR") still reads.
    report_path = moved / "build_report.json"
    old = json.loads(report_path.read_text())
    old["codec"] = spec
    report_path.write_text(json.dumps(old))
    assert build_artefacts(str(moved))["codec"] == own["codec_dir"]
    assert load_codec(build_artefacts(str(moved))["codec"]).codebook_size == 8


def test_codec_copies_of_one_codec_are_one_codec(own, tmp_path):
    """Each build holds its own copy: paths differ, `codec_identity` (what a run comparing its
    builds' codecs should compare) does not; another codec differs."""
    from data_pipelines.codecs import SpectralCodec, codec_identity

    arts = []
    for name, task in (("one", "caption"), ("two", "caption")):
        build("captions", own["caps"], str(tmp_path / name), codec=f"spectral:{own['codec_dir']}",
              tokenizer=own["tokenizer"], task=task, n_mels=16)
        arts.append(build_artefacts(str(tmp_path / name))["codec"])
    assert arts[0] != arts[1]
    assert codec_identity(arts[0]) == codec_identity(arts[1]) == codec_identity(own["codec_dir"])
    other = SpectralCodec.fit([tone(f) for f in (250, 500, 900)], SR, K=2, C=8)
    assert codec_identity(other.save(str(tmp_path / "other"))) != codec_identity(arts[0])
    assert codec_identity(str(tmp_path / "nowhere")) == str(tmp_path / "nowhere")


def test_codec_copy_across_rebuilds(own, tmp_path):
    """A rebuild replaces the old copy; a build without a codec drops it; a folder named codec
    that is no build's copy is never overwritten; a codec already inside the build is named
    where it lies."""
    out = tmp_path / "b"
    args = dict(tokenizer=own["tokenizer"], task="caption")
    build("captions", own["caps"], str(out), codec=own["codec"], **args)  # a codec object
    assert (out / "codec" / "config.json").exists()
    build("captions", own["caps"], str(out), **args)
    assert not (out / "codec").exists() and build_artefacts(str(out))["codec"] is None
    (out / "codec").mkdir()
    (out / "codec" / "mine.txt").write_text("mine")
    with pytest.raises(BuildError, match="codec exists"):
        build("captions", own["caps"], str(out), codec=own["codec_dir"], **args)
    assert (out / "codec" / "mine.txt").read_text() == "mine"
    shutil.rmtree(out / "codec")
    own["codec"].save(str(out / "my_codec"))
    report = build("captions", own["caps"], str(out), codec=str(out / "my_codec"), **args)
    assert report["codec"] == "my_codec" and not (out / "codec").exists()


def test_a_bucket_build_carries_its_codec(gcs, own, tmp_path):
    """Built locally and uploaded (the CLI), or saved straight into a bucket: the copy travels,
    and the staged copy of the build finds it."""
    from data_pipelines.build import _save_codec_copy
    from data_pipelines.codecs import load_codec
    from data_pipelines.staging import local_build_dir

    bucket = gcs.make_bucket("ualm-own-data")
    # A build straight into a bucket writes its shards with TensorFlow's own GCS client, which
    # the test server does not serve: the codec copy's part of it is checked alone.
    assert _save_codec_copy(own["codec"], f"{bucket}/direct") == "codec"
    names = gcs.objects("ualm-own-data", "direct/codec/")
    assert sorted(n.rsplit("/", 1)[1] for n in names) == ["codebooks.npz", "config.json"]
    assert main(["data", "build", "captions", "--manifest", own["caps"], "--out", f"{bucket}/cli",
                 "--codec", f"spectral:{own['codec_dir']}", "--tokenizer", own["tokenizer"],
                 "--task", "caption", "--n-mels", "16"]) == 0
    names = gcs.objects("ualm-own-data", "cli/codec/")
    assert sorted(n.rsplit("/", 1)[1] for n in names) == ["codebooks.npz", "config.json"]
    assert build_artefacts(f"{bucket}/cli")["codec"] == f"{bucket}/cli/codec"
    staged = build_artefacts(local_build_dir(f"{bucket}/cli", str(tmp_path / "stage")))
    assert staged["codec"].startswith(str(tmp_path / "stage"))
    np.testing.assert_array_equal(load_codec(staged["codec"]).codebooks, own["codec"].codebooks)


def test_neural_codec_stays_referenced(own, tmp_path, tiny_xcodec_dir):
    out = tmp_path / "x"
    manifest = write_lines(tmp_path / "one.jsonl", [
        {"audio": str(own["root"] / "clips" / "c00.wav"), "caption": "a chirp"}])
    report = build("captions", manifest, str(out), codec=tiny_xcodec_dir,
                   tokenizer=own["tokenizer"], task="t2a")
    assert report["written"] == 1
    assert report["codec"] == os.path.abspath(tiny_xcodec_dir) and not (out / "codec").exists()
    shutil.move(str(out), str(tmp_path / "y"))
    assert build_artefacts(str(tmp_path / "y"))["codec"] == os.path.abspath(tiny_xcodec_dir)


# Splits -------------------------------------------------------------------------------------------
def clips_by_split(report, manifest):
    """{split: set of clip file names} from a report's validation_lines and the manifest."""
    rows = [json.loads(x) for x in open(manifest)]
    clips = []
    for row in rows:
        audio = row.get("audio") or next(m["audio"] for m in row["messages"] if "audio" in m)
        clips.append(os.path.basename(audio))
    val = {clips[n - 1] for n in report["validation_lines"]}
    return {"validation": val, "train": set(clips) - val}


def test_split_by_audio_holds_a_clip_out_in_every_kind(own, tmp_path):
    caps = build("captions", own["caps"], str(tmp_path / "caps"), tokenizer=own["tokenizer"],
                 task="caption", eval_fraction=0.4, n_mels=16)
    qa = build("audio-qa", own["qa"], str(tmp_path / "qa"), tokenizer=own["tokenizer"],
               eval_fraction=0.4, n_mels=16)
    assert caps["split_by"] == qa["split_by"] == "audio"
    a, b = clips_by_split(caps, own["caps"]), clips_by_split(qa, own["qa"])
    assert a["validation"] and a["train"]
    assert a == b  # the same clips held out, though the paths are written differently
    assert not (a["train"] | b["train"]) & (a["validation"] | b["validation"])
    assert caps["splits"]["validation"]["lines"] == len(caps["validation_lines"])
    # Hashing whole lines (the old rule) would have split these two manifests differently.
    by_line = build("audio-qa", own["qa"], str(tmp_path / "qa_line"), tokenizer=own["tokenizer"],
                    eval_fraction=0.4, n_mels=16, split_by="line")
    assert by_line["split_by"] == "line" and clips_by_split(by_line, own["qa"]) != a


def test_a_line_naming_a_held_out_clip_is_held_out():
    from data_pipelines.builders.audio_qa import AudioQAConverter

    splitter = common.Splitter(0.3, "audio", AudioQAConverter.audio_refs)
    names = [f"c{i}.wav" for i in range(50)]
    held = [n for n in names if splitter.held_out({"messages": [{"audio": n}]})]
    kept = [n for n in names if n not in held]
    assert held and kept
    for other in kept[:5]:
        line = {"messages": [{"role": "user", "content": "", "audio": [other, held[0]]},
                             {"role": "assistant", "content": "x"}]}
        assert splitter.split_of(line) == "validation"
        assert splitter.split_of({"messages": [{"audio": other}]}) == "train"
    # Monotonic in the fraction: a clip held out at 0.3 is held out at 0.5.
    wider = common.Splitter(0.5, "audio", AudioQAConverter.audio_refs)
    assert all(wider.held_out({"messages": [{"audio": n}]}) for n in held)
    with pytest.raises(ValueError, match="split_by"):
        common.Splitter(0.1, "clip")


def test_reserialised_and_reordered_lines_keep_their_split(own, tmp_path, capsys):
    rows = [{"messages": [{"role": "user", "content": f"say {w} {i}"},
                          {"role": "assistant", "content": w}]}
            for i, w in enumerate(WORDS * 5)]
    rows[3]["split"] = "validation"
    first = write_lines(tmp_path / "a.jsonl", rows)
    # The same lines reordered, keys reordered, other spacing and escapes.
    again = [json.dumps({k: r[k] for k in reversed(list(r))}, indent=None, separators=(", ", " : "),
                        ensure_ascii=True) for r in reversed(rows)]
    second = write_lines(tmp_path / "b.jsonl", again)

    def held(manifest, out):
        assert main(["data", "build", "text-sft", "--manifest", manifest, "--out", str(out),
                     "--tokenizer", own["tokenizer"], "--eval-fraction", "0.3"]) == 0
        report = json.loads((out / "build_report.json").read_text())
        assert report["split_by"] == "line"
        lines = open(manifest).read().splitlines()
        return {json.loads(lines[n - 1])["messages"][0]["content"]
                for n in report["validation_lines"]}

    a, b = held(first, tmp_path / "out_a"), held(second, tmp_path / "out_b")
    assert a == b and "say whistle 3" in a and 1 < len(a) < len(rows)
    capsys.readouterr()
    assert main(["data", "build", "text-sft", "--manifest", first, "--out", str(tmp_path / "c"),
                 "--tokenizer", own["tokenizer"], "--eval-fraction", "0.3",
                 "--split-by", "audio"]) == 2
    assert "split-by line" in one_line(capsys.readouterr().err)


def test_validation_lines_list_the_held_out_lines(own, tmp_path):
    rows = [{"audio": f"clips/c{i:02d}.wav", "caption": caption(i)} for i in range(4)]
    rows[1]["split"] = "validation"
    rows[2]["split"] = "val"
    manifest = write_lines(own["root"] / "explicit.jsonl", rows + [{"audio": "clips/corrupt.wav",
                                                                    "caption": "x",
                                                                    "split": "validation"}])
    report = build("captions", manifest, str(tmp_path / "o"), tokenizer=own["tokenizer"],
                   task="caption", n_mels=16)
    assert report["validation_lines"] == [2, 3]  # line 5 is validation but skipped
    assert len(open_source(str(tmp_path / "o"), "validation")) == 2


# Unknown keys -------------------------------------------------------------------------------------
def test_unknown_keys_are_skipped_with_did_you_mean(own, tmp_path):
    root = own["root"]
    caps = write_lines(root / "typos.jsonl", [
        {"audio": "clips/c00.wav", "caption": "a chirp", "splt": "validation"},
        {"audio": "clips/c01.wav", "captoin": "a hum"},
        {"audio": "clips/c02.wav", "caption": "a buzz", "id": "k2", "split": "train"},
        {"audio": "clips/c03.wav", "caption": "a buzz", "loudness": 3}])
    report = build("captions", caps, str(tmp_path / "caps"), tokenizer=own["tokenizer"],
                   task="caption", n_mels=16)
    got = {e["line"]: e for e in report["skipped_lines"]}
    assert sorted(got) == [1, 2, 4] and {e["code"] for e in got.values()} == {"unknown_key"}
    assert "'splt'" in got[1]["reason"] and "did you mean 'split'?" in got[1]["reason"]
    assert "did you mean 'caption'?" in got[2]["reason"]
    assert "'loudness'" in got[4]["reason"]
    assert "known: audio, caption, id, split" in got[4]["reason"]

    qa = write_lines(root / "typos_qa.jsonl", [
        {"messages": [{"role": "user", "content": "what is it?", "audio": "clips/c00.wav"},
                      {"role": "assistant", "contnet": "a chirp"}]},
        {"messages": [{"role": "user", "content": "what?", "adio": "clips/c00.wav"},
                      {"role": "assistant", "content": "a chirp"}]}])
    report = build("audio-qa", qa, str(tmp_path / "qa"), tokenizer=own["tokenizer"], n_mels=16)
    got = {e["line"]: e for e in report["skipped_lines"]}
    assert got[1]["code"] == got[2]["code"] == "unknown_key"
    assert "in message 1 (did you mean 'content'?)" in got[1]["reason"]
    assert "in message 0 (did you mean 'audio'?)" in got[2]["reason"]


def test_every_kind_accepts_its_own_keys_and_refuses_others(own, tmp_path):
    """Optional keys (ref log-probs, make-pairs' id and scores, each reason behaviour's own keys)
    pass; a key of another behaviour or a typo inside a dialogue turn does not."""
    root = own["root"]
    pairs = write_lines(root / "pairs_keys.jsonl", [
        {"prompt": "a chirp", "chosen": "clips/c00.wav", "rejected": "clips/c01.wav",
         "ref_logp_chosen": -1.0, "ref_logp_rejected": -2.0, "id": "p0", "score_chosen": 0.9,
         "score_rejected": 0.1, "split": "train"},
        {"prompt": "a chirp", "chosen": "clips/c00.wav", "rejected": "clips/c01.wav",
         "ref_logp_chosen": -1.0, "ref_logp_rejectd": -2.0}])
    report = build("preference", pairs, str(tmp_path / "p"), codec=own["codec"],
                   tokenizer=own["tokenizer"])
    assert report["written"] == 1
    assert "did you mean 'ref_logp_rejected'?" in report["skipped_lines"][0]["reason"]

    reason = write_lines(root / "reason_keys.jsonl", [
        {"behaviour": "enrichment", "prompt": "calm", "rich_caption": "a hum",
         "audio": "clips/c00.wav"},
        {"behaviour": "dialogue", "turns": [{"role": "user", "content": "calm"}],
         "rich_caption": "a hum", "audio": "clips/c00.wav", "id": 7},
        {"behaviour": "self_reflection", "prompt": "calm", "rich_caption": "a hum",
         "audio_v1": "clips/c00.wav", "caption_v1": "a chirp", "critique": "lower",
         "audio_v2": "clips/c01.wav"},
        {"behaviour": "enrichment", "prompt": "calm", "rich_caption": "a hum",
         "audio": "clips/c00.wav", "turns": []},
        {"behaviour": "dialogue", "turns": [{"role": "user", "text": "calm"}],
         "rich_caption": "a hum", "audio": "clips/c00.wav"},
        {"behavour": "enrichment", "prompt": "calm", "rich_caption": "a hum",
         "audio": "clips/c00.wav"}])
    report = build("reason", reason, str(tmp_path / "r"), codec=own["codec"],
                   tokenizer=own["tokenizer"])
    got = {e["line"]: e for e in report["skipped_lines"]}
    assert report["written"] == 3 and sorted(got) == [4, 5, 6]
    assert all(e["code"] == "unknown_key" for e in got.values())
    assert "'turns'" in got[4]["reason"]
    assert "in turns[0]" in got[5]["reason"] and "'text'" in got[5]["reason"]
    assert "did you mean 'behaviour'?" in got[6]["reason"]


def test_the_demo_worlds_manifests_pass_the_key_checks(own, tmp_path):
    """Every manifest the project writes (the demo world's; make-pairs' keys are above) passes
    each builder's key and structure checks (the full builds: tests/unit/test_world.py)."""
    from data_pipelines.build import make_converter
    from data_pipelines.demo.world import make_world

    paths = make_world(str(tmp_path / "w"), 6, seed=1, n_text=4)
    kinds = {"captions": "captions", "rich_captions": "captions", "audio_qa": "audio-qa",
             "text_sft": "text-sft", "reason": "reason"}
    for name, kind in kinds.items():
        conv = make_converter(kind, paths[name], codec=own["codec"], tokenizer=own["tokenizer"])
        rows = [json.loads(x) for x in open(paths[name])]
        assert rows, name
        for row in rows:
            conv.check_keys(row)
            conv.check(row)
    with pytest.raises(common.Skip, match="unknown key 'x'"):
        conv.check_keys({**rows[0], "x": 1})


# A build that wrote nothing -----------------------------------------------------------------------
def test_a_build_that_wrote_nothing_fails_in_the_cli(own, tmp_path, capsys):
    manifest = write_lines(own["root"] / "all_bad.jsonl", [
        {"audio": "clips/c00.wav", "caption": "x", "splt": "train"},
        {"audio": "clips/absent.wav", "caption": "y"},
        {"audio": "clips/absent.wav", "caption": "z"},
        "{"])
    out = tmp_path / "nothing"
    assert main(["data", "build", "captions", "--manifest", manifest, "--out", str(out),
                 "--tokenizer", own["tokenizer"], "--task", "caption", "--n-mels", "16"]) == 2
    captured = capsys.readouterr()
    err = one_line(captured.err)
    assert err.startswith(f"ualm data build: no line of {manifest} was written (4 skipped: ")
    assert "audio_missing x 2" in err and "unknown_key x 1" in err and "bad_json x 1" in err
    assert str(out / "build_report.json") in err
    report = json.loads((out / "build_report.json").read_text())
    assert report["written"] == 0 and report["skipped"] == 4


def test_a_build_with_only_validation_warns(own, tmp_path, capsys):
    manifest = write_lines(own["root"] / "only_val.jsonl", [
        {"audio": "clips/c00.wav", "caption": "x", "split": "validation"}])
    out = tmp_path / "val"
    assert main(["data", "build", "captions", "--manifest", manifest, "--out", str(out),
                 "--tokenizer", own["tokenizer"], "--task", "caption", "--n-mels", "16"]) == 0
    err = one_line(capsys.readouterr().err)
    assert "warning" in err and "train split is empty" in err and "only_val.jsonl" in err
