"""SeqIO path: the same rendered examples as the Grain path, and packed rows in the same contract."""
import numpy as np
import pytest

seqio = pytest.importorskip("seqio")

from data_pipelines import seqio_tasks as st  # noqa: E402
from data_pipelines.bench_data import synthetic_records  # noqa: E402
from data_pipelines.grain_pipeline import (AudioLayout, KeyedUniform, Renderer,  # noqa: E402
                                           make_iterator, task_dataset)
from ualm_jax.format import vocab as V  # noqa: E402
from ualm_jax.format.vocab import JointVocab  # noqa: E402

K = 3
VB = JointVocab(text_vocab_size=300, num_codebooks=K, codebook_size=16)
LAYOUT = AudioLayout(n_mels=8, mel_frames=40, frames_per_window=10, max_clips=3)
L = 192
SHAPES = {"text": {"prompt": (4, 12), "answer": (4, 12)},
          "caption": {"prompt": (4, 8), "mel": (30, 120), "answer": (4, 10)},
          "t2a": {"prompt": (4, 10), "codes": (40, 90)}}
SOURCES = {k: synthetic_records(k, 40, VB, LAYOUT.n_mels, seed=i, shapes=SHAPES[k])
           for i, k in enumerate(SHAPES)}
MIXTURE = [{"name": "text", "share": 0.4}, {"name": "caption", "share": 0.3},
           {"name": "t2a", "share": 0.3, "upsample": 2.0}]


def cfg(cfg_dropout=0.0):
    return {"mixture": MIXTURE, "cfg_dropout": cfg_dropout, "max_clips_per_row": LAYOUT.max_clips}


def register(cfg_dropout=0.0, prefix="t"):
    return st.register_tasks(SOURCES, cfg(cfg_dropout), VB, L, seed=5, n_mels=LAYOUT.n_mels,
                             mel_frames=LAYOUT.mel_frames, frames_per_window=LAYOUT.frames_per_window,
                             prefix=prefix)


def test_seqio_renders_what_grain_renders():
    tasks, _ = register()
    for t, (name, recs) in zip(tasks, SOURCES.items()):
        ds = seqio.get_mixture_or_task(t).get_dataset(None, split="train", shuffle=False)
        got = list(ds.as_numpy_iterator())
        assert len(got) == len(recs)
        # The Grain path's per-task stream, unshuffled: element i renders record i.
        task = [e["name"] for e in MIXTURE].index(name)
        grain_ds = task_dataset(recs, Renderer(VB, LAYOUT, task, seed=5), 5, shuffle=False)
        for i, x in enumerate(got):
            e = grain_ds[i]
            np.testing.assert_array_equal(x["tokens"], e.tokens)
            np.testing.assert_array_equal(x["loss_weights"], e.loss_weights)
            assert x["task_id"] == e.task == task
            assert list(x["clip_positions"]) == [p for p, _, _ in e.clips]
            assert list(x["clip_frames"]) == [n for _, n, _ in e.clips]
            for c, (_, _, w) in enumerate(e.clips):
                np.testing.assert_array_equal(x["clip_mel"][c, :len(w)], w)


def test_cfg_dropout_uses_the_same_key_in_both_paths():
    tasks, _ = register(cfg_dropout=0.5, prefix="cfg")
    got = list(seqio.get_mixture_or_task(tasks[2]).get_dataset(None, shuffle=False).as_numpy_iterator())
    dropped = [bool(x["tokens"][0, 0] == V.PAD) for x in got]
    expect = [KeyedUniform(5, 2, i).random() < 0.5 for i in range(len(got))]
    assert dropped == expect and 0 < sum(dropped) < len(got)
    grain_ds = task_dataset(SOURCES["t2a"], Renderer(VB, LAYOUT, 2, 5, 0.5), 5, shuffle=False)
    assert [grain_ds[i].cfg_dropped for i in range(len(got))] == expect


def test_mixture_rates_are_the_token_share_weights():
    _, name = register(prefix="rates")
    m = seqio.get_mixture_or_task(name)
    rates = {t.name[len("rates_"):]: m.get_rate(t) for t in m.tasks}
    it = make_iterator(SOURCES, cfg(), VB, 2, L, 5, LAYOUT.n_mels, LAYOUT.mel_frames,
                       LAYOUT.frames_per_window)
    total = sum(rates.values())
    for k, w in it.weights.items():
        assert rates[k] / total == pytest.approx(w)


def test_converter_packs_rows_in_the_batch_contract():
    tasks, name = register(prefix="conv")
    conv = st.PackedStreamsConverter(VB, LAYOUT, rows=4)
    ds = st.get_packed_dataset(name, L, VB, LAYOUT, shuffle=False, seed=0, converter=conv)
    rows = list(ds.as_numpy_iterator())
    want = {"tokens": ((L, K), np.int32), "loss_weights": ((L, K), np.float32),
            "segment_ids": ((L,), np.int32), "positions": ((L,), np.int32),
            "task_ids": ((L,), np.int32), "audio_slots": ((L,), np.int32),
            "audio_features": ((3, 40, 8), np.float32), "audio_mel_mask": ((3, 40), np.bool_)}
    assert {k: (v.shape, v.dtype) for k, v in rows[0].items()} == want
    n_examples = 0
    for row in rows:
        seg, pos = row["segment_ids"], row["positions"]
        used = int((seg > 0).sum())
        assert used and (seg[used:] == 0).all() and (row["task_ids"][used:] == -1).all()
        for s in range(1, seg.max() + 1):
            where = np.flatnonzero(seg == s)
            np.testing.assert_array_equal(pos[where], np.arange(len(where)))
            assert row["tokens"][where[0], 0] == V.BOS
            n_examples += 1
        slots = row["audio_slots"][row["audio_slots"] >= 0]
        assert (slots < LAYOUT.max_clips * LAYOUT.frames_per_window).all()
    # Every example the converter received is packed exactly once (none skipped at L=192), and
    # rows stack to the Grain batch contract.
    assert n_examples == conv.counts["examples"] > 0
    assert conv.counts["skipped_too_long"] == 0
    batch = next(ds.batch(4).as_numpy_iterator())
    assert batch["tokens"].shape == (4, L, K) and batch["audio_features"].shape == (4, 3, 40, 8)


def test_converter_skips_over_long_examples():
    tasks, _ = register(prefix="long")
    conv = st.PackedStreamsConverter(VB, LAYOUT, rows=2)
    rows = list(st.get_packed_dataset(tasks[2], 50, VB, LAYOUT, shuffle=False,
                                      converter=conv).as_numpy_iterator())
    assert rows == [] and conv.counts["skipped_too_long"] == len(SOURCES["t2a"])
