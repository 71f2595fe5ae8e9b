"""The multi-stream loss against an independent numpy implementation."""
import jax.numpy as jnp
import numpy as np
import pytest

from ualm_jax.model.loss import loss_sums
from ualm_jax.format.vocab import JointVocab


def numpy_intervals(vocab, max_interval):
    """The reference's grouping of codebook intervals into loss intervals (0: one interval)."""
    starts = [vocab.codebook_start(j) for j in range(vocab.num_codebooks)]
    if not max_interval:
        return [(starts[0], vocab.size)]
    out, cur = [], starts[0]
    for j in range(1, len(starts)):
        end = starts[j] + vocab.codebook_stride
        if end - cur > max_interval:
            out.append((cur, end))
            cur = end
    if vocab.size > cur:
        out.append((cur, vocab.size))
    return out


def numpy_loss(h, head, stream_emb, tokens, weights, seg, vocab, objective, max_interval=0):
    """Straightforward loops: full logits per (row, position, stream), softmax over the
    allowed id range, weight of the target token, normalised by stream-0-weighted targets."""
    b, l, k = tokens.shape
    intervals = numpy_intervals(vocab, max_interval)
    total, count = 0.0, 0
    for r in range(b):
        for t in range(l - 1):
            if seg[r, t + 1] != seg[r, t]:
                continue
            if weights[r, t + 1, 0] > 0:
                count += 1
            for s in range(k):
                w = weights[r, t + 1, s]
                if w == 0:
                    continue
                target = tokens[r, t + 1, s]
                e = np.zeros_like(stream_emb[0]) if s == 0 else stream_emb[s]
                logits = (h[r, t] + e).astype(np.float64) @ head.T.astype(np.float64)
                target_is_audio = vocab.audio_offset <= tokens[r, t + 1, 0] < vocab.size
                if s == 0 and not (objective != "reference" and target_is_audio):
                    lo, hi = 0, vocab.size
                elif objective == "consistent":
                    lo = vocab.codebook_start(s)
                    hi = lo + vocab.codebook_stride
                elif s == 0:
                    lo, hi = vocab.audio_offset, vocab.size
                else:  # the loss interval holding the target
                    lo, hi = next((a, z) for a, z in intervals if a <= target < z)
                assert lo <= target < hi
                z = logits[lo:hi]
                lse = np.log(np.exp(z - z.max()).sum()) + z.max()
                total += w * (lse - logits[target])
    return total / max(count, 1), count


@pytest.mark.parametrize("objective", ["reference", "modality", "consistent"])
@pytest.mark.parametrize("chunk", [0, 16])
def test_loss_matches_numpy(tiny_batch, objective, chunk):
    vocab = JointVocab(text_vocab_size=512, num_codebooks=4, codebook_size=32)
    rng = np.random.default_rng(0)
    b, l, k = tiny_batch["tokens"].shape
    d = 16
    h = rng.standard_normal((b, l, d)).astype(np.float32)
    head = rng.standard_normal((vocab.padded_size, d)).astype(np.float32)
    emb = rng.standard_normal((k, d)).astype(np.float32)
    emb[0] = 0.0  # the model feeds e_0 = 0
    weights = tiny_batch["loss_weights"] * rng.uniform(0.5, 1.5, tiny_batch["loss_weights"].shape)
    batch = dict(tiny_batch, loss_weights=weights.astype(np.float32))
    sums = loss_sums(jnp.asarray(h), jnp.asarray(head), jnp.asarray(emb), batch, vocab, objective,
                     chunk)
    expected, count = numpy_loss(h, head, emb, batch["tokens"], batch["loss_weights"],
                                 batch["segment_ids"], vocab, objective)
    assert count > 0 and float(sums.count) == count
    np.testing.assert_allclose(float(sums.total / sums.count), expected, rtol=2e-5)
    # The batch really holds audio targets in every stream, and text targets in stream 0.
    assert (np.asarray(sums.per_stream_weight) > 0).all()


@pytest.mark.parametrize("objective", ["reference", "modality"])
def test_loss_intervals_match_numpy(tiny_batch, objective):
    """model.max_loss_interval=70 over 4 codebooks of 33 ids: intervals of 3 + 1 codebooks, as
    the reference splits them; each stream-k target is softmaxed within its own interval."""
    vocab = JointVocab(text_vocab_size=512, num_codebooks=4, codebook_size=32)
    assert vocab.audio_loss_intervals(70) == numpy_intervals(vocab, 70) == [
        (vocab.codebook_start(0), vocab.codebook_start(3)), (vocab.codebook_start(3), vocab.size)]
    rng = np.random.default_rng(2)
    b, l, k = tiny_batch["tokens"].shape
    h = rng.standard_normal((b, l, 16)).astype(np.float32)
    head = rng.standard_normal((vocab.padded_size, 16)).astype(np.float32)
    emb = rng.standard_normal((k, 16)).astype(np.float32)
    emb[0] = 0.0
    sums = loss_sums(jnp.asarray(h), jnp.asarray(head), jnp.asarray(emb), tiny_batch, vocab,
                     objective, 16, max_interval=70)
    expected, count = numpy_loss(h, head, emb, tiny_batch["tokens"], tiny_batch["loss_weights"],
                                 tiny_batch["segment_ids"], vocab, objective, 70)
    np.testing.assert_allclose(float(sums.total / sums.count), expected, rtol=2e-5)
    whole = loss_sums(jnp.asarray(h), jnp.asarray(head), jnp.asarray(emb), tiny_batch, vocab,
                      objective, 16)
    assert float(whole.total) > float(sums.total)  # smaller softmaxes, smaller CE


def test_objectives_differ_on_audio(tiny_batch):
    vocab = JointVocab(text_vocab_size=512, num_codebooks=4, codebook_size=32)
    rng = np.random.default_rng(1)
    b, l, k = tiny_batch["tokens"].shape
    h = jnp.asarray(rng.standard_normal((b, l, 16)), jnp.float32)
    head = jnp.asarray(rng.standard_normal((vocab.padded_size, 16)), jnp.float32)
    emb = jnp.asarray(rng.standard_normal((k, 16)), jnp.float32)
    vals = [float(loss_sums(h, head, emb, tiny_batch, vocab, o).total)
            for o in ("reference", "modality", "consistent")]
    # Restricting the softmax can only lower each CE term.
    assert vals[0] > vals[1] > vals[2]
