"""Grain pipeline: batch contract, packing, token-share mixing, determinism, exact resume, host
sharding, CFG dropout, skipped examples and encoder-clip slots. In-memory records, CPU, fast."""
import json

import numpy as np
import pytest

from data_pipelines import mixture as mix
from data_pipelines.bench_data import bench_data, record_id, synthetic_records
from data_pipelines.grain_pipeline import (WeightedInterleave, make_iterator, packing_efficiency,
                                           realised_shares)
from data_pipelines.render import Renderer
from ualm_jax.format.layout import AudioLayout
from ualm_jax.format.records import from_record
from ualm_jax.format.template import render
from ualm_jax.format import vocab as V
from ualm_jax.format.vocab import JointVocab

K = 4
VB = JointVocab(text_vocab_size=512, num_codebooks=K, codebook_size=16)
N_MELS, MEL_FRAMES, FPW, CLIPS = 8, 40, 10, 3  # windows of 40 mel frames -> 10 encoder frames
L, B = 256, 4

# Three tasks with very different example lengths (means ~25, ~75, ~200 positions).
SHAPES = {"text": {"prompt": (4, 12), "answer": (4, 12)},
          "caption": {"prompt": (4, 8), "mel": (30, 130), "answer": (4, 10)},
          "t2a": {"prompt": (4, 10), "codes": (150, 220)}}


def records(kind, n, seed=0, **shape):
    return synthetic_records(kind, n, VB, N_MELS, seed=seed, shapes={**SHAPES[kind], **shape})


SOURCES = {kind: records(kind, 300, seed=i) for i, kind in enumerate(SHAPES)}


def cfg(mixture=None, **kw):
    base = {"mixture": mixture or [{"name": "text", "share": 0.5}, {"name": "caption", "share": 0.2},
                                   {"name": "t2a", "share": 0.3}],
            "cfg_dropout": 0.0, "max_clips_per_row": CLIPS}
    return {**base, **kw}


def iterator(sources=SOURCES, seed=0, batch=B, seq=L, **kw):
    pi = {k: kw.pop(k) for k in ("process_index", "process_count") if k in kw}
    return make_iterator(sources, cfg(**kw), VB, batch, seq, seed, N_MELS, MEL_FRAMES, FPW, **pi)


def take(it, n):
    return [next(it) for _ in range(n)]


def examples(batch):
    """(row, start, stop, task) of every packed example."""
    out = []
    for r, seg in enumerate(batch["segment_ids"]):
        for s in range(1, int(seg.max()) + 1):
            where = np.flatnonzero(seg == s)
            out.append((r, int(where[0]), int(where[-1]) + 1, int(batch["task_ids"][r, where[0]])))
    return out


def rid(batch, r, start):
    return record_id(batch["tokens"][r, start + 3:start + 5, 0] - VB.text_offset, VB.text_vocab_size)


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# Contract -----------------------------------------------------------------------------------------
def test_batch_contract_shapes_and_dtypes():
    b = next(iterator())
    want = {"tokens": ((B, L, K), np.int32), "loss_weights": ((B, L, K), np.float32),
            "segment_ids": ((B, L), np.int32), "positions": ((B, L), np.int32),
            "task_ids": ((B, L), np.int32), "audio_slots": ((B, L), np.int32),
            "audio_features": ((B, CLIPS, MEL_FRAMES, N_MELS), np.float32),
            "audio_mel_mask": ((B, CLIPS, MEL_FRAMES), np.bool_)}
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == want
    # Text-only layout: no audio keys at all.
    text_only = make_iterator({"text": SOURCES["text"]}, cfg([{"name": "text", "share": 1}]),
                              VB, B, L, 0)
    assert set(next(text_only)) == {"tokens", "loss_weights", "segment_ids", "positions", "task_ids"}


def test_segments_positions_and_content_match_the_template():
    it = iterator()
    names = it.task_names
    # The iterator renders with the config's header supervision (data.supervise_headers default).
    renderers = {n: Renderer(VB, AudioLayout(N_MELS, MEL_FRAMES, FPW, CLIPS), i,
                             supervise_headers="assistant") for i, n in enumerate(names)}
    for batch in take(it, 5):
        seg, pos = batch["segment_ids"], batch["positions"]
        for r in range(B):
            used = int((seg[r] > 0).sum())
            assert (seg[r, :used] > 0).all() and (seg[r, used:] == 0).all()  # pad only at the end
            assert (np.diff(seg[r, :used]) >= 0).all()
        pad = seg == 0
        assert (batch["task_ids"][pad] == -1).all() and (pos[pad] == 0).all()
        assert not batch["tokens"][pad].any() and not batch["loss_weights"][pad].any()
        assert (batch["audio_slots"][pad] == -1).all()
        for r, start, stop, task in examples(batch):
            np.testing.assert_array_equal(pos[r, start:stop], np.arange(stop - start))
            ex = renderers[names[task]](0, SOURCES[names[task]][rid(batch, r, start)])
            np.testing.assert_array_equal(batch["tokens"][r, start:stop], ex.tokens)
            np.testing.assert_array_equal(batch["loss_weights"][r, start:stop], ex.loss_weights)


def test_length_without_rendering_matches_render():
    layout = AudioLayout(N_MELS, MEL_FRAMES, FPW, CLIPS)
    rd = Renderer(VB, layout)
    for kind, recs in SOURCES.items():
        for rec in recs[:20]:
            _, segs, _ = from_record(rec, layout.frames_of)
            assert rd.length(rec) == len(render(segs, VB)) == len(rd(0, rec)), kind
            assert rd.clip_count(rec) == len(rd(0, rec).clips)


# Mixing by tokens ---------------------------------------------------------------------------------
def test_realised_token_shares_hit_targets_not_example_shares():
    it = iterator()
    out = realised_shares(it, 150)
    target = mix.target_shares(mix.parse_mixture(cfg()["mixture"]))
    for name, share in target.items():
        assert abs(out["shares"][name] - share) < 0.02, (name, out["shares"], target)
    # Example counts are far from the token targets: t2a examples are ~8x longer than text ones.
    w = it.weights
    assert w["text"] > 4 * w["t2a"]
    assert out["packing_efficiency"] > 0.85  # 3 clip slots per row bind before tokens do


def test_upsample_scales_a_task_share():
    base = [{"name": "text", "share": 0.5}, {"name": "t2a", "share": 0.5}]
    up = [{"name": "text", "share": 0.5}, {"name": "t2a", "share": 0.5, "upsample": 3.0}]
    a = realised_shares(iterator(mixture=base), 60)["shares"]
    b = realised_shares(iterator(mixture=up), 60)["shares"]
    assert abs(a["t2a"] - 0.5) < 0.03 and abs(b["t2a"] - 0.75) < 0.03
    ratio = (b["t2a"] / b["text"]) / (a["t2a"] / a["text"])
    assert 2.6 < ratio < 3.4


def test_weighted_interleave_is_exact_and_consecutive():
    sel = WeightedInterleave([0.5, 0.3, 0.2])
    picks = [sel[i] for i in range(10000)]
    for d, w in enumerate([0.5, 0.3, 0.2]):
        keys = [k for ds, k in picks if ds == d]
        assert keys == list(range(len(keys)))  # each dataset read in order, nothing skipped
        assert abs(len(keys) - w * 10000) <= 1


def test_mixture_weights_report_and_errors():
    entries = mix.parse_mixture([{"name": "a", "share": 1, "path": "x"},
                                 {"name": "b", "share": 1, "upsample": 2}])
    w = mix.sampling_weights(entries, {"a": 10.0, "b": 100.0})
    assert w["a"] / w["b"] == pytest.approx(5.0)  # (1/10) / (2/100)
    rows = mix.mixture_report(entries, {"a": 100, "b": 50}, {"a": 10.0, "b": 100.0},
                              total_tokens=mix.run_tokens(10, 4, 30))
    assert rows[0]["tokens_available"] == 1000 and rows[1]["target_share"] == pytest.approx(2 / 3)
    assert rows[0]["epochs"] == pytest.approx(1200 / 3 / 1000)
    assert "epochs" in mix.format_report(rows)
    bad = [([{"name": "a", "share": -1}], r"data.mixture\[0\].share=-1: expected a number >= 0"),
           ([{"name": "a"}, {"name": "a"}], r"data.mixture\[1\].name='a': already used"),
           ([{"name": "a", "upsample": 0}], r"data.mixture\[0\].upsample=0: expected a number > 0"),
           ([{"name": "a", "weight": 1}], r"data.mixture\[0\] has unknown key\(s\) weight"),
           ([{"share": 1}], r"data.mixture\[0\].name=None"),
           ([{"name": "a", "path": 3}], r"data.mixture\[0\].path=3"),
           ([{"name": "a", "share": 0}], "every share is 0"), ([], "is empty")]
    for entries, msg in bad:
        with pytest.raises(ValueError, match=msg):
            mix.parse_mixture(entries)
    with pytest.raises(ValueError, match="no source for mixture task"):
        make_iterator({"text": SOURCES["text"]}, cfg(), VB, B, L, 0)


# Determinism and resume ---------------------------------------------------------------------------
def test_same_seed_same_batches_other_seed_differs():
    assert_batches_equal(take(iterator(seed=3), 4), take(iterator(seed=3), 4))
    a, b = next(iterator(seed=3)), next(iterator(seed=4))
    assert not np.array_equal(a["tokens"], b["tokens"])


def test_resume_from_state_is_exact():
    it = iterator(cfg_dropout=0.3)
    take(it, 7)
    state = it.get_state()
    assert any(p["pending"] for p in state["packers"].values()), \
        "the test should resume with look-ahead examples waiting"
    want = take(it, 5)
    for s in (state, json.loads(json.dumps(state))):
        fresh = iterator(cfg_dropout=0.3)
        fresh.set_state(s)
        assert_batches_equal(take(fresh, 5), want)
    assert fresh.stats()["batches"] == 12
    with pytest.raises(ValueError, match="seq_len=256 but this pipeline has seq_len=300"):
        iterator(seq=300).set_state(state)
    with pytest.raises(ValueError, match="rows=4 but this pipeline has rows=8"):
        iterator(batch=8).set_state(state)


# Hosts and elastic resume -------------------------------------------------------------------------
def stacked(its, n):
    """n global batches: each process's rows, stacked in process order."""
    out = []
    for _ in range(n):
        parts = [next(it) for it in its]
        out.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    return out


def processes(count, **kw):
    return [iterator(process_index=p, process_count=count, **kw) for p in range(count)]


def test_processes_pack_disjoint_rows_of_the_one_global_batch():
    """Each process packs only its own rows; together they are the global batch, whatever the
    process count (one global stream, one packer per global row)."""
    one = take(iterator(cfg_dropout=0.3), 6)
    for count in (2, 4):
        its = processes(count, cfg_dropout=0.3)
        assert_batches_equal(stacked(its, 6), one)
    seen = []
    for it in processes(2):
        ids = set()
        for batch in take(it, 20):
            for r, start, _, task in examples(batch):
                ids.add((it.task_names[task], rid(batch, r, start), r))
        seen.append({(t, i) for t, i, _ in ids})
    assert seen[0] and seen[1] and seen[0] != seen[1]


def test_resume_on_another_process_count_continues_the_same_global_batches():
    """2 processes for 3 batches, then 1 process for 3, then 4 processes for 3: the same 9 global
    batches as one process straight (states merged as the trainer merges them)."""
    from ualm_jax.train.data import merge_row_states

    straight = take(iterator(cfg_dropout=0.3), 9)
    two = processes(2, cfg_dropout=0.3)
    got = stacked(two, 3)
    state = json.loads(json.dumps(merge_row_states([it.get_state() for it in two])))
    one = iterator(cfg_dropout=0.3)
    one.set_state(state)
    got += take(one, 3)
    four = processes(4, cfg_dropout=0.3)
    for it in four:
        it.set_state(one.get_state())
    got += stacked(four, 3)
    assert_batches_equal(got, straight)
    # What each task has consumed is in the state, per row.
    rows = merge_row_states([it.get_state() for it in four])["packers"]
    placed = sum(len(examples(b)) for b in straight)
    assert sum(p["examples"] for p in rows.values()) == placed == sum(
        sum(p["tasks"]) for p in rows.values())
    with pytest.raises(ValueError, match="holds no packer for row"):
        iterator(process_index=1, process_count=2).set_state(two[0].get_state())


# CFG dropout --------------------------------------------------------------------------------------
def test_cfg_dropout_fraction_on_text_to_audio():
    it = iterator(mixture=[{"name": "t2a", "share": 1}], cfg_dropout=0.2)
    dropped = total = 0
    for batch in take(it, 120):
        for r, start, stop, _ in examples(batch):
            total += 1
            dropped += int(batch["tokens"][r, start, 0] == V.PAD)  # <bos> padded out
    assert total > 400 and abs(dropped / total - 0.2) < 0.05
    # Off for held-out splits.
    ev = make_iterator(SOURCES, cfg(mixture=[{"name": "t2a", "share": 1}], cfg_dropout=0.5), VB, B, L,
                       0, N_MELS, MEL_FRAMES, FPW, split="validation")
    assert all(b["tokens"][r, s, 0] == V.BOS for b in take(ev, 10) for r, s, _, _ in examples(b))


# Skipping -----------------------------------------------------------------------------------------
def test_over_long_examples_are_skipped_and_counted():
    long = records("t2a", 40, seed=9, codes=(300, 400))  # > L = 256 positions
    srcs = {"t2a": records("t2a", 40, seed=8)[:30] + long[:10], "text": SOURCES["text"]}
    it = iterator(srcs, mixture=[{"name": "t2a", "share": 1}, {"name": "text", "share": 1}])
    batches = take(it, 40)
    stats = it.stats()
    assert stats["skipped_too_long"] > 0 and stats["skipped_too_many_clips"] == 0
    placed = sum(len(examples(b)) for b in batches)
    assert placed == stats["examples"]
    # Too many clips for one row: 7 windows > 3 slots.
    wide = {"caption": records("caption", 10, mel=(250, 280))}
    with pytest.raises(ValueError, match="none of its sampled records fit"):
        iterator(wide, mixture=[{"name": "caption", "share": 1}], seq=2048)
    it = make_iterator(wide, cfg([{"name": "caption", "share": 1}]), VB, B, 2048, 0, N_MELS,
                       MEL_FRAMES, FPW, mean_tokens={"caption": 100.0})
    it.max_consecutive_skips = 30
    with pytest.raises(ValueError, match="30 examples in a row cannot fit a row"):
        next(it)
    assert it.stats()["skipped_too_many_clips"] == 30


# Audio slots --------------------------------------------------------------------------------------
def test_audio_slots_point_at_the_right_clip_frames():
    layout = AudioLayout(N_MELS, MEL_FRAMES, FPW, CLIPS)
    it = iterator(mixture=[{"name": "caption", "share": 1}, {"name": "text", "share": 1}])
    multi = 0
    for batch in take(it, 8):
        slots, feats, mask = batch["audio_slots"], batch["audio_features"], batch["audio_mel_mask"]
        for r in range(B):
            row_clips = 0
            for _, start, stop, task in [e for e in examples(batch) if e[0] == r]:
                ex_slots = slots[r, start:stop]
                if it.task_names[task] != "caption":
                    assert (ex_slots == -1).all()
                    continue
                rec = SOURCES["caption"][rid(batch, r, start)]
                mel = np.asarray(rec["mel"], np.float32)
                windows = [mel[s:s + MEL_FRAMES] for s in range(0, len(mel), MEL_FRAMES)]
                windows = [w for w in windows if layout.window_frames(len(w))]
                multi += len(windows) > 1
                got = ex_slots[ex_slots >= 0]
                # Placeholders are stream-0 pads, consecutive, after <user><audio>.
                where = np.flatnonzero(ex_slots >= 0)
                assert (np.diff(where) == 1).all()
                assert (batch["tokens"][r, start + where, 0] == V.PAD).all()
                assert (batch["tokens"][r, start + where[0] - 1, 0] == V.AUDIO)
                expect = np.concatenate([(row_clips + c) * FPW + np.arange(layout.window_frames(len(w)))
                                         for c, w in enumerate(windows)])
                np.testing.assert_array_equal(got, expect)
                for c, w in enumerate(windows):
                    np.testing.assert_array_equal(feats[r, row_clips + c, :len(w)], w)
                    assert mask[r, row_clips + c].sum() == len(w)
                row_clips += len(windows)
            assert row_clips <= CLIPS
            assert not feats[r, row_clips:].any() and not mask[r, row_clips:].any()
    assert multi > 0  # some clips span several encoder windows


# Bench --------------------------------------------------------------------------------------------
def test_bench_data_reports_tokens_per_second():
    out = bench_data(vocab=VB, batch_size=2, seq_len=512, n_mels=N_MELS, mel_frames=MEL_FRAMES,
                     frames_per_window=FPW, seconds=0.2, warmup_batches=1, records_per_task=50,
                     shapes=SHAPES)
    assert out["packed_tokens_per_s"] > 0 and 0 < out["packing_efficiency"] <= 1
    assert packing_efficiency({"segment_ids": np.array([[1, 1, 0, 0]])}) == 0.5


# Trainer entry point ------------------------------------------------------------------------------
def test_config_iterator_uses_model_vocab_audio_window_and_host_share():
    from data_pipelines.grain_pipeline import make_config_iterator
    from ualm_jax.config import load_config

    c = load_config(None, ["data.source=mixture", "train.batch_size=4", "train.seq_len=128",
                           "data.max_clips_per_row=2",
                           "data.mixture=[{name: text, path: p/text, share: 1},"
                           " {name: caption, path: p/cap, share: 1}]"])
    vb = JointVocab.from_model_config(c.model)
    enc = c.model.audio_encoder
    recs = {"p/text": synthetic_records("text", 50, vb, enc.n_mels, shapes=SHAPES["text"]),
            "p/cap": synthetic_records("caption", 50, vb, enc.n_mels, seed=1,
                                       shapes={**SHAPES["caption"], "mel": (20, 60)})}
    opened = []

    def open_source(path, split):
        opened.append((path, split))
        return recs[path]

    it = make_config_iterator(c, "validation", process_index=1, process_count=2,
                              open_source=open_source)
    b = next(it)
    assert opened == [("p/text", "validation"), ("p/cap", "validation")] and it.per_host
    assert b["tokens"].shape == (2, 128, max(c.model.num_codebooks, 1))
    assert b["audio_features"].shape == (2, 2, enc.max_mel_frames, enc.n_mels)
    assert it.fingerprint["seed"] == c.data.eval_seed and it.global_rows == [2, 3]
    with pytest.raises(ValueError, match=r"data.mixture\[0\].path is empty"):
        c.data.mixture = [{"name": "text", "share": 1}]
        make_config_iterator(c, process_index=0, process_count=1, open_source=open_source)


def test_mean_tokens_from_build_stats():
    stats = {"train": {"records": 4, "tokens": 400,
                       "tasks": {"t2a": {"records": 1, "tokens": 340, "mean_tokens": 340.0},
                                 "caption": {"records": 3, "tokens": 60, "mean_tokens": 20.0}}},
             "validation": {"records": 2, "tokens": 50, "tasks": {"text_sft": {
                 "records": 2, "tokens": 50, "mean_tokens": 25.0}}}}
    assert mix.stats_mean_tokens(stats, "validation", "text_sft") == 25.0
    assert mix.stats_mean_tokens(stats, "train", "t2a") == 100.0  # a source holding both tasks
    assert mix.stats_mean_tokens(stats, "test") is None
    it = make_iterator(SOURCES, cfg(), VB, B, L, 0, N_MELS, MEL_FRAMES, FPW,
                       mean_tokens={"text": 10.0, "caption": 10.0, "t2a": 10.0})
    assert it.weights == pytest.approx({"text": 0.5, "caption": 0.2, "t2a": 0.3})


def test_a_build_the_model_cannot_read_fails_at_start_naming_both_values(tmp_path):
    from data_pipelines.sources import REPORT_FILE
    from data_pipelines.grain_pipeline import make_config_iterator
    from ualm_jax.config import load_config

    def build(name, **settings):
        d = tmp_path / name
        d.mkdir()
        (d / REPORT_FILE).write_text(json.dumps({"dataset_dir": "x", "settings": {
            "kind": "captions", "task": "both", "n_mels": 16, "text_vocab_size": 100,
            "num_codebooks": 4, "codebook_size": 64, **settings}}))
        return str(d)

    cases = {"mels": ({"n_mels": 128}, "built with --n-mels 128 but model.audio_encoder.n_mels=16"),
             "codec": ({"num_codebooks": 8}, "codec with 8 codebooks of 64 but the model has "
                                             "model.num_codebooks=4"),
             "tok": ({"text_vocab_size": 10 ** 6}, "1000000-entry tokenizer but model.text_vocab")}
    for name, (settings, message) in cases.items():
        mixture = [{"name": "a", "path": build(name, **settings), "share": 1.0}]
        cfg = load_config(None, ["model.preset=tiny", "model.codebook_size=64",
                                 "model.audio_encoder.n_mels=16", "data.source=mixture",
                                 f"data.mixture={json.dumps(mixture)}"])
        with pytest.raises(ValueError, match=r"data.mixture\[0\] \(a\) .*" + message):
            make_config_iterator(cfg, process_index=0, process_count=1,
                                 open_source=lambda *a: pytest.fail("opened before the check"))
    # t2a-only captions carry no mel: their n_mels does not matter.
    mixture = [{"name": "a", "path": build("t2a", task="t2a", n_mels=128), "share": 1.0}]
    cfg = load_config(None, ["model.preset=tiny", "model.codebook_size=64",
                             "model.audio_encoder.n_mels=16", "data.source=mixture",
                             f"data.mixture={json.dumps(mixture)}"])
    with pytest.raises(RuntimeError, match="opened"):
        make_config_iterator(cfg, process_index=0, process_count=1,
                             open_source=lambda *a: (_ for _ in ()).throw(RuntimeError("opened")))
