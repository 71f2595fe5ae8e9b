"""SeqIO path: record Tasks rendered as the Grain path renders them, the same example stream as
Grain with shuffling off, exact resume of the checkpointable iterator, host shards, user Tasks."""
import json

import numpy as np
import pytest

seqio = pytest.importorskip("seqio")
tf = pytest.importorskip("tensorflow")

from data_pipelines import seqio_tasks as st  # noqa: E402
from data_pipelines.bench_data import synthetic_records  # noqa: E402
from data_pipelines.grain_pipeline import make_iterator, task_dataset  # noqa: E402
from data_pipelines.render import KeyedUniform, Renderer  # noqa: E402
from data_pipelines.seqio_pipeline import SeqioPackedIterator  # noqa: E402
from ualm_jax.format import vocab as V  # noqa: E402
from ualm_jax.format.layout import AudioLayout  # noqa: E402
from ualm_jax.format.records import ROLE_IDS  # noqa: E402
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
AUDIO = dict(n_mels=LAYOUT.n_mels, mel_frames=LAYOUT.mel_frames,
             frames_per_window=LAYOUT.frames_per_window)


def cfg(cfg_dropout=0.0, shuffle=True):
    return {"mixture": MIXTURE, "cfg_dropout": cfg_dropout, "max_clips_per_row": LAYOUT.max_clips,
            "shuffle": shuffle}


def register(prefix="t", shuffle_buffer=16):
    return st.register_tasks(SOURCES, cfg(), VB, L, seed=5, prefix=prefix,
                             shuffle_buffer=shuffle_buffer, **AUDIO)


def renderers(tasks, cfg_dropout=0.0, seed=5):
    return [Renderer(VB, LAYOUT, i, seed, cfg_dropout, supervise_headers="assistant")
            for i in range(len(tasks))]


def rendered(name, cfg_dropout=0.0, shuffle=False, seed=5, shard=(0, 1)):
    prefix = name.rpartition("_")[0]
    tasks, rates, fn = st.provider_tasks(name, [f"{prefix}_{e['name']}" for e in MIXTURE])
    return st.rendered_mixture(tasks, rates, fn, renderers(tasks, cfg_dropout, seed), "train",
                               shuffle, seed, *shard)


def packed(name, rows=4, cfg_dropout=0.0, shuffle=True, seed=5, shard=(0, 1), snapshot_every=2):
    return SeqioPackedIterator(lambda: rendered(name, cfg_dropout, shuffle, seed, shard), rows, L,
                               K, LAYOUT, 8, snapshot_every=snapshot_every)


def test_record_tasks_render_what_grain_renders():
    tasks, _ = register()
    for t, (name, recs) in zip(tasks, SOURCES.items()):
        got = list(rendered(t).take(len(recs)).as_numpy_iterator())
        # The Grain path's per-task stream, unshuffled: element i renders record i.
        grain_ds = task_dataset(recs, Renderer(VB, LAYOUT, 0, seed=5, supervise_headers="assistant"),
                                5, shuffle=False)
        for i, x in enumerate(got):
            e = grain_ds[i]
            np.testing.assert_array_equal(x["tokens"], e.tokens)
            np.testing.assert_array_equal(x["loss_weights"], e.loss_weights)
            assert list(x["clip_positions"]) == [p for p, _, _ in e.clips]
            assert list(x["clip_frames"]) == [n for _, n, _ in e.clips]
            for c, (_, _, w) in enumerate(e.clips):
                np.testing.assert_array_equal(x["clip_mel"][c, :len(w)], w)


def test_cfg_dropout_uses_the_same_key_in_both_paths():
    tasks, _ = register(prefix="cfg")
    n = 2 * len(SOURCES["t2a"])  # two epochs: keys keep counting across the repeat, as in Grain
    got = list(rendered(tasks[2], cfg_dropout=0.5).take(n).as_numpy_iterator())
    dropped = [bool(x["tokens"][0, 0] == V.PAD) for x in got]
    expect = [KeyedUniform(5, 0, i).random() < 0.5 for i in range(n)]
    assert dropped == expect and 0 < sum(dropped) < n
    grain_ds = task_dataset(SOURCES["t2a"], Renderer(VB, LAYOUT, 0, 5, 0.5), 5, shuffle=False)
    assert [grain_ds[i].cfg_dropped for i in range(n)] == expect


def test_mixture_rates_are_the_token_share_weights():
    _, name = register(prefix="rates")
    m = seqio.get_mixture_or_task(name)
    rates = {t.name[len("rates_"):]: m.get_rate(t) for t in m.tasks}
    it = make_iterator(SOURCES, cfg(), VB, 2, L, 5, **AUDIO)
    total = sum(rates.values())
    for k, w in it.weights.items():
        assert rates[k] / total == pytest.approx(w)


@pytest.mark.parametrize("cfg_dropout", [0.0, 0.3])
def test_unshuffled_seqio_stream_equals_the_grain_stream(cfg_dropout):
    """Same records, seed and interleave: the SeqIO path's mixed, rendered stream is the Grain
    path's, example for example (with shuffling on the orders differ: Grain permutes indices,
    tf.data uses buffers; the packing differs: Grain packs each global row from its own share of
    the stream, SeqIO this host's rows from its sequential stream)."""
    _, name = register(prefix=f"same{int(cfg_dropout * 10)}")
    grain_it = make_iterator(SOURCES, cfg(cfg_dropout, shuffle=False), VB, 4, L, 5, **AUDIO)
    n = 3 * len(SOURCES["text"])  # past an epoch of every task
    got = list(rendered(name, cfg_dropout=cfg_dropout).take(n).as_numpy_iterator())
    for i, x in enumerate(got):
        e = grain_it.stream[i]
        assert int(x["task_id"]) == e.task, i
        np.testing.assert_array_equal(x["tokens"], e.tokens, err_msg=str(i))
        np.testing.assert_array_equal(x["loss_weights"], e.loss_weights, err_msg=str(i))
        assert [int(p) for p in x["clip_positions"]] == [p for p, _, _ in e.clips]


def test_resume_continues_the_shuffled_stream_bit_for_bit():
    _, name = register(prefix="resume")
    straight = packed(name, cfg_dropout=0.2)
    want = [next(straight) for _ in range(7)]
    first = packed(name, cfg_dropout=0.2)
    for _ in range(3):
        next(first)
    state = json.loads(json.dumps(first.get_state()))  # what the checkpoint stores
    assert state["read"] > state["snapshot_at"] >= 0 or state["pending"]
    second = packed(name, cfg_dropout=0.2)
    second.set_state(state)
    for w in want[3:]:
        b = next(second)
        for k in w:
            np.testing.assert_array_equal(w[k], b[k], err_msg=k)
    other = packed(name, cfg_dropout=0.2, seed=6)  # another seed is another stream
    assert not np.array_equal(next(other)["tokens"], want[0]["tokens"])


def test_host_shards_split_each_task_disjointly():
    tasks, _ = register(prefix="hosts")
    n = len(SOURCES["text"])
    stamps = []
    for i in range(2):
        ds = rendered(tasks[0], shard=(i, 2)).take(n // 2)
        # The prompt starts <bos><user><text> then the record's stamp (its index).
        stamps.append({int(x["tokens"][4, 0]) - VB.text_offset for x in ds.as_numpy_iterator()})
    assert stamps[0].isdisjoint(stamps[1]) and stamps[0] | stamps[1] == set(range(n))
    assert stamps[0] == set(range(0, n, 2))  # records i::n, as the Grain path splits hosts


def test_a_user_task_with_its_own_preprocessor_is_read_and_one_without_records_is_named():
    recs = SOURCES["text"]

    def dataset_fn(split, shuffle_files, seed=None):
        return st.records_dataset(recs)

    def drop_system_turns(ds):  # a user's preprocessor: it keeps the record features
        return ds.filter(lambda r: tf.reduce_all(r["roles"] != ROLE_IDS["system"]))

    for name in ("user_text", "user_broken"):
        seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add("user_text", source=seqio.FunctionDataSource(dataset_fn, splits=["train"]),
                           preprocessors=[drop_system_turns], output_features=st.record_features())
    got = next(rendered("user_text").as_numpy_iterator())
    e = Renderer(VB, LAYOUT, 0, 5, supervise_headers="assistant")(0, recs[0])
    np.testing.assert_array_equal(got["tokens"], e.tokens)

    seqio.TaskRegistry.add("user_broken", source=seqio.FunctionDataSource(
        lambda split, shuffle_files, seed=None: tf.data.Dataset.from_tensors({"inputs": [1, 2]}),
        splits=["train"]), preprocessors=[], output_features={})
    with pytest.raises(ValueError, match="seqio task 'user_broken' does not emit the record feature"):
        rendered("user_broken")
    with pytest.raises(ValueError, match="'nope' is not a registered seqio Mixture or Task"):
        st.provider_tasks("nope")


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
