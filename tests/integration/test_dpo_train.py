"""`ualm train` with train.objective=dpo on built preference pairs (online and offline reference)."""
import json

import jax
import numpy as np
import pytest
import soundfile as sf

from ualm_jax.checkpoint import save_params
from ualm_jax.config import ConfigError, load_config
from ualm_jax.model.params import build_model, init_params
from ualm_jax.train.loop import train


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from data_pipelines.build import build
    from data_pipelines.codecs.spectral import SpectralCodec
    from data_pipelines.tokenizer import TextTokenizer, train_tiny_bpe

    root = tmp_path_factory.mktemp("pairs")
    sr = 16000
    t = np.arange(sr // 4) / sr
    for i, f in enumerate((220, 440, 880, 1760)):
        sf.write(root / f"{i}.wav", (0.4 * np.sin(2 * np.pi * f * t)).astype(np.float32), sr)
    tok = train_tiny_bpe(["a low tone", "a high tone", "a mid tone"] * 20, 280, str(root / "tok"))
    codec = SpectralCodec.fit([sf.read(root / f"{i}.wav")[0] for i in range(4)], sr, K=4, C=32)
    codec.save(str(root / "codec"))
    lines = [{"prompt": "a low tone", "chosen": "0.wav", "rejected": "3.wav", "ref_logp_chosen": -90.0,
              "ref_logp_rejected": -95.0},
             {"prompt": "a high tone", "chosen": "3.wav", "rejected": "0.wav", "ref_logp_chosen": -92.0,
              "ref_logp_rejected": -91.0},
             {"prompt": "a mid tone", "chosen": "1.wav", "rejected": "2.wav", "ref_logp_chosen": -80.0,
              "ref_logp_rejected": -85.0}]
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    build("preference", str(root / "pairs.jsonl"), str(root / "built"), codec=str(root / "codec"),
          tokenizer=tok)
    vocab_size = TextTokenizer(tok).vocab_size
    base = ["model.preset=tiny", f"model.text_vocab_size={vocab_size}", "train.mode=dpo",
            "data.source=preference", f"data.preference_path={root / 'built'}", "train.steps=3",
            "train.batch_size=4", "train.seq_len=256", "train.log_every=1", "train.tensorboard=false",
            "train.checkpoint_every=0", "mesh.ici.fsdp=8", "optim.warmup_steps=0"]
    init = root / "init"
    init.mkdir()
    cfg = load_config(None, base[:2])
    (init / "config.yaml").write_text(cfg.to_yaml())
    save_params(init / "checkpoints", init_params(build_model(cfg.model), jax.random.key(0)))
    return root, base, init


@pytest.mark.parametrize("reference", ["online", "offline"])
def test_dpo_training_runs_and_logs(pairs, tmp_path, reference):
    root, base, init = pairs
    over = base + [f"dpo.reference={reference}"]
    if reference == "online":
        over.append(f"train.init_from={init}")
    out = train(load_config(None, over), tmp_path / "run")
    assert out["step"] == 3 and out["skipped_steps"] == 0
    from ualm_jax.cli import results_table

    table = results_table(out)  # the DPO table: first and last logged windows
    assert table.startswith("DPO results after 3 steps") and "reward_accuracy" in table
    recs = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    for key in ("loss", "dpo_loss", "chosen_ce", "reward_margin", "reward_accuracy", "grad_norm"):
        assert all(key in r and np.isfinite(r[key]) for r in recs), key
    if reference == "online":  # starts at the reference: margin 0, dpo loss log 2
        assert recs[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)
        assert recs[0]["dpo_loss"] == pytest.approx(np.log(2.0), rel=1e-5)


def test_dpo_config_errors(pairs):
    _, base, _ = pairs
    with pytest.raises(ConfigError, match="dpo.reference=online freezes the starting model"):
        load_config(None, base)
    with pytest.raises(ConfigError, match="data.source=preference needs data.preference_path"):
        load_config(None, ["train.mode=dpo", "dpo.reference=offline"])
    with pytest.raises(ConfigError, match="train.mode=dpo reads preference pairs, not "
                                          "data.source=synthetic"):
        load_config(None, ["train.mode=dpo", "data.source=synthetic", "dpo.reference=offline"])
