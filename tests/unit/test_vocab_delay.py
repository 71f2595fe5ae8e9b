import numpy as np
import pytest

from ualm_jax.format.delay import apply_delay, revert_delay
from ualm_jax.format.vocab import JointVocab


def test_7b_joint_vocab_matches_paper():
    v = JointVocab(text_vocab_size=152064, num_codebooks=8, codebook_size=1024)
    assert v.size == 160520 and v.audio_size == 8200
    assert v.text_offset == 256 and v.audio_offset == 256 + 152064
    assert v.codebook_pad(1) == v.audio_offset + 1025
    assert v.padded_size % 128 == 0 and v.padded_size >= v.size


def test_codes_roundtrip_and_ranges():
    v = JointVocab(text_vocab_size=100, num_codebooks=3, codebook_size=5)
    codes = np.array([[0, 4, 2], [1, 1, 1]])
    ids = v.codes_to_joint(codes)
    assert ids[0].tolist() == [357, 367, 371]  # pad of cb k at 356 + 6k, then its codes
    assert np.array_equal(v.joint_to_codes(ids), codes)
    assert v.is_audio(ids).all() and not v.is_text(ids).any()
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 5\)"):
        v.codes_to_joint(np.array([[5, 0, 0]]))


def test_delay_pattern():
    pads = np.array([100, 200, 300])
    codes = np.arange(12).reshape(4, 3)  # T=4, K=3
    d = apply_delay(codes, pads)
    assert d.shape == (6, 3)
    assert d[:, 0].tolist() == [0, 3, 6, 9, 100, 100]
    assert d[:, 2].tolist() == [300, 300, 2, 5, 8, 11]
    assert np.array_equal(revert_delay(d), codes)
