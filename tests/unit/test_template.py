"""The sequence template: exact token / loss-weight layout per task, delay pattern, encoder slots
and CFG dropout (the synthetic stream renders through it: test_render_golden.py pins its output)."""
import numpy as np
import pytest

from ualm_jax.format.template import (AUDIO_TO_CAPTION_PROMPT, Segment, audio_qa_segments,
                                     captioning_segments, describe, render, text_only_segments,
                                     text_to_audio_segments)
from data_pipelines.tokenizer import TextTokenizer, train_tiny_bpe
from ualm_jax.format import vocab as V
from ualm_jax.format.delay import apply_delay, revert_delay
from ualm_jax.format.vocab import JointVocab

K = 3
VB = JointVocab(text_vocab_size=100, num_codebooks=K, codebook_size=10)
T0 = VB.text_offset


def word_encode(text):
    """A stand-in tokenizer: one id per word, so layouts are easy to write down."""
    return [len(w) % 100 for w in text.split()]


def codes(t, seed=0):
    return np.random.default_rng(seed).integers(0, VB.codebook_size, (t, K))


def stream(ex, k=0):
    return ex.tokens[:, k].tolist()


def test_text_only_layout_and_weights():
    ex = render([Segment("user", "text", [5, 6]), Segment("assistant", "text", [7])], VB)
    assert stream(ex) == [V.BOS, V.USER, V.TEXT, T0 + 5, T0 + 6, V.EOS,
                          V.ASSISTANT, V.TEXT, T0 + 7, V.EOS]
    assert ex.tokens.shape == (10, K) and ex.tokens.dtype == np.int32
    assert not ex.tokens[:, 1:].any()
    # Weight on the target: assistant content and its closing <eos>, nothing else.
    assert ex.loss_weights[:, 0].tolist() == [0, 0, 0, 0, 0, 0, 0, 0, 1, 1]
    assert not ex.loss_weights[:, 1:].any()
    assert ex.loss_weights.dtype == np.float32 and ex.audio_input_frames == []


def test_eot_between_same_role_segments_else_eos():
    segs = [Segment("system", "text", [1]), Segment("user", "text", [2]), Segment("user", "audio", 4),
            Segment("assistant", "text", [3]), Segment("assistant", "audio", codes(2))]
    s0 = stream(render(segs, VB))
    closers = [t for t in s0 if t in (V.EOS, V.EOT)]
    assert closers == [V.EOS, V.EOT, V.EOS, V.EOT, V.EOS]


def test_text_to_audio_delay_pattern_and_one_over_k_weights():
    c = codes(4)
    ex = render(text_to_audio_segments(word_encode, "a dog", c), VB)
    prompt = word_encode("<|text to audio|> Generate audio for this caption. a dog")
    start = 1 + 2 + len(prompt) + 1 + 2  # <bos> <user><text> prompt <eos> <assistant><audio>
    assert stream(ex)[:start] == ([V.BOS, V.USER, V.TEXT] + [T0 + i for i in prompt]
                                  + [V.EOS, V.ASSISTANT, V.AUDIO])
    audio = ex.tokens[start:start + 4 + K - 1]
    np.testing.assert_array_equal(audio, apply_delay(VB.codes_to_joint(c), VB.codebook_pads()))
    # Ramp pads: codebook k starts k frames late and codebook 0 ends K-1 frames early.
    assert audio[0, 1] == VB.codebook_pad(1) and audio[1, 2] == VB.codebook_pad(2)
    assert audio[-1, 0] == VB.codebook_pad(0)
    np.testing.assert_array_equal(VB.joint_to_codes(revert_delay(audio)), c)
    # Every audio position, ramp included, weighs 1/K per stream (one frame = one text token).
    np.testing.assert_allclose(ex.loss_weights[start:start + 6], 1.0 / K)
    assert len(ex) == start + 6 + 1 and ex.tokens[-1, 0] == V.EOS
    assert ex.loss_weights[-1].tolist() == [1.0, 0.0, 0.0]
    assert not ex.loss_weights[:start].any()
    assert np.isclose(ex.loss_weights.sum(), 6 + 1)


def test_captioning_encoder_slots():
    ex = render(captioning_segments(word_encode, 5, "birds sing"), VB)
    prompt = word_encode(AUDIO_TO_CAPTION_PROMPT)
    slot = 1 + 2 + len(prompt) + 1 + 2  # ... <eot> <user><audio>
    assert ex.audio_input_frames == [(slot, 5)]
    assert stream(ex)[slot - 3:slot] == [V.EOT, V.USER, V.AUDIO]
    assert not ex.tokens[slot:slot + 5].any() and not ex.loss_weights[slot:slot + 5].any()
    assert stream(ex)[slot + 5:] == [V.EOS, V.ASSISTANT, V.TEXT, T0 + 5, T0 + 4, V.EOS]
    assert ex.loss_weights[slot + 5:, 0].tolist() == [0, 0, 0, 1, 1, 1]


def test_user_audio_as_codes_is_delayed_and_unweighted():
    c = codes(3, seed=1)
    ex = render([Segment("user", "audio", c), Segment("assistant", "text", [9])], VB)
    np.testing.assert_array_equal(ex.tokens[3:3 + 3 + K - 1],
                                  apply_delay(VB.codes_to_joint(c), VB.codebook_pads()))
    assert not ex.loss_weights[:3 + 3 + K - 1 + 1].any() and ex.audio_input_frames == []


def test_audio_qa_dialogue_turns():
    segs = audio_qa_segments(word_encode, [("what is it", 3, "a cat"), ("and now", None, "silence")],
                             system="be brief")
    assert [(s.role, s.modality) for s in segs] == [
        ("system", "text"), ("user", "text"), ("user", "audio"), ("assistant", "text"),
        ("user", "text"), ("assistant", "text")]
    ex = render(segs, VB)
    assert len(ex.audio_input_frames) == 1
    assert np.isclose(ex.loss_weights.sum(), 2 + 1 + 1 + 1)  # two answers, each with its <eos>
    tt = text_only_segments(word_encode, [("hi", "hello there")])
    assert [(s.role, s.modality) for s in tt] == [("user", "text"), ("assistant", "text")]


def test_continuation_headers_optionally_supervised():
    segs = [Segment("user", "text", [1]), Segment("assistant", "text", [2]),
            Segment("assistant", "audio", codes(2))]
    base = render(segs, VB)
    sup = render(segs, VB, supervise_continuation_headers=True)
    diff = np.nonzero(base.loss_weights[:, 0] != sup.loss_weights[:, 0])[0]
    assert [stream(base)[i] for i in diff] == [V.ASSISTANT, V.AUDIO]  # only the second header


def test_cfg_dropout_keeps_target_and_zeroes_conditioning():
    segs = [Segment("user", "text", [4, 5, 6]), Segment("user", "audio", 3),
            Segment("assistant", "audio", codes(5))]
    full = render(segs, VB)
    ex = render(segs, VB, cfg_dropout_rng=np.random.default_rng(0), cfg_dropout_prob=1.0)
    assert ex.cfg_dropped and ex.tokens.shape == full.tokens.shape
    start = stream(full).index(V.ASSISTANT)
    np.testing.assert_array_equal(ex.tokens[start:], full.tokens[start:])
    np.testing.assert_array_equal(ex.loss_weights[start:], full.loss_weights[start:])
    assert not ex.tokens[:start].any() and not ex.loss_weights[:start].any()  # <bos> included
    assert ex.audio_input_frames == []
    # p = 0, or no rng: untouched.
    kept = render(segs, VB, cfg_dropout_rng=np.random.default_rng(0), cfg_dropout_prob=0.0)
    np.testing.assert_array_equal(kept.tokens, full.tokens)
    assert not kept.cfg_dropped and kept.audio_input_frames == full.audio_input_frames
    # No assistant audio (captioning): nothing to keep, nothing dropped.
    cap = render(captioning_segments(word_encode, 4, "x"), VB,
                 cfg_dropout_rng=np.random.default_rng(0), cfg_dropout_prob=1.0)
    assert not cap.cfg_dropped


def test_cfg_dropout_is_reproducible_per_sample():
    segs = text_to_audio_segments(word_encode, "rain", codes(3))

    def decisions(seed):
        return [render(segs, VB, cfg_dropout_rng=np.random.default_rng([seed, i]),
                       cfg_dropout_prob=0.3).cfg_dropped for i in range(400)]

    a, b = decisions(7), decisions(7)
    assert a == b and a != decisions(8)
    assert 0.2 < np.mean(a) < 0.4
    # Exactly one draw per sample, whatever the outcome, so streams stay aligned.
    rng = np.random.default_rng(3)
    render(segs, VB, cfg_dropout_rng=rng, cfg_dropout_prob=0.5)
    ref = np.random.default_rng(3)
    ref.random()
    assert rng.random() == ref.random()


def test_invalid_segments_raise():
    with pytest.raises(ValueError, match="role"):
        Segment("narrator", "text", [1])
    with pytest.raises(ValueError, match="modality"):
        Segment("user", "video", [1])
    with pytest.raises(ValueError, match="encoder frames are input only"):
        render([Segment("assistant", "audio", 5)], VB)
    with pytest.raises(ValueError, match="text ids"):
        render([Segment("user", "text", [VB.text_vocab_size])], VB)
    with pytest.raises(ValueError):
        render([Segment("assistant", "audio", np.zeros((4, K + 1), int))], VB)
    with pytest.raises(ValueError):
        render([Segment("assistant", "audio", np.full((4, K), VB.codebook_size))], VB)


def test_describe_and_real_tokenizer(tmp_path):
    texts = ["a dog barks in the rain", "birds sing at dawn", AUDIO_TO_CAPTION_PROMPT,
             "<|text to audio|> Generate audio for this caption."] * 4
    tok = TextTokenizer(train_tiny_bpe(texts, 320, str(tmp_path)))
    assert tok.vocab_size <= 320 and tok.decode(tok.encode("a dog barks")) == "a dog barks"
    vb = JointVocab(text_vocab_size=tok.vocab_size, num_codebooks=K, codebook_size=10)
    t2a = text_to_audio_segments(tok.encode, "a dog barks", codes(6))
    examples = [render(t2a, vb), render(captioning_segments(tok.encode, 7, "birds sing"), vb),
                render(t2a, vb, cfg_dropout_rng=np.random.default_rng(0), cfg_dropout_prob=1.0)]
    packed = np.concatenate([e.tokens for e in examples] + [np.zeros((3, K), np.int32)])
    weights = np.concatenate([e.loss_weights for e in examples] + [np.zeros((3, K), np.float32)])
    lines = describe(packed, vb, tok.decode, loss_weights=weights).splitlines()
    audio = "<assistant><audio> [codes 6 frames x 3 codebooks, 8 positions delayed; codebook 0: "
    assert lines[0] == "<bos>"
    assert lines[1] == ("<user><text> '<|text to audio|> Generate audio for this caption. a dog barks'"
                        " <eos>   [loss weight 0.00]")
    assert lines[2].startswith(audio) and lines[2].endswith("] <eos>   [loss weight 9.00]")
    assert lines[3:7] == ["<bos>",
                          f"<user><text> '{AUDIO_TO_CAPTION_PROMPT}' <eot>   [loss weight 0.00]",
                          "<user><audio> [encoder frames x7] <eos>   [loss weight 0.00]",
                          "<assistant><text> 'birds sing' <eos>   [loss weight 3.00]"]
    # The CFG-dropped example: its conditioning is one pad run, then the kept target.
    n_cond = len(examples[2]) - 8 - 3
    assert lines[7] == f"<pad> x{n_cond}" and lines[8] == lines[2] and lines[9] == "<pad> x3"
    # Without detok, text shows as (unshifted) ids.
    plain = describe(examples[1].tokens, vb).splitlines()
    assert plain[1] == f"<user><text> text{tok.encode(AUDIO_TO_CAPTION_PROMPT)} <eot>"
