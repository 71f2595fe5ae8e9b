"""KV-cache decoding equals the full forward; delay-aware masks; guidance; repeatability."""
import jax
import jax.numpy as jnp
import numpy as np

from ualm_jax.infer import sampling as S
from ualm_jax.infer.decode import GenerationConfig, Generator, audio_codes, generate
from ualm_jax.format import vocab as V
from ualm_jax.model.loss import stream_logits
from ualm_jax.model.ualm import UALM


def _full_logits(model, params, tokens):
    b, l, _ = tokens.shape
    batch = {"tokens": tokens, "segment_ids": np.ones((b, l), np.int32),
             "positions": np.tile(np.arange(l, dtype=np.int32), (b, 1))}
    h, head, emb = model.apply({"params": params}, batch, method=UALM.hidden_and_output)
    return np.stack([np.asarray(stream_logits(h, head, emb, model.vocab, k))
                     for k in range(tokens.shape[-1])], axis=2)  # [B, L, K, V]


def test_kv_cache_logits_equal_full_forward(tiny_model, tiny_params, tiny_cfg):
    rng = np.random.default_rng(0)
    k = tiny_cfg.num_codebooks
    lengths = [12, 8]
    gen = Generator(tiny_cfg, tiny_params, batch_size=2, max_len=16)
    rows = [rng.integers(1, 900, (n, k)).astype(np.int32) for n in lengths]
    full = [_full_logits(tiny_model, tiny_params, r[None])[0] for r in rows]
    prefix = 4
    longest_prefix = max(lengths) - min(lengths) + prefix  # left-padded rows share the cache slot
    tokens = np.zeros((2, longest_prefix, k), np.int32)
    seg = np.zeros((2, longest_prefix), np.int32)
    pos = np.zeros((2, longest_prefix), np.int32)
    fed = []
    for i, r in enumerate(rows):
        n_prompt = len(r) - (min(lengths) - prefix)
        tokens[i, longest_prefix - n_prompt:] = r[:n_prompt]
        seg[i, longest_prefix - n_prompt:] = 1
        pos[i, longest_prefix - n_prompt:] = np.arange(n_prompt)
        fed.append(n_prompt)
    cache = gen.new_cache()
    logits, cache = gen.forward(cache, {"tokens": tokens, "segment_ids": seg, "positions": pos})
    for step in range(min(lengths) - prefix):
        for i, r in enumerate(rows):
            v = gen.vocab.size
            np.testing.assert_allclose(np.asarray(logits[i])[:, :v], full[i][fed[i] - 1][:, :v],
                                       atol=1e-4, rtol=1e-4)
        new = np.stack([r[fed[i]] for i, r in enumerate(rows)])[:, None]
        logits, cache = gen.forward(cache, {
            "tokens": new, "segment_ids": np.ones((2, 1), np.int32),
            "positions": np.array([[f] for f in fed], np.int32)})
        fed = [f + 1 for f in fed]


def test_masks_follow_the_vocabulary(tiny_cfg):
    from ualm_jax.format.vocab import JointVocab

    vocab = JointVocab.from_model_config(tiny_cfg)
    k = vocab.num_codebooks
    modes = np.array([[S.CODES] * k, [S.TEXT, S.FORCED, S.FORCED, S.FORCED]], np.int32)
    forced = np.zeros((2, k), np.int32)
    forced[1, 1:] = [5, 6, 7]
    a = np.asarray(S.allowed_ids(jnp.asarray(modes), jnp.asarray(forced), vocab, vocab.padded_size))
    for j in range(k):
        ids = np.flatnonzero(a[0, j])
        start = vocab.codebook_start(j)
        expected = list(range(start + 1, start + 1 + vocab.codebook_size))
        if j == 0:
            expected = [start] + expected  # stream 0 may end the clip with its pad
        assert ids.tolist() == expected
    text = np.flatnonzero(a[1, 0])
    assert text.tolist() == [V.EOS, V.EOT] + list(range(vocab.text_offset, vocab.audio_offset))
    assert [np.flatnonzero(a[1, j]).tolist() for j in (1, 2, 3)] == [[5], [6], [7]]


def test_generation_respects_delay_pattern_and_is_repeatable(tiny_params, tiny_cfg):
    from ualm_jax.format.vocab import JointVocab

    vocab = JointVocab.from_model_config(tiny_cfg)
    k = vocab.num_codebooks
    prompt = np.zeros((6, k), np.int32)
    prompt[:, 0] = [V.BOS, V.USER, V.TEXT, 300, V.EOS, V.ASSISTANT]
    prompt_audio = np.concatenate([prompt, [[V.AUDIO] + [0] * (k - 1)]]).astype(np.int32)
    uncond = prompt_audio.copy()
    uncond[:5] = 0
    cfg = GenerationConfig(max_new=30, max_audio_frames=10, seed=3, cfg_scale=3.0)
    gen = Generator(tiny_cfg, tiny_params, batch_size=4, max_len=40)
    out1 = generate(gen, [prompt_audio, prompt_audio], cfg, start_phase="audio",
                    uncond_prompts=[uncond, uncond])
    out2 = generate(gen, [prompt_audio, prompt_audio], cfg, start_phase="audio",
                    uncond_prompts=[uncond, uncond])
    for segs1, segs2 in zip(out1, out2):
        rows = np.asarray(segs1[0].ids)
        assert np.array_equal(rows, np.asarray(segs2[0].ids))  # same seed, same audio
        assert segs1[0].modality == "audio"
        t_end = len(rows) - (k - 1)  # frames T when the clip was ended
        assert 1 <= t_end <= 10 + 1
        for j in range(k):
            col = rows[:, j]
            pad = vocab.codebook_pad(j)
            assert (col[:j] == pad).all()  # start ramp forced
            assert (col[t_end + j:] == pad).all()  # end ramp forced (stream 0: its end signal)
            inner = col[j:t_end + j]
            lo = vocab.codebook_start(j) + 1
            assert ((inner >= lo) & (inner < lo + vocab.codebook_size)).all()
        codes = audio_codes(segs1[0], vocab)
        assert codes.shape[1] == k and (codes >= 0).all() and (codes < vocab.codebook_size).all()
    # Another seed gives other audio.
    other = generate(gen, [prompt_audio, prompt_audio], GenerationConfig(
        max_new=30, max_audio_frames=10, seed=4, cfg_scale=3.0), start_phase="audio",
        uncond_prompts=[uncond, uncond])
    assert not all(np.array_equal(np.asarray(a[0].ids), np.asarray(b[0].ids)) for a, b in zip(out1, other))


def test_multi_segment_text_after_assistant(tiny_params, tiny_cfg):
    k = tiny_cfg.num_codebooks
    prompt = np.zeros((6, k), np.int32)
    prompt[:, 0] = [V.BOS, V.USER, V.TEXT, 300, V.EOS, V.ASSISTANT]
    gen = Generator(tiny_cfg, tiny_params, batch_size=1, max_len=48)
    segs = generate(gen, [prompt], GenerationConfig(max_new=40, max_audio_frames=6, seed=0))[0]
    assert segs and all(s.modality in ("text", "audio", "speech") for s in segs)


def test_cfg_mix_is_ualm_form():
    c = jnp.array([[[1.0, 2.0]]])
    u = jnp.array([[[0.0, 4.0]]])
    mixed = S.cfg_mix(jnp.concatenate([c, u, u, c]), 3.0)  # pairs [c0, u0, c1, u1]
    np.testing.assert_allclose(np.asarray(mixed), [[[3.0, -2.0]], [[-2.0, 8.0]]])  # 3c-2u, 3u-2c


# The on-device loop, per-row keys, sharded decoding -------------------------------------------
def _t2a_prompts(k, n):
    prompt = np.zeros((6, k), np.int32)
    prompt[:, 0] = [V.BOS, V.USER, V.TEXT, 300, V.EOS, V.ASSISTANT]
    cond, uncond = [], []
    for i in range(n):
        p = np.concatenate([prompt, [[V.AUDIO] + [0] * (k - 1)]]).astype(np.int32)
        p[3, 0] = 300 + i
        u = p.copy()
        u[:5] = 0
        cond.append(p)
        uncond.append(u)
    return cond, uncond


def _ids(out):
    return [[(s.modality, np.asarray(s.ids).tolist()) for s in segs] for segs in out]


def test_the_device_loop_writes_what_the_host_loop_writes(tiny_params, tiny_cfg):
    """One compiled while-loop (state machine, masks, guidance, sampling on device) against the
    host-driven reference loop: the same ids, with guidance, a cut clip and multi-segment text."""
    k = tiny_cfg.num_codebooks
    cond, uncond = _t2a_prompts(k, 3)
    cfg = GenerationConfig(max_new=24, max_audio_frames=6, seed=5, cfg_scale=2.0)
    gen = Generator(tiny_cfg, tiny_params, batch_size=6, max_len=40)
    a = generate(gen, cond, cfg, "audio", uncond_prompts=uncond)
    b = generate(gen, cond, cfg, "audio", uncond_prompts=uncond, on_device=False)
    assert _ids(a) == _ids(b) and all(len(segs[0].ids) >= 6 for segs in a)
    text = GenerationConfig(max_new=30, seed=1, text_temperature=0.7, top_k=0)
    one = Generator(tiny_cfg, tiny_params, batch_size=3, max_len=48)
    prompts = [c[:6] for c in cond]
    assert _ids(generate(one, prompts, text)) == _ids(generate(one, prompts, text, on_device=False))


def test_an_output_depends_on_its_prompt_uid_and_seed_not_its_batch(tiny_params, tiny_cfg):
    k = tiny_cfg.num_codebooks
    cond, uncond = _t2a_prompts(k, 3)
    cfg = GenerationConfig(max_new=20, max_audio_frames=8, seed=2, cfg_scale=1.5)
    three = generate(Generator(tiny_cfg, tiny_params, 6, 40), cond, cfg, "audio",
                     uncond_prompts=uncond, uids=[10, 11, 12])
    alone = generate(Generator(tiny_cfg, tiny_params, 2, 40), cond[2:], cfg, "audio",
                     uncond_prompts=uncond[2:], uids=[12])
    assert _ids(alone) == _ids(three[2:])


def test_sharded_decoding_equals_one_device(tiny_params, tiny_cfg):
    """Parameters sharded by the training rules, KV cache over batch and KV heads, guidance pairs
    on one shard: prefill logits and the generated clips equal the unsharded decoder's."""
    from ualm_jax.config import MeshConfig
    from ualm_jax.sharding import make_mesh, parse_mesh_arg

    k = tiny_cfg.num_codebooks
    cond, uncond = _t2a_prompts(k, 4)
    cfg = GenerationConfig(max_new=16, max_audio_frames=6, seed=3, cfg_scale=2.0)
    ref = Generator(tiny_cfg, tiny_params, 8, 40)
    want = _ids(generate(ref, cond, cfg, "audio", uncond_prompts=uncond))
    batch = {"tokens": np.stack(cond + uncond), "segment_ids": np.ones((8, 7), np.int32),
             "positions": np.tile(np.arange(7, dtype=np.int32), (8, 1))}
    want_logits = np.asarray(ref.forward(ref.new_cache(), batch)[0])
    for mesh_arg in ("fsdp=8", "tensor=2,fsdp=4", "data=2,fsdp=2,tensor=2"):
        mcfg = MeshConfig(ici=parse_mesh_arg(mesh_arg))
        gen = Generator(tiny_cfg, tiny_params, 8, 40, mesh=make_mesh(mcfg), rules=mcfg.rules)
        cache = gen.new_cache()
        kv = max(jax.tree.leaves(cache), key=lambda x: x.ndim)  # a layer stack's keys
        assert len(kv.sharding.device_set) == 8 and not kv.sharding.is_fully_replicated
        np.testing.assert_allclose(np.asarray(gen.forward(cache, batch)[0]), want_logits,
                                   atol=2e-5, rtol=2e-5)
        assert _ids(generate(gen, cond, cfg, "audio", uncond_prompts=uncond)) == want, mesh_arg
