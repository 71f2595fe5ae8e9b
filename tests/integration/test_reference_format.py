"""The authors' UALM checkpoint format: `ualm export --format ualm-reference` and
`ualm import-reference`, checked against an independent PyTorch forward written here from the
reference's description (NVIDIA/audio-intelligence, UALM/models/ualm/lm/parallel.py):
  * the input embedding is a plain lookup summed over the K streams (row 0 is zero, padding_idx=0;
    nothing is masked); encoder frames through the linear adapter overwrite their positions;
  * the HF Qwen2 body; stream k's hidden state is h + stream_emb[k] with stream 0 forced to h;
  * one head; loss: stream 0 CE over the joint vocab (target 0 ignored), streams 1..K-1 CE over
    the loss interval holding the target, times the loss mask, / count of stream-0 weights != 0.
The state dict is loaded strictly into a module tree named as the reference's ParallelLLM."""
import json
import os
import stat

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ualm_jax.checkpoint import load_params, save_params  # noqa: E402
from ualm_jax.config import load_config  # noqa: E402
from ualm_jax.convert.export import export, verify  # noqa: E402
from ualm_jax.convert.reference import CODEC, ENCODER, MODEL_FILE, import_reference  # noqa: E402
from ualm_jax.model.loss import loss_sums, stream_logits  # noqa: E402
from ualm_jax.model.params import build_model, init_params  # noqa: E402
from ualm_jax.model.ualm import UALM  # noqa: E402
from ualm_jax.format.vocab import JointVocab  # noqa: E402

TINY = ["model.preset=tiny", "model.dtype=float32"]


# Fixtures -----------------------------------------------------------------------------------------
def make_run(path, overrides=(), seed=0):
    """A run directory holding random params scaled up so logits are O(1): row 0 of the input
    table stays zero (as the model initialises it), stream_emb row 0 is NOT zero (the reference
    never reads it; the export must keep it as stored)."""
    cfg = load_config(None, TINY + list(overrides))
    params = jax.tree.map(np.array, init_params(build_model(cfg.model), jax.random.key(seed)))
    rng = np.random.default_rng(seed)
    for name in ("embed", "head", "stream_emb"):
        params[name] = params[name] * 25.0
    params["stream_emb"][0] = rng.normal(0, 0.5, params["stream_emb"].shape[1])
    assert not params["embed"][0].any()
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(cfg.to_yaml())
    save_params(path / "checkpoints", params)
    return cfg, params


# The reference's module tree and forward, written from its description --------------------------
class _Holder(torch.nn.Module):
    def __init__(self, **modules):
        super().__init__()
        for k, v in modules.items():
            setattr(self, k, v)


def reference_module(out_dir, k, codec_dir=None):
    """ParallelLLM's names: a Qwen2ForCausalLM whose tables are replaced (padding_idx=0 input
    table, bias-free head over the joint vocab), stream_emb, multimodal_io_dict (text IO without
    weights, DiscreteAudioIO.codec_model, ContinuousAudioIO.model = AFWhisperEncoder) and
    adaptor.continuous_audio. Loaded strictly from the export."""
    qcfg = transformers.Qwen2Config.from_pretrained(out_dir / "text_base")
    lm = transformers.Qwen2ForCausalLM(qcfg).eval()
    sd = torch.load(out_dir / MODEL_FILE, map_location="cpu", weights_only=True)["module"]
    v, d = sd["model.embed_tokens.weight"].shape
    lm.model.embed_tokens = torch.nn.Embedding(v, d, padding_idx=0)
    lm.lm_head = torch.nn.Linear(d, v, bias=False)
    lm.stream_emb = torch.nn.Embedding(k, d)
    enc_cfg = transformers.Qwen2AudioEncoderConfig.from_pretrained(out_dir / "audio_encoder")
    enc_cfg._attn_implementation = "eager"
    io = {"text": _Holder(), "continuous_audio": _Holder(model=transformers.Qwen2AudioEncoder(enc_cfg))}
    if codec_dir:
        io["discrete_audio"] = _Holder(codec_model=transformers.XcodecModel.from_pretrained(codec_dir))
    else:
        io["discrete_audio"] = _Holder()
    lm.multimodal_io_dict = torch.nn.ModuleDict(io)
    lm.adaptor = torch.nn.ModuleDict({"continuous_audio": torch.nn.Linear(enc_cfg.d_model, d)})
    lm.load_state_dict(sd, strict=True)
    return lm.eval(), sd


def reference_intervals(vocab_intervals, max_loss_interval):
    """The reference's loop over the discrete audio stream intervals, verbatim in behaviour."""
    out = []
    cur, end = vocab_intervals[0]
    for _, end in vocab_intervals[1:]:
        if end - cur <= max_loss_interval:
            continue
        out.append((cur, end))
        cur = end
    if end > cur:
        out.append((cur, end))
    return out


def reference_forward(lm, batch, max_loss_interval, vocab):
    """-> (logits [K, B, L, V] numpy, loss) as the reference computes them on a packed batch
    (positions restart per segment; flash-attention's varlen packing = each segment alone)."""
    tokens = torch.from_numpy(batch["tokens"]).long()
    b, l, k = tokens.shape
    enc = lm.multimodal_io_dict["continuous_audio"].model
    with torch.no_grad():
        x = lm.model.embed_tokens(tokens).sum(dim=2)  # no masking: row 0 is zero
        feats = torch.from_numpy(batch["audio_features"])
        f, t_mel = feats.shape[1], feats.shape[2]
        mel = feats.reshape(b * f, t_mel, -1).transpose(1, 2)
        # The reference's encoder mask: output length n -> input mel 4n-1 -> conv lengths.
        n_mel = torch.from_numpy(batch["audio_mel_mask"].reshape(b * f, t_mel).sum(-1))
        after = ((n_mel - 1) // 2 + 1 - 2) // 2 + 1
        feat_len = ((after * 4 - 1) - 1) // 2 + 1
        seq = (t_mel - 2) // 2 + 1
        pad = torch.arange(seq)[None, :] >= feat_len[:, None]
        mask = torch.zeros(b * f, 1, seq, seq)
        mask.masked_fill_(pad[:, None, None, :], float("-inf"))
        frames = enc(mel, attention_mask=mask).last_hidden_state
        adapted = lm.adaptor["continuous_audio"](frames).reshape(b, -1, x.shape[-1])
        slots = torch.from_numpy(batch["audio_slots"]).long()
        for r in range(b):
            pos = (slots[r] >= 0).nonzero()[:, 0]
            x[r, pos] = adapted[r, slots[r, pos]]
        seg = batch["segment_ids"]
        h = torch.zeros_like(x)
        for r in range(b):
            for s in np.unique(seg[r][seg[r] > 0]):
                idx = torch.from_numpy(np.nonzero(seg[r] == s)[0])
                pos = torch.arange(len(idx))[None]
                h[r, idx] = lm.model(inputs_embeds=x[r, idx][None], position_ids=pos).last_hidden_state[0]
        se = lm.stream_emb.weight.clone()
        se[0] = 0.0  # stream 0 reads the bare hidden state
        hs = h[:, :, None, :] + se[None, None]
        logits = hs @ lm.lm_head.weight.T  # [B, L, K, V]

        # Loss.
        w = torch.from_numpy(batch["loss_weights"])
        hs, tgt, w = hs[:, :-1], tokens[:, 1:], w[:, 1:]
        loss = torch.zeros_like(w)
        loss[..., 0] = torch.nn.functional.cross_entropy(
            (hs[..., 0, :] @ lm.lm_head.weight.T).reshape(-1, logits.shape[-1]), tgt[..., 0].reshape(-1),
            reduction="none", ignore_index=0).reshape(b, l - 1)
        res = tgt[..., 1:]
        audio = [(vocab.codebook_start(j), vocab.codebook_start(j) + vocab.codebook_stride)
                 for j in range(vocab.num_codebooks)]
        for lo, hi in reference_intervals(audio, max_loss_interval):
            inside = (res >= lo) & (res < hi)
            if not inside.any():
                continue
            z = hs[..., 1:, :][inside] @ lm.lm_head.weight[lo:hi].T
            part = loss[..., 1:].clone()
            part[inside] = torch.nn.functional.cross_entropy(z, res[inside] - lo, reduction="none")
            loss[..., 1:] = part
        total = (loss * w).sum() / (w[..., 0] != 0).float().sum()
    return logits.permute(2, 0, 1, 3).numpy(), float(total)


# A packed batch through the training template and packer ----------------------------------------
def packed_batch(cfg, seed=0):
    """Two rows, several examples each (captioning with encoder audio, text-to-audio codes, text
    QA), rendered with the reference's header supervision and packed by the trainer's packer."""
    from data_pipelines.packing import BatchBuilder
    from data_pipelines.render import Rendered
    from ualm_jax.format.layout import AudioLayout
    from ualm_jax.format.template import Segment, render

    m = cfg.model
    vocab = JointVocab.from_model_config(m)
    enc = m.audio_encoder
    layout = AudioLayout.of_model(m, 3)
    rng = np.random.default_rng(seed)
    k = m.num_codebooks

    def words(n):
        return list(rng.integers(0, m.text_vocab_size, n))

    def example(kind):
        if kind == "caption":
            n_mel = int(rng.choice([16, 32, 48, 64]))  # ceil(n/2) even: both masks agree
            nf = layout.window_frames(n_mel)
            segs = [Segment("user", "text", words(4)), Segment("user", "audio", nf),
                    Segment("assistant", "text", words(5))]
            ex = render(segs, vocab, supervise_headers=True)
            mel = rng.normal(0, 1, (n_mel, enc.n_mels)).astype(np.float32)
            (pos, _), = ex.audio_input_frames
            return Rendered(0, ex.tokens, ex.loss_weights, [(pos, nf, mel)])
        if kind == "t2a":
            codes = rng.integers(0, m.codebook_size, (int(rng.integers(3, 7)), k))
            segs = [Segment("user", "text", words(3)), Segment("assistant", "audio", codes)]
        else:
            segs = [Segment("user", "text", words(3)), Segment("assistant", "text", words(4)),
                    Segment("assistant", "audio", rng.integers(0, m.codebook_size, (3, k)))]
        ex = render(segs, vocab, supervise_headers=True)
        return Rendered(0, ex.tokens, ex.loss_weights)

    builder = BatchBuilder(2, 128, k, layout)
    placed = [builder.place(example(kind)) for kind in
              ["caption", "t2a", "text", "caption", "t2a", "caption", "text", "t2a", "text"]]
    assert sum(placed) >= 6
    batch = builder.finish()
    batch.pop("task_ids")
    assert (batch["audio_slots"] >= 0).any() and batch["segment_ids"].max() >= 3
    return batch


def our_forward(cfg, params, batch):
    m = cfg.model
    vocab = JointVocab.from_model_config(m)
    model = build_model(m)
    h, head, emb = model.apply({"params": params}, batch, method=UALM.hidden_and_output)
    logits = np.stack([np.asarray(stream_logits(h, head, emb, vocab, s))[..., :vocab.size]
                       for s in range(m.num_codebooks)])
    sums = loss_sums(h, head, emb, batch, vocab, m.loss_objective, 0, 0, m.max_loss_interval)
    return logits, float(sums.total / sums.count)


# Tests --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["spectral", "xcodec", "split_intervals"])
def test_reference_forward_matches_ours(tmp_path, variant, tiny_xcodec_dir):
    over = []
    if variant == "xcodec":  # the codec's own C and K
        over = ["model.codebook_size=1024", f"data.codec={tiny_xcodec_dir}"]
    if variant == "split_intervals":  # 4 codebooks of 33 ids, at most 70 -> intervals of 3 + 1
        over = ["model.max_loss_interval=70"]
    cfg, params = make_run(tmp_path / "run", over)
    out = tmp_path / "ref"
    assert export(tmp_path / "run", out, "ualm-reference") == out and verify(out)
    k = cfg.model.num_codebooks
    lm, sd = reference_module(out, k, tiny_xcodec_dir if variant == "xcodec" else None)
    codec_names = [n for n in sd if n.startswith(CODEC)]
    if variant == "xcodec":
        expected = transformers.XcodecModel.from_pretrained(tiny_xcodec_dir).state_dict()
        assert sorted(codec_names) == sorted(CODEC + n for n in expected)
        assert all(torch.equal(sd[CODEC + n], t) for n, t in expected.items())
        assert "multimodal_io_dict.discrete_audio.codec_model.quantizer.quantizers.0.codebook.embed" in sd
        assert "X-codec weights" in (out / "README.md").read_text()
        assert os.path.isfile(out / "codec" / "config.json")
    else:
        assert codec_names == [] and "NO codec weights" in (out / "README.md").read_text()
    train_yaml = __import__("yaml").safe_load((out / "train.yaml").read_text())
    assert train_yaml["model"]["model_hf_tag"] == str((out / "text_base").absolute())
    io = train_yaml["multimodal_io"]
    assert io["discrete_audio"]["codec_choice"] == ("Xcodec" if variant == "xcodec" else None)
    assert io["discrete_audio"]["stream_weights"] == [1 / k] * k
    assert train_yaml["model"]["model_conf"]["max_loss_interval"] == cfg.model.max_loss_interval

    batch = packed_batch(cfg)
    ours, our_loss = our_forward(cfg, params, batch)
    theirs, their_loss = reference_forward(lm, batch, cfg.model.max_loss_interval,
                                           JointVocab.from_model_config(cfg.model))
    valid = batch["segment_ids"] > 0
    assert np.abs(ours).max() > 0.5  # O(1) logits: the tolerance below means something
    for s in range(k):
        assert np.abs(ours[s][valid] - theirs[s][valid]).max() < 1e-4, s
    assert abs(our_loss - their_loss) < 1e-5, (our_loss, their_loss)
    if variant == "split_intervals":
        assert len(JointVocab.from_model_config(cfg.model).audio_loss_intervals(70)) == 2


def test_round_trip_bit_exact(tmp_path):
    """export -> import-reference -> export: every tensor bit for bit, fp32 and bf16, from a file,
    a DeepSpeed global_stepN/ folder and a DeepSpeed save folder with `latest`."""
    from ualm_jax.cli import main as cli

    cfg, _ = make_run(tmp_path / "run")
    a = tmp_path / "a"
    assert cli(["export", str(tmp_path / "run"), "--format", "ualm-reference", "--out", str(a)]) == 0
    assert cli(["import-reference", str(a / MODEL_FILE), "--config",
                str(tmp_path / "run" / "config.yaml"), "--out", str(tmp_path / "imp")]) == 0
    rep = json.loads((tmp_path / "imp" / "import_report.json").read_text())
    assert rep["imported"] == rep["tensors"] and (tmp_path / "imp" / "config.yaml").is_file()
    export(tmp_path / "imp", tmp_path / "b", "ualm-reference")
    sa = torch.load(a / MODEL_FILE, weights_only=True)["module"]
    sb = torch.load(tmp_path / "b" / MODEL_FILE, weights_only=True)["module"]
    assert sa.keys() == sb.keys()
    for n in sa:
        assert sa[n].dtype == sb[n].dtype and torch.equal(sa[n], sb[n]), n
    assert sa["stream_emb.weight"][0].abs().sum() > 0  # kept as stored

    # A bf16 DeepSpeed checkpoint (as the reference trains) with extra DeepSpeed keys.
    ds = tmp_path / "ds"
    (ds / "global_step7").mkdir(parents=True)
    bf = {n: t.to(torch.bfloat16) for n, t in sa.items()}
    torch.save({"module": bf, "buffer_names": [], "global_steps": 7}, ds / "global_step7" / MODEL_FILE)
    (ds / "latest").write_text("global_step7")
    for src, name in ((ds / "global_step7", "i1"), (ds, "i2")):
        import_reference(src, tmp_path / name, load_config(tmp_path / "run" / "config.yaml"))
        export(tmp_path / name, tmp_path / (name + "x"), "ualm-reference", dtype="bfloat16")
        got = torch.load(tmp_path / (name + "x") / MODEL_FILE, weights_only=True)["module"]
        for n in bf:
            assert got[n].dtype == torch.bfloat16 and torch.equal(got[n], bf[n]), n

    # Our --format pytorch export imports too (names translated), to the same params (it writes
    # stream_emb row 0 as the zero the model uses).
    export(tmp_path / "run", tmp_path / "pt", "pytorch")
    import_reference(tmp_path / "pt", tmp_path / "i3", load_config(tmp_path / "run" / "config.yaml"))
    p1, p3 = load_params(tmp_path / "imp"), load_params(tmp_path / "i3")
    assert not p3["stream_emb"][0].any()
    p1["stream_emb"][0] = 0.0
    for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p3)):
        assert np.array_equal(x, y)


def test_import_checks(tmp_path):
    cfg, _ = make_run(tmp_path / "run")
    export(tmp_path / "run", tmp_path / "a", "ualm-reference")
    sd = torch.load(tmp_path / "a" / MODEL_FILE, weights_only=True)["module"]
    conf = lambda *o: load_config(tmp_path / "run" / "config.yaml", list(o))  # noqa: E731
    bad = dict(sd)
    bad["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"].clone()
    bad["model.embed_tokens.weight"][0] = 1.0
    torch.save({"module": bad}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="row 0 .* is not zero"):
        import_reference(tmp_path / "bad.pt", tmp_path / "o1", conf())
    with pytest.raises(ValueError, match=r"model.embed_tokens.weight has shape .* expected"):
        import_reference(tmp_path / "a", tmp_path / "o2", conf("model.codebook_size=16"))
    torch.save({"module": dict(sd, extra=torch.zeros(2))}, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match="no place for.*extra"):
        import_reference(tmp_path / "extra.pt", tmp_path / "o3", conf())
    torch.save(sd, tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="no 'module' entry"):
        import_reference(tmp_path / "bare.pt", tmp_path / "o4", conf())

    # import-hf refuses UALM checkpoints and names the right importer.
    from ualm_jax.convert.hf_import import import_hf

    export(tmp_path / "run", tmp_path / "pt", "pytorch")
    for src in (tmp_path / "pt", tmp_path / "a"):
        with pytest.raises(ValueError, match="ualm import-reference"):
            import_hf(src, tmp_path / "o5", conf())


def test_row0_frozen_bit_identical_through_training(tmp_path):
    """Row 0 of the input table is never updated: started NONZERO (an old checkpoint) it stays
    bit-identical through AdamW steps with weight decay, while other rows move."""
    from ualm_jax.train.loop import train

    cfg, params = make_run(tmp_path / "init")
    params["embed"][0] = np.random.default_rng(3).normal(0, 1, params["embed"].shape[1])
    save_params(tmp_path / "init2" / "checkpoints", params)
    (tmp_path / "init2" / "config.yaml").write_text(cfg.to_yaml())
    over = TINY + ["train.steps=2", "train.batch_size=8", "train.seq_len=64", "train.eval_batches=0",
                   "train.tensorboard=false", "mesh.ici.fsdp=8", "train.log_every=1",
                   "optim.weight_decay=0.5", "optim.learning_rate=1e-2", "optim.warmup_steps=1",
                   f"train.init_from={tmp_path / 'init2'}"]
    train(load_config(None, over), tmp_path / "run")
    after = load_params(tmp_path / "run")
    assert np.array_equal(after["embed"][0], params["embed"][0])
    assert not np.array_equal(after["embed"][1:], params["embed"][1:])
    # A fresh model starts with row 0 = 0 in both tables.
    fresh = init_params(build_model(cfg.model), jax.random.key(5))
    assert not np.asarray(fresh["embed"][0]).any() and not np.asarray(fresh["head"][0]).any()


def test_header_weights_and_intervals_match_numpy():
    """Header supervision and stream weights as the reference's preprocessing builds its loss
    mask; loss intervals as its loop builds them."""
    from ualm_jax.format.template import Segment, render
    from ualm_jax.format import vocab as V

    vocab = JointVocab(text_vocab_size=512, num_codebooks=4, codebook_size=32)
    k = 4
    segs = [Segment("system", "text", [3, 4]), Segment("user", "text", [5, 6]),
            Segment("user", "audio", 3), Segment("assistant", "text", [7, 8]),
            Segment("assistant", "audio", np.ones((2, k), int)), Segment("user", "text", [9]),
            Segment("assistant", "text", [10])]
    sw = [0.4, 0.3, 0.2, 0.1]
    ex = render(segs, vocab, supervise_headers=True, stream_weights=sw)

    # The reference: <bos> 0; per message: role, modality and closer carry special_mask(apply_loss)
    # (stream 0 only), content carries the IO's mask (text 1, audio stream_weights, encoder 0)
    # times apply_loss (assistant).
    rows = [np.zeros(k)]
    for s in segs:
        a = float(s.role == "assistant")
        sm = np.eye(k)[0] * a
        rows += [sm, sm]
        if s.modality == "text":
            rows += [np.eye(k)[0] * a] * len(s.content)
        elif s.is_encoder_input:
            rows += [np.zeros(k)] * s.content
        else:
            rows += [np.asarray(sw) * a] * (len(s.content) + k - 1)
        rows.append(sm)
    np.testing.assert_allclose(ex.loss_weights, np.stack(rows).astype(np.float32))
    heads = np.nonzero(ex.tokens[:, 0] == V.ASSISTANT)[0]
    assert len(heads) == 3 and (ex.loss_weights[heads, 0] == 1).all()
    assert (ex.loss_weights[heads + 1, 0] == 1).all() and not ex.loss_weights[heads, 1:].any()
    # Off (ours before / the other option) the headers are forced: weight 0.
    assert not render(segs, vocab).loss_weights[heads].any()

    for kk, c, limit in ((8, 1024, 13192), (8, 2048, 13192), (4, 32, 70), (4, 32, 33), (1, 10, 5)):
        vb = JointVocab(text_vocab_size=100, num_codebooks=kk, codebook_size=c)
        iv = [(vb.codebook_start(j), vb.codebook_start(j) + vb.codebook_stride) for j in range(kk)]
        assert vb.audio_loss_intervals(limit) == reference_intervals(iv, limit), (kk, c, limit)
    big = JointVocab(text_vocab_size=100, num_codebooks=8, codebook_size=1024)
    assert big.audio_loss_intervals(13192) == [(big.audio_offset, big.size)]
    huge = JointVocab(text_vocab_size=100, num_codebooks=8, codebook_size=2048)
    assert len(huge.audio_loss_intervals(13192)) == 2


def test_exports_readable_with_cards_and_tokenizer(tmp_path):
    from data_pipelines.tokenizer import TextTokenizer, train_tiny_bpe

    tok = train_tiny_bpe(["a dog barks", "birds sing in the rain", "the sea"] * 20, 300,
                         str(tmp_path / "tok"))
    make_run(tmp_path / "run", [f"data.tokenizer={tok}", "model.text_vocab_size=512"])
    for fmt in ("pytorch", "hf-text", "ualm-reference"):
        out = tmp_path / fmt
        export(tmp_path / "run", out, fmt)
        card = (out / "README.md").read_text()
        assert card.startswith(f"# UALM export ({fmt})") and "Loading" in card
        for dirpath, _, files in os.walk(out):
            assert stat.S_IMODE(os.stat(dirpath).st_mode) == 0o755, dirpath
            for f in files:
                assert stat.S_IMODE(os.stat(os.path.join(dirpath, f)).st_mode) == 0o644, f
    for text_dir in (tmp_path / "hf-text", tmp_path / "ualm-reference" / "text_base"):
        auto = transformers.AutoTokenizer.from_pretrained(text_dir)
        ids = auto.encode("a dog sings in the rain", add_special_tokens=False)
        assert ids == TextTokenizer(tok).encode("a dog sings in the rain")
    assert "codebook 3" in (tmp_path / "ualm-reference" / "README.md").read_text()


def test_inference_encoder_input_is_trainings(tmp_path):
    """Inference packs encoder windows like the trainer's packer: same features, same mel mask."""
    from data_pipelines.packing import BatchBuilder
    from data_pipelines.render import Renderer
    from ualm_jax.format.layout import AudioLayout
    from ualm_jax.format.records import to_record
    from ualm_jax.format.template import Segment
    from ualm_jax.infer.tasks import Loaded, audio_windows, reply_inputs

    cfg = load_config(None, TINY)
    enc = cfg.model.audio_encoder
    m = Loaded(cfg, {}, JointVocab.from_model_config(cfg.model), None, None)
    wave = np.random.default_rng(0).normal(0, 0.1, 84 * 160).astype(np.float32)  # 64 + 20 frames
    prompts, slots, feats, mask = reply_inputs(m, [""], [wave])
    windows = audio_windows(m, wave)
    assert [len(w) for w in windows] == [64, 20]
    mel = np.concatenate(windows).astype(np.float16)  # as a builder stores it
    rec = to_record("caption", [Segment("user", "audio", len(mel))], [mel],
                    num_codebooks=cfg.model.num_codebooks, n_mels=enc.n_mels)
    layout = AudioLayout.of_model(cfg.model, 2)
    row = Renderer(m.vocab, layout)(0, rec)
    b = BatchBuilder(1, len(prompts[0]), cfg.model.num_codebooks, layout)
    b.place(row)
    got = b.finish()
    np.testing.assert_array_equal(prompts[0][:len(row)], row.tokens)
    np.testing.assert_array_equal(slots, got["audio_slots"])
    np.testing.assert_array_equal(feats, got["audio_features"])
    np.testing.assert_array_equal(mask, got["audio_mel_mask"])
    assert not mask[0, 1, 20:].any()
