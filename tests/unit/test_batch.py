"""The batch contract (ualm_jax/format/batch.py): every producer emits exactly `batch_spec`'s keys,
shapes and dtypes, and a batch that breaks it fails naming the key and the expected shape."""
import numpy as np
import pytest

from data_pipelines.bench_data import synthetic_records
from data_pipelines.grain_pipeline import audio_args, make_iterator
from data_pipelines.preference_batches import PreferenceBatches
from data_pipelines.synthetic import stream_for_model
from ualm_jax.config import load_config
from ualm_jax.format.batch import (BatchContractError, BatchIterator, batch_spec, check_batch,
                                   host_batch_spec, model_batch_spec)
from ualm_jax.format.layout import AudioLayout, encoder_positions
from ualm_jax.format.records import to_record
from ualm_jax.format.template import Segment
from ualm_jax.format.vocab import JointVocab
from ualm_jax.model.params import example_batch

B, L = 4, 128


def config(*over):
    return load_config(None, ["model.preset=tiny", f"train.batch_size={B}", f"train.seq_len={L}",
                              "data.max_clips_per_row=3", *over])


def _sources(vb, n_mels, n):
    return {"text": synthetic_records("text", n, vb, n_mels, seed=0,
                                      shapes={"prompt": (4, 12), "answer": (4, 12)}),
            "caption": synthetic_records("caption", n, vb, n_mels, seed=1,
                                         shapes={"prompt": (4, 8), "mel": (20, 150),
                                                 "answer": (4, 10)})}


def test_spec_follows_the_config():
    cfg = config()
    enc = cfg.model.audio_encoder
    spec = batch_spec(cfg)
    k = cfg.model.num_codebooks
    assert {n: s.shape for n, s in spec.items()} == {
        "tokens": (B, L, k), "loss_weights": (B, L, k), "segment_ids": (B, L),
        "positions": (B, L), "task_ids": (B, L), "audio_slots": (B, L),
        "audio_features": (B, 3, enc.max_mel_frames, enc.n_mels),
        "audio_mel_mask": (B, 3, enc.max_mel_frames)}
    assert spec["audio_mel_mask"].dtype == np.bool_ and spec["tokens"].dtype == np.int32
    text = batch_spec(config("model.audio_encoder.enabled=false", "model.num_codebooks=0"))
    assert set(text) == {"tokens", "loss_weights", "segment_ids", "positions", "task_ids"}
    assert text["tokens"].shape == (B, L, 1)
    dpo = batch_spec(config("data.source=preference", "train.mode=dpo",
                            "data.preference_path=x", "dpo.reference=offline"))
    assert set(dpo) == {"tokens", "loss_weights", "segment_ids", "positions", "ref_logp"}
    assert host_batch_spec(cfg, 2)["tokens"].shape == (B // 2, L, k)


def test_check_batch_names_the_key_and_the_expected_shape():
    cfg = config()
    spec = batch_spec(cfg)
    good = {k: np.zeros(s.shape, s.dtype) for k, s in spec.items()}
    check_batch(good, spec)
    bad = dict(good, audio_features=np.zeros((B, 2, 64, 16), np.float32))
    with pytest.raises(BatchContractError, match=r"\['audio_features'\]: shape \(4, 2, 64, 16\), "
                                                 r"expected \(4, 3, "):
        check_batch(bad, spec)
    with pytest.raises(BatchContractError, match="missing \\['audio_mel_mask'\\]"):
        check_batch({k: v for k, v in good.items() if k != "audio_mel_mask"}, spec)
    with pytest.raises(BatchContractError, match="unexpected \\['extra'\\]"):
        check_batch(dict(good, extra=np.zeros(1)), spec)
    with pytest.raises(BatchContractError, match=r"\['positions'\]: dtype int64, expected int32"):
        check_batch(dict(good, positions=np.zeros((B, L), np.int64)), spec)


def test_synthetic_stream_meets_the_contract():
    for over in ((), ("model.audio_encoder.enabled=false",)):
        cfg = config(*over)
        stream = stream_for_model(cfg.model, B, L, max_clips=cfg.data.max_clips_per_row)
        assert isinstance(stream, BatchIterator) and not stream.per_host
        batch = next(stream)
        check_batch(batch, batch_spec(cfg), "synthetic")
    # With an encoder the captioning rows really use the clip slots, inside the mel mask.
    cfg = config()
    batch = next(stream_for_model(cfg.model, B, L, max_clips=3))
    assert batch["audio_mel_mask"].any() and (batch["audio_slots"] >= 0).any()
    layout = AudioLayout.of_model(cfg.model, 3)
    assert batch["audio_slots"].max() < layout.max_clips * layout.frames_per_window


def test_grain_packer_meets_the_contract():
    cfg = config()
    vb = JointVocab.from_model_config(cfg.model)
    n_mels = cfg.model.audio_encoder.n_mels
    sources = _sources(vb, n_mels, 40)
    data = {"mixture": [{"name": "text", "share": 0.5}, {"name": "caption", "share": 0.5}],
            "max_clips_per_row": cfg.data.max_clips_per_row}
    it = make_iterator(sources, data, vb, B, L, 0, **audio_args(cfg.model))
    assert isinstance(it, BatchIterator) and it.per_host
    for _ in range(2):
        check_batch(next(it), host_batch_spec(cfg, 1), "grain")


def test_preference_batches_meet_the_contract():
    cfg = config("data.source=preference", "train.mode=dpo", "data.preference_path=x",
                 "dpo.reference=offline")
    vb = JointVocab.from_model_config(cfg.model)

    def side(n):
        return to_record("t2a", [Segment("user", "text", np.arange(3)),
                                 Segment("assistant", "text", np.arange(n))])

    recs = [{"chosen": side(4), "rejected": side(6), "ref_logp_chosen": -1.0,
             "ref_logp_rejected": -2.0} for _ in range(5)]
    it = PreferenceBatches(recs, vb, B // 2, L, offline_reference=True)
    assert isinstance(it, BatchIterator) and not it.per_host
    check_batch(next(it), batch_spec(cfg), "preference")


def test_seqio_converter_meets_the_contract():
    seqio = pytest.importorskip("seqio")
    from data_pipelines import seqio_tasks as st

    cfg = config()
    vb = JointVocab.from_model_config(cfg.model)
    layout = AudioLayout.of_model(cfg.model, cfg.data.max_clips_per_row)
    n_mels = layout.n_mels
    sources = _sources(vb, n_mels, 20)
    data = {"mixture": [{"name": "text", "share": 0.5}, {"name": "caption", "share": 0.5}],
            "max_clips_per_row": layout.max_clips}
    _, name = st.register_tasks(sources, data, vb, L, seed=0, **audio_args(cfg.model),
                                prefix="contract")
    conv = st.PackedStreamsConverter(vb, layout, rows=B)
    ds = st.get_packed_dataset(name, L, vb, layout, shuffle=False, seed=0, converter=conv)
    batch = next(ds.batch(B).as_numpy_iterator())
    check_batch(batch, batch_spec(cfg), "seqio")
    assert seqio is not None


def test_init_batch_and_inference_prompts_meet_the_contract(tiny_cfg):
    pool = tiny_cfg.audio_encoder.pool
    ex = example_batch(tiny_cfg, 2, 8)
    check_batch(ex, model_batch_spec(tiny_cfg, 2, 8, clips=1, mel_frames=2 * pool,
                                     task_ids=False), "init batch")
    from ualm_jax.infer.tasks import Loaded, reply_inputs

    cfg = config()
    m = Loaded(cfg, {}, JointVocab.from_model_config(cfg.model), _ByteTokenizer(), None)
    t = cfg.model.audio_encoder.max_mel_frames
    waves = [np.sin(np.arange(int(16000 * 0.02 * t / 100 * 2.5)) * 0.05).astype(np.float32), None]
    prompts, slots, feats, mask = reply_inputs(m, ["what is it", "hello"], waves)
    rows, longest = len(prompts), max(len(p) for p in prompts)
    spec = model_batch_spec(cfg.model, rows, longest, clips=feats.shape[1])
    check_batch({"audio_slots": slots, "audio_features": feats, "audio_mel_mask": mask},
                {k: spec[k] for k in ("audio_slots", "audio_features", "audio_mel_mask")},
                "reply prompts")
    layout = AudioLayout.of_model(cfg.model, feats.shape[1])
    assert int((slots[0] >= 0).sum()) == sum(
        layout.window_frames(n) for n in mask[0].sum(axis=-1) if n)


class _ByteTokenizer:
    def encode(self, text):
        return [b % 200 for b in text.encode()]


def test_encoder_positions_is_the_whisper_arithmetic():
    # 30 s: 3000 mel frames -> conv stride 2 -> 1500 -> pool 2 -> 750 (25 frames/s).
    assert encoder_positions(3000, 2) == 750 and encoder_positions(3001, 2) == 750
    assert encoder_positions(1, 2) == 0 and encoder_positions(3, 2) == 1 and encoder_positions(3, 1) == 2
    lay = AudioLayout(128, 3000, 750, 4)
    assert lay.pool == 2 and lay.frames_of(3000 + 10) == 750 + 2 and lay.slot(2, 5) == 1505
