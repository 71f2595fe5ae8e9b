"""Compatibility switches with the authors' reference code (ours is the default):
data.text_id0_as_pad (text id 0 -> pad) and --uncond reference (the reference's unconditional
guidance prompt). Numpy only, no model."""
import argparse
from types import SimpleNamespace

import numpy as np
import pytest

from data_pipelines.grain_pipeline import make_iterator
from data_pipelines.render import Renderer
from data_pipelines.synthetic import SyntheticStream
from ualm_jax.cli.args import add_generation_args
from ualm_jax.format.layout import AudioLayout
from ualm_jax.format.records import to_record
from ualm_jax.format.template import Segment, render
from ualm_jax.infer import tasks
from ualm_jax.infer.decode import GenerationConfig
from ualm_jax.infer.decode import DecodedSegment
from ualm_jax.format import vocab as V
from ualm_jax.format.vocab import JointVocab

K = 2
VB = JointVocab(text_vocab_size=100, num_codebooks=K, codebook_size=10)
# user "! x5", assistant "x7 !" (text id 0 is Qwen's "!")
SEGS = [Segment("user", "text", [0, 5]), Segment("assistant", "text", [7, 0])]
HEAD = [V.BOS, V.USER, V.TEXT]
MID = [V.EOS, V.ASSISTANT, V.TEXT]


# data.text_id0_as_pad ---------------------------------------------------------------------------
def test_text_id0_is_joint_id_256_by_default():
    assert VB.text_offset == 256
    ex = render(SEGS, VB)
    assert ex.tokens[:, 0].tolist() == HEAD + [256, 261] + MID + [263, 256, V.EOS]
    assert ex.loss_weights[:, 0].tolist() == [0] * 8 + [1, 1, 1]
    assert not ex.tokens[:, 1:].any() and not ex.loss_weights[:, 1:].any()


def test_text_id0_as_pad_renders_pad_with_no_loss():
    ex = render(SEGS, VB, text_id0_as_pad=True)
    assert ex.tokens[:, 0].tolist() == HEAD + [0, 261] + MID + [263, 0, V.EOS]
    assert ex.loss_weights[:, 0].tolist() == [0] * 8 + [1, 0, 1]
    assert not ex.tokens[:, 1:].any() and not ex.loss_weights[:, 1:].any()
    # The reference's rule on a text segment's ids: where(seq == pad, pad, seq + bias).
    ids = np.asarray([7, 0])
    np.testing.assert_array_equal(ex.tokens[8:10, 0], np.where(ids == 0, 0, ids + 256))
    # Only the id-0 positions change; lengths (and so packing) do not.
    off = render(SEGS, VB)
    changed = np.flatnonzero((ex.tokens != off.tokens).any(axis=1))
    assert changed.tolist() == [3, 9] and len(ex) == len(off)


def test_grain_renderer_and_iterator_follow_the_switch():
    rec = to_record("text", SEGS)
    layout = AudioLayout(0, 0, 0, 0)
    on = Renderer(VB, layout, text_id0_as_pad=True)(0, rec)
    want = render(SEGS, VB, text_id0_as_pad=True)
    np.testing.assert_array_equal(on.tokens, want.tokens)
    np.testing.assert_array_equal(on.loss_weights, want.loss_weights)
    assert Renderer(VB, layout)(0, rec).tokens[3, 0] == 256  # default: ours

    def first(**kw):
        cfg = {"mixture": [{"name": "text", "share": 1.0}], "cfg_dropout": 0.0,
               "supervise_headers": "none", "read_threads": 0, "prefetch": 0, **kw}
        b = next(make_iterator({"text": [rec] * 8}, cfg, VB, 1, 24, 0))
        return b["tokens"][0, :len(want), 0], b["loss_weights"][0, :len(want), 0]

    tokens, weights = first(text_id0_as_pad=True)
    np.testing.assert_array_equal(tokens, want.tokens[:, 0])
    np.testing.assert_array_equal(weights, want.loss_weights[:, 0])
    tokens, _ = first()
    np.testing.assert_array_equal(tokens, render(SEGS, VB).tokens[:, 0])


def test_synthetic_stream_follows_the_switch():
    off = SyntheticStream(VB, batch=4, seq=128, seed=0)
    on = SyntheticStream(VB, batch=4, seq=128, seed=0, text_id0_as_pad=True)
    seen = 0
    for i in range(4):
        a, b = off.batch_at(i), on.batch_at(i)
        zero = (a["tokens"][..., 0] == VB.text_offset) & (a["segment_ids"] > 0)
        seen += int(zero.sum())
        assert (b["tokens"][..., 0][zero] == V.PAD).all()
        assert (b["loss_weights"][..., 0][zero] == 0).all()
        np.testing.assert_array_equal(a["tokens"][~zero], b["tokens"][~zero])
        np.testing.assert_array_equal(a["loss_weights"][~zero], b["loss_weights"][~zero])
        np.testing.assert_array_equal(a["segment_ids"], b["segment_ids"])
    assert seen > 0  # the stream did hold text id 0


def test_config_threads_the_switch():
    from ualm_jax.config import load_config
    from ualm_jax.train.data import _template_args

    assert load_config().data.text_id0_as_pad is False
    cfg = load_config(overrides=["data.text_id0_as_pad=true"])
    assert cfg.data.text_id0_as_pad is True and _template_args(cfg)["text_id0_as_pad"] is True


# --uncond ---------------------------------------------------------------------------------------
def _loaded(id0_as_pad=False):
    cfg = SimpleNamespace(model=SimpleNamespace(num_codebooks=K),
                          data=SimpleNamespace(text_id0_as_pad=id0_as_pad))
    return SimpleNamespace(cfg=cfg, vocab=VB, tokenizer=SimpleNamespace(encode=lambda s: [3, 0, 4]),
                           mesh=None, rules=None)


def test_reference_uncond_blanks_the_assistant_token_too():
    m = _loaded()
    cond, ours = tasks.text_to_audio_prompts(m, ["a dog barks"])
    cond_ref, ref = tasks.text_to_audio_prompts(m, ["a dog barks"], uncond="reference")
    c, o, r = cond[0], ours[0], ref[0]
    np.testing.assert_array_equal(c, cond_ref[0])  # the conditional rows do not change
    n = len(c)
    assert c[:, 0].tolist() == HEAD + [259, 256, 260, V.EOS, V.ASSISTANT, V.AUDIO]
    assert o[:, 0].tolist() == [0] * (n - 2) + [V.ASSISTANT, V.AUDIO]  # ours (CFG dropout's)
    assert r[:, 0].tolist() == [0] * (n - 1) + [V.AUDIO]  # the reference's inference
    assert not o[:, 1:].any() and not r[:, 1:].any()
    assert np.flatnonzero((o != r).any(axis=1)).tolist() == [n - 2]  # exactly the <assistant>
    with pytest.raises(ValueError, match="uncond"):
        tasks.text_to_audio_prompts(m, ["x"], uncond="all")


def test_inference_prompts_follow_text_id0_as_pad():
    cond, _ = tasks.text_to_audio_prompts(_loaded(id0_as_pad=True), ["x"])
    assert cond[0][:, 0].tolist() == HEAD + [259, 0, 260, V.EOS, V.ASSISTANT, V.AUDIO]


def test_text_to_audio_uses_the_config_uncond(monkeypatch):
    seen = {}

    def fake_generate(gen, cond, cfg, start_phase, uncond_prompts, uids=None):
        seen["uncond"] = uncond_prompts
        return [[DecodedSegment("audio")] for _ in cond]

    monkeypatch.setattr(tasks, "generator_for", lambda m, rows, max_len: None)
    monkeypatch.setattr(tasks, "generate", fake_generate)
    m = _loaded()
    for mode in ("ours", "reference"):
        tasks.text_to_audio(m, ["x"], GenerationConfig(cfg_scale=3.0, uncond=mode))
        np.testing.assert_array_equal(seen["uncond"][0],
                                      tasks.text_to_audio_prompts(m, ["x"], mode)[1][0])
    assert GenerationConfig().uncond == "ours"


def test_generation_flag():
    p = argparse.ArgumentParser()
    add_generation_args(p)
    assert p.parse_args(["--checkpoint", "c"]).uncond == "ours"
    assert p.parse_args(["--checkpoint", "c", "--uncond", "reference"]).uncond == "reference"
    with pytest.raises(SystemExit):
        p.parse_args(["--checkpoint", "c", "--uncond", "blank"])
