"""Checkpoint interop: import a tiny random HF Qwen2, export to PyTorch/HF, inspect; numbers
checked against transformers and a PyTorch forward written from docs/ualm.md."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from ualm_jax.checkpoint import load_params  # noqa: E402
from ualm_jax.cli import main as cli  # noqa: E402
from ualm_jax.config import load_config  # noqa: E402
from ualm_jax.convert import export as export_mod  # noqa: E402
from ualm_jax.convert.export import export, verify  # noqa: E402
from ualm_jax.convert.hf_import import import_hf  # noqa: E402
from ualm_jax.convert.inspect_tree import inspect  # noqa: E402
from ualm_jax.model.loss import stream_logits  # noqa: E402
from ualm_jax.model.params import build_model  # noqa: E402
from ualm_jax.model.ualm import UALM  # noqa: E402
from ualm_jax.format.vocab import JointVocab  # noqa: E402
from ualm_jax.train.loop import train  # noqa: E402

TINY = ["model.preset=tiny", "model.dtype=float32"]


def make_hf(path, tied, vocab=300):
    torch.manual_seed(1 if tied else 2)
    cfg = transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6,
        max_position_embeddings=128, tie_word_embeddings=tied)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05 if p.ndim > 1 else 0.5)
    model.save_pretrained(path)
    return model


def text_batch(ids, vocab, k):
    tokens = np.zeros(ids.shape + (k,), np.int32)
    tokens[..., 0] = ids + vocab.text_offset
    b, l = ids.shape
    return {"tokens": tokens, "segment_ids": np.ones((b, l), np.int32),
            "positions": np.tile(np.arange(l, dtype=np.int32), (b, 1))}


@pytest.mark.parametrize("tied", [False, True])
def test_import_matches_transformers_and_exports_bit_exact(tmp_path, tied):
    hf = make_hf(tmp_path / "hf", tied)
    cfg = load_config(None, TINY)
    report = import_hf(tmp_path / "hf", tmp_path / "ckpt", cfg)
    assert report["tied_source"] == tied and report["unread_tensors"] == []

    # Imported model on text-only input == transformers' logits on the text rows.
    cfg = load_config(tmp_path / "ckpt" / "config.yaml")
    model = build_model(cfg.model)
    params = load_params(tmp_path / "ckpt")
    assert not cfg.model.tie_embeddings and "head" in params  # a tied source head is copied
    ids = np.random.default_rng(0).integers(0, 300, (2, 20))
    batch = text_batch(ids, model.vocab, cfg.model.num_codebooks)
    h, head, emb = model.apply({"params": params}, batch, method=UALM.hidden_and_output)
    logits = np.asarray(stream_logits(h, head, emb, model.vocab, 0))
    text = logits[..., model.vocab.text_offset:model.vocab.audio_offset]
    with torch.no_grad():
        expected = hf(torch.tensor(ids)).logits.numpy()
    assert np.abs(text - expected).max() < 1e-4

    # import-hf then export --format hf-text reproduces the source tensors bit for bit.
    out = tmp_path / "text"
    assert cli(["export", str(tmp_path / "ckpt"), "--format", "hf-text", "--out", str(out)]) == 0
    src, got = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert src.keys() == got.keys()
    for name in src:
        assert src[name].dtype == got[name].dtype and np.array_equal(src[name], got[name]), name
    assert verify(out)
    reloaded = transformers.Qwen2ForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.tie_word_embeddings == tied
    with torch.no_grad():
        assert torch.equal(reloaded(torch.tensor(ids)).logits, hf(torch.tensor(ids)).logits)


def _torch_ualm_logits(out_dir, batch):
    """docs/ualm.md in PyTorch: summed stream embeddings (id 0 -> zero), adapter outputs written into
    their slots, the Qwen2 body, and stream k reading (h + e_k) @ lm_head^T."""
    sd = {k: torch.from_numpy(v.copy()) for k, v in load_file(str(out_dir / "model.safetensors")).items()}
    ucfg = json.loads((out_dir / "ualm_config.json").read_text())
    body = transformers.Qwen2Model(transformers.Qwen2Config.from_pretrained(out_dir)).eval()
    body.load_state_dict({k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")})
    enc_cfg = ucfg["audio_encoder"]
    encoder = transformers.AudioFlamingo3Encoder(transformers.AudioFlamingo3EncoderConfig(
        num_mel_bins=enc_cfg["n_mels"], hidden_size=enc_cfg["d_model"],
        num_hidden_layers=enc_cfg["n_layers"], num_attention_heads=enc_cfg["n_heads"],
        intermediate_size=enc_cfg["d_ff"], max_source_positions=enc_cfg["max_mel_frames"] // 2)).eval()
    encoder.load_state_dict({k[len("audio_encoder."):]: v for k, v in sd.items()
                             if k.startswith("audio_encoder.")})
    table, head, streams = sd["model.embed_tokens.weight"], sd["lm_head.weight"], sd["stream_emb.weight"]
    tokens = torch.from_numpy(batch["tokens"]).long()
    with torch.no_grad():
        x = sum(table[tokens[..., k]] * (tokens[..., k] != 0)[..., None] for k in range(tokens.shape[-1]))
        feats = torch.from_numpy(batch["audio_features"])
        b, f, t, m = feats.shape
        mel = feats.reshape(b * f, t, m).transpose(1, 2)
        # The encoder is run on full windows (the max_mel_frames it was built for), then cut.
        full = torch.zeros(b * f, m, enc_cfg["max_mel_frames"])
        full[..., :t] = mel
        frames = encoder(full, input_features_mask=torch.ones(b * f, enc_cfg["max_mel_frames"],
                                                               dtype=torch.long)).last_hidden_state
        frames = frames[:, : t // 2 // enc_cfg["pool"]]
        adapted = frames @ sd["adaptor.audio.weight"].T + sd["adaptor.audio.bias"]
        adapted = adapted.reshape(b, -1, adapted.shape[-1])
        slots = torch.from_numpy(batch["audio_slots"]).long()
        for r in range(b):
            pos = (slots[r] >= 0).nonzero()[:, 0]
            x[r, pos] = adapted[r, slots[r, pos]]
        h = body(inputs_embeds=x).last_hidden_state
        return np.stack([((h + streams[k]) @ head.T).numpy() for k in range(streams.shape[0])])


def test_trained_model_exports_to_pytorch(tmp_path):
    over = TINY + ["train.steps=2", "train.batch_size=8", "train.seq_len=64", "train.eval_batches=0",
                   "train.tensorboard=false", "mesh.ici.fsdp=8", "train.log_every=1"]
    # max_mel_frames equal to the synthetic windows so the PyTorch encoder sees the same length.
    cfg = load_config(None, over + ["model.audio_encoder.max_mel_frames=32"])
    train(cfg, tmp_path / "run")
    out = tmp_path / "pt"
    assert cli(["export", str(tmp_path / "run"), "--format", "pytorch", "--out", str(out),
                "--torch-bin"]) == 0
    assert verify(out)
    sd = load_file(str(out / "model.safetensors"))
    vocab = JointVocab.from_model_config(cfg.model)
    assert sd["model.embed_tokens.weight"].shape == (vocab.size, 64)  # sharding padding removed
    assert sd["lm_head.weight"].shape == (vocab.size, 64)
    assert sd["stream_emb.weight"].shape == (4, 64) and not sd["stream_emb.weight"][0].any()
    assert sd["adaptor.audio.weight"].shape == (64, 32)
    bin_sd = torch.load(out / "pytorch_model.bin")
    assert torch.equal(bin_sd["lm_head.weight"], torch.from_numpy(sd["lm_head.weight"]))
    ucfg = json.loads((out / "ualm_config.json").read_text())
    assert ucfg["vocab"]["size"] == vocab.size and ucfg["num_codebooks"] == 4

    # Same per-stream logits as the JAX model, one segment per row, with audio slots.
    from data_pipelines.synthetic import stream_for_model

    batch = next(stream_for_model(cfg.model, 2, 64, seed=5))
    batch["segment_ids"] = np.ones_like(batch["segment_ids"])
    batch["positions"] = np.tile(np.arange(64, dtype=np.int32), (2, 1))
    batch.pop("task_ids")
    assert (batch["audio_slots"] >= 0).any()
    params = load_params(tmp_path / "run")
    model = build_model(cfg.model)
    h, head, emb = model.apply({"params": params}, batch, method=UALM.hidden_and_output)
    ours = np.stack([np.asarray(stream_logits(h, head, emb, vocab, k))[..., :vocab.size]
                     for k in range(4)])
    theirs = _torch_ualm_logits(out, batch)
    assert np.abs(ours - theirs).max() < 1e-4


def test_inspect_all_three_kinds(tmp_path, capsys):
    make_hf(tmp_path / "hf", False)
    import_hf(tmp_path / "hf", tmp_path / "ckpt", load_config(None, TINY))
    export(tmp_path / "ckpt", tmp_path / "pt")
    orbax = inspect(tmp_path / "ckpt")
    names = {r[0]: r for r in orbax["rows"]}
    assert names["params/decoder/layers/self_attn/q_proj/kernel"][1] == (2, 64, 4, 16)
    assert "orbax checkpoint" in orbax["title"]
    hf = inspect(tmp_path / "hf")
    assert ("model.norm.weight", (64,), "float32", "model.safetensors") in hf["rows"]
    assert "exported UALM" in inspect(tmp_path / "pt")["title"]
    assert cli(["inspect", str(tmp_path / "pt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["total"] > 0


def test_bad_inputs_name_the_problem(tmp_path, capsys):
    make_hf(tmp_path / "hf", False)
    cfg = lambda: load_config(None, TINY)
    # A config that disagrees with the tensors.
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    bad = tmp_path / "bad_cfg"
    bad.mkdir()
    os.link(tmp_path / "hf" / "model.safetensors", bad / "model.safetensors")
    (bad / "config.json").write_text(json.dumps(dict(conf, intermediate_size=96)))
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate_proj.weight has shape \(128, 64\), expected \(96, 64\)"):
        import_hf(bad, tmp_path / "o1", cfg())
    # Unknown architecture.
    (bad / "config.json").write_text(json.dumps(dict(conf, model_type="llama", architectures=["LlamaForCausalLM"])))
    with pytest.raises(ValueError, match="unknown architecture"):
        import_hf(bad, tmp_path / "o2", cfg())
    # Missing shard of an index.
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text(json.dumps(conf))
    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    names = sorted(sd)
    save_file({n: sd[n] for n in names[:10]}, str(sharded / "model-00001-of-00002.safetensors"))
    index = {"weight_map": {n: ("model-00001-of-00002.safetensors" if i < 10 else "model-00002-of-00002.safetensors")
                            for i, n in enumerate(names)}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert cli(["import-hf", str(sharded), "--out", str(tmp_path / "o3")] + TINY) == 2
    assert "missing shard" in capsys.readouterr().err and "model-00002-of-00002" in str(index)
    # With both shards present the sharded checkpoint imports like the single file.
    save_file({n: sd[n] for n in names[10:]}, str(sharded / "model-00002-of-00002.safetensors"))
    assert import_hf(sharded, tmp_path / "o4", cfg())["tensors"] == len(names)
    # A dtype surprise.
    ints = tmp_path / "ints"
    ints.mkdir()
    (ints / "config.json").write_text(json.dumps(conf))
    save_file(dict(sd, **{"model.norm.weight": sd["model.norm.weight"].astype(np.int32)}),
              str(ints / "model.safetensors"))
    with pytest.raises(ValueError, match=r"tensor model.norm.weight .* has dtype int32"):
        import_hf(ints, tmp_path / "o5", cfg())


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    make_hf(tmp_path / "hf", False)
    import_hf(tmp_path / "hf", tmp_path / "ckpt", load_config(None, TINY))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.numpy.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        export(tmp_path / "ckpt", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]


def test_load_params_from_a_relative_path(tmp_path, monkeypatch):
    """`ualm generate --checkpoint runs/demo`: a relative run directory reads the same tensors."""
    import jax

    from ualm_jax.checkpoint import save_params

    params = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": {"c": np.ones(4, np.float32)}}
    save_params(tmp_path / "run" / "checkpoints", jax.tree.map(jax.numpy.asarray, params))
    monkeypatch.chdir(tmp_path)
    got = load_params("run")
    assert np.array_equal(got["a"], params["a"]) and np.array_equal(got["b"]["c"], params["b"]["c"])
