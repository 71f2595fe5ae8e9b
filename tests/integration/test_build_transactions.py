"""Builds are transactional and every manifest line is isolated: poison lines (100k-deep JSON, a
5000-digit integer, an over-long line, non-UTF-8 bytes, CR-only line ends) become skipped lines
in every builder kind; an interrupted or killed rebuild leaves the previous build byte for byte;
an empty manifest is refused; a damaged shard fails with one line naming the file."""
import glob
import io
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

sf = pytest.importorskip("soundfile")
pytest.importorskip("tensorflow_datasets")

from data_pipelines.build import INCOMPLETE_FILE, BuildError, build  # noqa: E402
from data_pipelines.sources import CorruptRecordError, open_source  # noqa: E402
from data_pipelines.builders import manifest as common  # noqa: E402
from data_pipelines.builders.converter import check_finite  # noqa: E402

SR = 16000
LIMIT = 300_000  # max_line_bytes of the poison builds: the 100k-deep line (200 kB) stays under it


def tone(freq, seconds=0.5):
    t = np.arange(int(seconds * SR)) / SR
    return (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from data_pipelines.codecs import SpectralCodec
    from ualm_jax.format.template import AUDIO_TO_CAPTION_PROMPT, TEXT_TO_AUDIO_PROMPT
    from data_pipelines.tokenizer import train_tiny_bpe

    root = tmp_path_factory.mktemp("transactions")
    sf.write(root / "a.wav", tone(330), SR)
    sf.write(root / "b.wav", tone(660), SR)
    texts = ["a high tone", "a low hum", "what do you hear", "keywords: tone", "make it calm",
             TEXT_TO_AUDIO_PROMPT, AUDIO_TO_CAPTION_PROMPT]
    tok = train_tiny_bpe(texts * 8, 300, str(root / "tok"))
    codec = SpectralCodec.fit([tone(f) for f in (220, 330, 440, 660)], SR, K=3, C=8)
    return {"root": root, "tokenizer": tok, "codec": f"spectral:{codec.save(str(root / 'codec'))}"}


GOOD = {
    "captions": [{"audio": "a.wav", "caption": "a high tone"},
                 {"audio": "b.wav", "caption": "a low hum"}],
    "audio-qa": [{"messages": [{"role": "user", "content": "what do you hear", "audio": "a.wav"},
                               {"role": "assistant", "content": "a high tone"}]},
                 {"messages": [{"role": "user", "content": "", "audio": ["b.wav"]},
                               {"role": "assistant", "content": "a low hum"}]}],
    "text-sft": [{"messages": [{"role": "user", "content": "what do you hear"},
                               {"role": "assistant", "content": "a high tone"}]},
                 {"messages": [{"role": "user", "content": "make it [calm] {now}"},
                               {"role": "assistant", "content": "a low hum"}]}],
    "preference": [{"prompt": "a high tone", "chosen": "a.wav", "rejected": "b.wav"},
                   {"prompt": "a low hum", "chosen": "b.wav", "rejected": "a.wav",
                    "ref_logp_chosen": -1.5, "ref_logp_rejected": -2.5}],
    "reason": [{"behaviour": "enrichment", "prompt": "make it calm",
                "rich_caption": "keywords: tone", "audio": "a.wav"},
               {"behaviour": "enrichment", "prompt": "a low hum",
                "rich_caption": "keywords: tone", "audio": "b.wav"}],
}
KINDS = list(GOOD)


def kind_args(world, kind):
    return dict(tokenizer=world["tokenizer"], n_mels=80,
                codec=world["codec"] if kind in ("captions", "preference", "reason") else None)


def poison_lines(kind):
    """(raw bytes, expected code) for each poison line, built around a good line of `kind`."""
    good = GOOD[kind][0]
    first_key = next(iter(good))
    deep = json.dumps({**good, "x": None}).replace("null", "[" * 100_000 + "]" * 100_000)
    big_int = json.dumps({**good, "x": None}).replace("null", "9" * 5000)
    long_line = json.dumps({**good, "pad": "y" * (LIMIT + 10)})
    not_utf8 = json.dumps(good).encode().replace(b'"' + first_key.encode(), b'"\xff\xfe' +
                                                  first_key.encode(), 1)
    return [(deep.encode(), "too_deep"), (big_int.encode(), "number_too_long"),
            (long_line.encode(), "line_too_long"), (not_utf8, "bad_json")]


def check_counts(report, lines):
    assert report["written"] + report["skipped"] == report["lines"] == lines
    assert "unaccounted_lines" not in report


@pytest.mark.parametrize("kind", KINDS)
def test_poison_lines_are_skipped_in_every_kind(world, kind):
    root = world["root"]
    good = [json.dumps(x).encode() for x in GOOD[kind]]
    poison = poison_lines(kind)
    raws = [good[0]] + [raw for raw, _ in poison] + [good[1]]
    manifest = root / f"poison_{kind}.jsonl"
    manifest.write_bytes(b"\n".join(raws) + b"\n")
    out = root / f"out_poison_{kind}"
    report = build(kind, str(manifest), str(out), max_line_bytes=LIMIT, **kind_args(world, kind))
    check_counts(report, len(raws))
    assert report["written"] == 2, report["skipped_lines"]
    got = {e["line"]: e for e in report["skipped_lines"]}
    assert sorted(got) == list(range(2, 2 + len(poison)))
    for line, (_, code) in enumerate(poison, start=2):
        assert got[line]["code"] == code, got[line]
        assert len(got[line]["reason"]) <= common.MAX_REASON_CHARS + 3
    assert "max_json_depth" in got[2]["reason"]
    assert "5000 digits" in got[3]["reason"]
    assert f"{LIMIT}" in got[4]["reason"] and "max_line_bytes" in got[4]["reason"]
    assert "UTF-8" in got[5]["reason"]
    assert report["limits"] == {"max_line_bytes": LIMIT, "max_json_depth": common.MAX_JSON_DEPTH}
    assert json.loads((out / "build_report.json").read_text()) == report
    assert len(open_source(str(out))) >= 2

    # CR-only line ends (old Mac / some exporters): each line is its own line, not one bad line.
    cr = root / f"cr_{kind}.jsonl"
    cr.write_bytes(b"\r".join(good + [b"", good[0]]))
    report = build(kind, str(cr), str(root / f"out_cr_{kind}"), **kind_args(world, kind))
    check_counts(report, 4)
    assert report["written"] == 3
    assert [(e["line"], e["code"]) for e in report["skipped_lines"]] == [(3, "blank_line")]


def test_any_exception_while_converting_a_line_is_a_skip(world, monkeypatch):
    """Not only Skip: a RecursionError, a MemoryError or a bug in one line's conversion."""
    from data_pipelines.builders.text_sft import TextSFTConverter

    real = TextSFTConverter.records
    errors = {"boom-recursion": RecursionError("maximum recursion depth exceeded"),
              "boom-memory": MemoryError(), "boom-bug": ZeroDivisionError("division by zero")}

    def records(self, data):
        text = data["messages"][0]["content"]
        if text in errors:
            raise errors[text]
        return real(self, data)

    monkeypatch.setattr(TextSFTConverter, "records", records)
    lines = [GOOD["text-sft"][0]] + [
        {"messages": [{"role": "user", "content": k}, {"role": "assistant", "content": "no"}]}
        for k in errors] + [GOOD["text-sft"][1]]
    manifest = world["root"] / "boom.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    report = build("text-sft", str(manifest), str(world["root"] / "out_boom"),
                   tokenizer=world["tokenizer"])
    check_counts(report, 5)
    assert report["written"] == 2
    assert [(e["line"], e["code"]) for e in report["skipped_lines"]] == [(2, "error"), (3, "error"),
                                                                          (4, "error")]
    assert "RecursionError" in report["skipped_lines"][0]["reason"]
    assert "MemoryError" in report["skipped_lines"][1]["reason"]


def test_parse_line_limits():
    limits = common.Limits(max_line_bytes=1000, max_json_depth=3)
    assert common.parse_line(b'{"a": [[1]]}', 0.0, limits)[1] == {"a": [[1]]}  # depth 3: fine
    with pytest.raises(common.Skip) as e:
        common.parse_line(b'{"a": [[[1]]]}', 0.0, limits)
    assert e.value.code == "too_deep"
    # brackets inside strings (escaped quotes included) are text, not nesting
    text = json.dumps({"a": "[[[[{{{{", "b": 'say \\"[[[[\\"', "c": ["]]]]"]})
    assert common.parse_line(text.encode(), 0.0, limits)[1]["a"] == "[[[[{{{{"
    with pytest.raises(common.Skip) as e:
        common.parse_line(b"x" * 1001, 0.0, limits)
    assert e.value.code == "line_too_long"
    with pytest.raises(common.Skip) as e:  # a huge split value is quoted, cut short
        common.parse_line(json.dumps({"split": "v" * 10_000}).encode(), 0.0)
    assert e.value.code == "bad_value" and len(e.value.reason) < 200
    with pytest.raises(common.Skip) as e:  # an int beyond any float in a float field
        check_finite(10 ** 400, "ref_logp_chosen")
    assert e.value.code == "bad_value"
    with pytest.raises(ValueError, match="positive"):
        common.Limits(max_line_bytes=0)


def test_lines_universal_newlines_across_block_boundaries(monkeypatch, tmp_path):
    """iter_lines splits as bytes.splitlines does (\\n, \\r\\n, lone \\r), whatever the block size;
    the chunks of a scan cover every line once, an over-long line is counted, never kept."""
    rng = random.Random(0)
    for block in (1, 2, 3, 7, 64):
        monkeypatch.setattr(common, "_BLOCK", block)
        for _ in range(30):
            data = bytes(rng.choice(b"ab\r\n") for _ in range(rng.randrange(0, 40)))
            got = list(common.iter_lines(io.BytesIO(data), 10 ** 6))
            assert [raw for _, raw in got] == data.splitlines(), data
            ends = [end for end, _ in got]
            assert ends == sorted(ends) and (not ends or ends[-1] == len(data))
            for (end, raw), start in zip(got, [0] + ends):
                assert data[start:end].rstrip(b"\r\n") == raw
        got = list(common.iter_lines(io.BytesIO(b"abcdefgh\r\nxy\rz"), 4))
        assert isinstance(got[0][1], common.LongLine) and got[0][1].size == 8
        assert [raw for _, raw in got[1:]] == [b"xy", b"z"]

    lines = [json.dumps({"i": i}).encode() for i in range(10)]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(lines[0] + b"\r" + b"\r\n".join(lines[1:5]) + b"\n" + b"\r".join(lines[5:]))
    scan = common.scan_manifest(str(path), 0.0, chunk_lines=3)
    assert scan.lines == 10 and scan.candidates == {"train": 10}
    got = [(n, raw) for c in scan.chunks for n, raw in common.read_chunk(str(path), c)]
    assert got == list(zip(range(1, 11), lines))


def snapshot(folder):
    """Every file under folder (relative path -> bytes), links and folders included by name."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, folder)
            out[rel] = open(p, "rb").read() if os.path.isfile(p) else "<dir>"
    return out


def siblings(out):
    parent, base = os.path.split(str(out))
    return sorted(n for n in os.listdir(parent) if n.startswith(base + "."))


def sft_manifest(path, n, offset=0):
    lines = [{"messages": [{"role": "user", "content": f"what do you hear {i + offset}"},
                           {"role": "assistant", "content": "a high tone"}]} for i in range(n)]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return str(path)


def test_interrupted_rebuild_leaves_the_old_build(world, monkeypatch):
    from data_pipelines.builders import report as C
    from data_pipelines.builders.text_sft import TextSFTConverter

    root = world["root"]
    out = root / "out_txn"
    report = build("text-sft", sft_manifest(root / "txn_v1.jsonl", 3), str(out),
                   tokenizer=world["tokenizer"])
    assert report["written"] == 3
    (out / "notes.txt").write_text("kept beside the build")
    before = snapshot(out)
    new_manifest = sft_manifest(root / "txn_v2.jsonl", 6, offset=100)

    # 1. interrupted while converting (Ctrl-C on the 4th line)
    calls = {"n": 0}
    real = TextSFTConverter.records

    def records(self, data):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self, data)

    monkeypatch.setattr(TextSFTConverter, "records", records)
    with pytest.raises(KeyboardInterrupt):
        build("text-sft", new_manifest, str(out), tokenizer=world["tokenizer"])
    assert snapshot(out) == before and siblings(out) == []
    monkeypatch.setattr(TextSFTConverter, "records", real)

    # 2. failing after the dataset is written, while the report is made
    def summarize(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(C, "summarize", summarize)
    with pytest.raises(OSError, match="disk full"):
        build("text-sft", new_manifest, str(out), tokenizer=world["tokenizer"])
    assert snapshot(out) == before and siblings(out) == []
    monkeypatch.undo()

    # 3. failing in the middle of the swap (the first new entry cannot be renamed in): rolled back
    import data_pipelines.build as B

    real_commit, real_rename = B._commit, os.rename

    def commit(tmp, out_dir, entries):
        calls = {"n": 0}

        def rename(a, b):
            calls["n"] += 1
            if calls["n"] == 4:  # after the old report, dataset and stats moved away
                raise OSError("device busy")
            real_rename(a, b)

        with monkeypatch.context() as m:
            m.setattr(os, "rename", rename)
            real_commit(tmp, out_dir, entries)

    monkeypatch.setattr(B, "_commit", commit)
    with pytest.raises(OSError, match="device busy"):
        build("text-sft", new_manifest, str(out), tokenizer=world["tokenizer"])
    assert snapshot(out) == before and siblings(out) == []
    monkeypatch.undo()

    # 3b. an empty manifest: refused before anything is touched
    empty = root / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(BuildError, match="empty.*empty.jsonl"):
        build("text-sft", str(empty), str(out), tokenizer=world["tokenizer"])
    assert snapshot(out) == before and siblings(out) == []

    # 4. a rebuild that completes replaces the build, keeps what was no build's output
    report = build("text-sft", new_manifest, str(out), tokenizer=world["tokenizer"])
    assert report["written"] == 6 and len(open_source(str(out))) == 6
    assert (out / "notes.txt").read_text() == "kept beside the build"
    assert not (out / INCOMPLETE_FILE).exists() and siblings(out) == []
    assert sorted(os.listdir(out)) == ["build_report.json", "notes.txt", "stats.json",
                                       "tokenizer.json", "ualm_text_sft"]

    # 5. OUT given as a link: the build lands where it points, the link stays a link
    link = root / "out_txn_link"
    link.symlink_to(out, target_is_directory=True)
    report = build("text-sft", str(root / "txn_v1.jsonl"), str(link), tokenizer=world["tokenizer"])
    assert link.is_symlink() and len(open_source(str(link))) == 3 == len(open_source(str(out)))
    assert siblings(out) == [] and siblings(link) == []


KILLED_BUILD = textwrap.dedent("""
    import sys, time
    from data_pipelines.build import build
    from data_pipelines.builders.text_sft import TextSFTConverter
    real = TextSFTConverter.records
    n = [0]
    def slow(self, data):
        n[0] += 1
        if n[0] == 20:
            print("converting", flush=True)
        time.sleep(0.05)
        return real(self, data)
    TextSFTConverter.records = slow
    build("text-sft", sys.argv[1], sys.argv[2], tokenizer=sys.argv[3])
    print("finished", flush=True)
""")


def test_killed_rebuild_leaves_the_old_build(world):
    """SIGKILL in the middle of writing: OUT is untouched; the next build clears the leftover."""
    root = world["root"]
    out = root / "out_killed"
    build("text-sft", sft_manifest(root / "killed_v1.jsonl", 2), str(out),
          tokenizer=world["tokenizer"])
    before = snapshot(out)
    big = sft_manifest(root / "killed_v2.jsonl", 400, offset=1000)  # ~20 s of slow lines
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, big, str(out),
                             world["tokenizer"]], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        said = []  # until the 20th line is being converted (or the build ended)
        for said_line in proc.stdout:
            said.append(said_line.strip())
            if said[-1] == "converting":
                break
        assert said and said[-1] == "converting", said
        assert glob.glob(str(out) + ".tmp-*/" + INCOMPLETE_FILE)
        time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert snapshot(out) == before
    left = siblings(out)
    assert len(left) == 1 and left[0].startswith("out_killed.tmp-")
    assert os.path.exists(os.path.join(str(root), left[0], INCOMPLETE_FILE))
    assert not os.path.exists(os.path.join(str(root), left[0], "build_report.json"))
    # the next build into OUT removes the dead build's folder
    report = build("text-sft", sft_manifest(root / "killed_v3.jsonl", 3), str(out),
                   tokenizer=world["tokenizer"])
    assert report["written"] == 3 and siblings(out) == []


def test_empty_manifest_fails_in_the_cli(world, capsys):
    from ualm_jax.cli import main

    empty = world["root"] / "cli_empty.jsonl"
    empty.write_bytes(b"")
    out = world["root"] / "out_cli_empty"
    assert main(["data", "build", "text-sft", "--manifest", str(empty), "--out", str(out),
                 "--tokenizer", world["tokenizer"]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "empty" in err and "cli_empty.jsonl" in err
    assert not out.exists() and siblings(out) == []


def test_cli_line_limits(world, capsys):
    from ualm_jax.cli import main

    manifest = world["root"] / "cli_limits.jsonl"
    manifest.write_text(json.dumps(GOOD["text-sft"][0]) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "x" * 500},
                      {"role": "assistant", "content": "y"}]})
        + "\n" + json.dumps({"messages": [[[[1]]]]}) + "\n")
    out = world["root"] / "out_cli_limits"
    assert main(["data", "build", "text-sft", "--manifest", str(manifest), "--out", str(out),
                 "--tokenizer", world["tokenizer"], "--max-line-bytes", "400",
                 "--max-json-depth", "3"]) == 0
    report = json.loads((out / "build_report.json").read_text())
    assert [(e["line"], e["code"]) for e in report["skipped_lines"]] == [(2, "line_too_long"),
                                                                          (3, "too_deep")]
    assert "line_too_long 1" in capsys.readouterr().out


def test_damaged_shard_names_the_file(world):
    root = world["root"]
    out = root / "out_damaged"
    build("text-sft", sft_manifest(root / "damaged.jsonl", 50), str(out),
          tokenizer=world["tokenizer"])
    assert len(open_source(str(out))) == 50
    shard, = glob.glob(str(out / "ualm_text_sft" / "*" / "*.array_record-*"))
    os.truncate(shard, os.path.getsize(shard) // 2)
    src = open_source(str(out))
    with pytest.raises(CorruptRecordError) as e:
        src[0]
    msg = str(e.value)
    assert shard in msg and "truncated" in msg and "\n" not in msg
    with pytest.raises(CorruptRecordError, match="array_record"):
        src.__getitems__([0, 1])
    with pytest.raises(ValueError):  # an index out of range stays the caller's error
        src[50]


def test_beam_build_isolates_lines_too(world):
    """The same per-line isolation on Beam workers (DirectRunner), where apache-beam is there."""
    pytest.importorskip("apache_beam")
    root = world["root"]
    raws = [json.dumps(GOOD["text-sft"][0]).encode()] + [r for r, _ in poison_lines("text-sft")]
    manifest = root / "beam_poison.jsonl"
    manifest.write_bytes(b"\r\n".join(raws))
    report = build("text-sft", str(manifest), str(root / "out_beam"), tokenizer=world["tokenizer"],
                   max_line_bytes=LIMIT, beam_options=["--runner=DirectRunner"])
    check_counts(report, len(raws))
    assert [e["code"] for e in report["skipped_lines"]] == [c for _, c in poison_lines("text-sft")]
