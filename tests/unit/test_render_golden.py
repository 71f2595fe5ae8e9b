"""Golden digests of every array the sequence template, clip windowing and row packing produce:
the synthetic training stream (as the trainer builds it), the Grain mixture over in-memory
records, and the prompts and clip inputs inference hands the decoder. Re-laying out the code that
makes them must not move a single bit; a deliberate format change updates these digests (and
says so)."""
import hashlib
from types import SimpleNamespace

import numpy as np
import pytest

from data_pipelines.bench_data import synthetic_records
from data_pipelines.grain_pipeline import make_iterator
from ualm_jax.config import load_config
from ualm_jax.format.records import to_record
from ualm_jax.format.template import Segment
from ualm_jax.format.vocab import JointVocab


def digest(obj) -> str:
    """sha256 of nested dicts/lists/tuples of arrays and scalars (keys, dtypes, shapes, bytes)."""
    h = hashlib.sha256()

    def feed(x):
        if isinstance(x, dict):
            h.update(b"{")
            for k in sorted(x):
                h.update(repr(k).encode())
                feed(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(f"[{len(x)}".encode())
            for v in x:
                feed(v)
            h.update(b"]")
        elif isinstance(x, np.ndarray):
            h.update(f"{x.dtype.str}{x.shape}".encode())
            h.update(np.ascontiguousarray(x).tobytes())
        else:
            h.update(repr(x).encode())

    feed(obj)
    return h.hexdigest()[:24]


# (i) The synthetic stream, as the trainer builds it ----------------------------------------------
TINY = ["model.preset=tiny", "train.batch_size=8", "train.seq_len=64"]
SYNTHETIC = {
    "default": ([], "f2951618b0a091901c20ef19"),
    "id0_pad": (["data.text_id0_as_pad=true"], "69babd70cb6988d83cb2466f"),
    "no_headers": (["data.supervise_headers=none"], "4af6602825849a5478ada7da"),
    "weights_seed": (["model.stream_weights=[0.4,0.3,0.2,0.1]", "seed=7",
                      "data.task_weights={text: 1.0, caption: 3.0, t2a: 2.0}",
                      "data.max_clips_per_row=2"], "cbe06353b35521235b737d40"),
    "long_rows": (["train.seq_len=256", "train.batch_size=4"], "3f2c7a1037056d88d5884c30"),
    "text_only": (["data.task_weights={text: 1.0, caption: 0.0, t2a: 0.0}"],
                  "00457acacf5c3cbe2895723c"),
}


@pytest.mark.parametrize("name", sorted(SYNTHETIC))
def test_synthetic_stream_is_unchanged(name):
    from ualm_jax.train.data import make_eval_iterator, make_train_iterator

    overrides, want = SYNTHETIC[name]
    cfg = load_config(None, TINY + overrides)
    train, held_out = make_train_iterator(cfg), make_eval_iterator(cfg)
    batches = [next(train) for _ in range(3)] + [next(held_out)]
    train.set_state({"step": 1})
    batches.append(next(train))
    assert digest(batches) == want


# (ii) What inference hands the decoder ------------------------------------------------------------
class _Bytes:
    def encode(self, text):
        return [b % 200 for b in text.encode()]

    def decode(self, ids):
        return ""


def _waves():
    """Three lengths: short, one window (64 mel frames) plus one frame (its tail gives no encoder
    frame and is dropped), and longer than two windows."""
    rng = np.random.default_rng(3)
    return [(0.1 * rng.standard_normal(n)).astype(np.float32)
            for n in (16000 * 3 // 10, 64 * 160 + 1, 16000 * 3 // 2)]


def _loaded(*overrides):
    from ualm_jax.infer.tasks import Loaded

    cfg = load_config(None, TINY + list(overrides))
    return Loaded(cfg, {}, JointVocab.from_model_config(cfg.model), _Bytes(), None)


def _decoder_calls(monkeypatch, m, run):
    """Every (decoder key, prompts, arguments) `run` hands the decoder, through a stand-in."""
    from ualm_jax.infer import tasks

    calls = []
    monkeypatch.setattr(tasks, "generator_for", lambda m, rows, max_len: (rows, max_len))
    monkeypatch.setattr(tasks, "audio_codes", lambda seg, vocab: None)

    def generate(gen, prompts, cfg, **kw):
        calls.append({"gen": gen, "prompts": list(prompts), **kw})
        return [[SimpleNamespace(modality="text", ids=[])] for _ in prompts]

    monkeypatch.setattr(tasks, "generate", generate)
    run(m)
    return calls


INFER = {
    "caption": "eb07ffe3354795943f968001",
    "answer": "df15d677e5be2ad89cdb69b7",
    "reason": "b9a25c9840228a2669df0c61",
    "t2a": "068333b60d3d6aa8c4c84fb4",
    "t2a_reference_uncond": "277fbd4f6b7c229236f62d84",
    "answer_id0_pad": "d0574165ef230b19a712b873",
}


@pytest.mark.parametrize("name", sorted(INFER))
def test_inference_inputs_are_unchanged(name, monkeypatch):
    from ualm_jax.infer import tasks

    GenerationConfig = tasks.GenerationConfig
    waves = _waves()
    questions = ["what is it", "", "how loud is it!"]
    g = GenerationConfig(batch=2, max_new=8)
    runs = {
        "caption": lambda m: tasks.caption(m, waves, g),
        "answer": lambda m: tasks.answer(m, questions + ["and this?"], waves + [None], g),
        "reason": lambda m: tasks.reason(m, ["plan a sound", "a dog then a cat"], g),
        "t2a": lambda m: tasks.text_to_audio(m, ["a dog barks", "rain"],
                                             GenerationConfig(batch=2, cfg_scale=3.0)),
        "t2a_reference_uncond": lambda m: tasks.text_to_audio(
            m, ["a dog barks", "rain", "wind"], GenerationConfig(batch=2, cfg_scale=3.0,
                                                                uncond="reference")),
        "answer_id0_pad": lambda m: tasks.answer(m, ["!!x", "a!"], [waves[2], None], g),
    }
    m = _loaded("data.text_id0_as_pad=true") if name.endswith("id0_pad") else _loaded()
    calls = _decoder_calls(monkeypatch, m, runs[name])
    direct = tasks.reply_inputs(m, questions, waves) if name == "answer" else None
    assert digest([calls, direct]) == INFER[name]


# (iii) The Grain mixture over in-memory records ---------------------------------------------------
VB = JointVocab(text_vocab_size=512, num_codebooks=4, codebook_size=16)
N_MELS, MEL_FRAMES, FPW = 8, 40, 10  # windows of 40 mel frames -> 10 encoder frames
SHAPES = {"text": {"prompt": (4, 12), "answer": (4, 12)},
          "caption": {"prompt": (4, 8), "mel": (30, 130), "answer": (4, 10)},
          "t2a": {"prompt": (4, 10), "codes": (20, 60)}}


def _reason_records(n, seed=9):
    """Reasoning rows: the assistant turn continues in another modality (supervised headers)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        segs = [Segment("user", "text", rng.integers(0, 512, 5)),
                Segment("assistant", "text", rng.integers(0, 512, 4)),
                Segment("assistant", "audio", rng.integers(0, 16, (int(rng.integers(3, 9)), 4))),
                Segment("assistant", "text", rng.integers(0, 512, 3))]
        out.append(to_record("reason_enrichment", segs, num_codebooks=4, n_mels=N_MELS))
    return out


SOURCES = {**{kind: synthetic_records(kind, 60, VB, N_MELS, seed=i, shapes=SHAPES[kind])
              for i, kind in enumerate(SHAPES)}, "reason": _reason_records(40)}
MIXTURE = [{"name": "text", "share": 0.4}, {"name": "caption", "share": 0.3},
           {"name": "t2a", "share": 0.2}, {"name": "reason", "share": 0.1}]
GRAIN = {
    "default": ({}, {}, "07e2cb93916da3ac65359d4f"),
    "dropout_reasoning": ({"cfg_dropout": 0.3, "supervise_headers": "reasoning"}, {},
                          "acf119d18c0415695fa59252"),
    "id0_pad_no_headers": ({"text_id0_as_pad": True, "supervise_headers": "none",
                            "cfg_dropout": 0.5},
                           {"stream_weights": [0.4, 0.3, 0.2, 0.1]}, "e441c45b3f6a18e5a81a6f8f"),
    "process_1_of_2": ({"cfg_dropout": 0.2, "row_lookahead": 3},
                       {"process_index": 1, "process_count": 2}, "47040d305de6bb3c58c82cef"),
    "short_rows_few_clips": ({"max_clips_per_row": 1, "shuffle": False}, {"seq_len": 64},
                             "9151017b2a1f6d294ee29028"),
    "validation": ({"cfg_dropout": 0.5}, {"split": "validation", "seed": 5},
                   "fcc7f6902c42fea361d96215"),
}


@pytest.mark.parametrize("name", sorted(GRAIN))
def test_grain_mixture_is_unchanged(name):
    data, kw, want = GRAIN[name]
    cfg = {"mixture": MIXTURE, "cfg_dropout": 0.0, "max_clips_per_row": 3, **data}
    kw = {"batch_size": 4, "seq_len": 160, "seed": 0, **kw}
    it = make_iterator(SOURCES, cfg, VB, n_mels=N_MELS, mel_frames=MEL_FRAMES,
                       frames_per_window=FPW, **kw)
    batches = [next(it) for _ in range(4)]
    state = it.get_state()
    after = [next(it) for _ in range(2)]
    it.set_state(state)
    assert digest(batches + after + [next(it), it.stats()]) == want
