import pytest

from ualm_jax.config import Config, ConfigError, load_config
from ualm_jax.sharding import make_mesh, parse_mesh_arg


def test_preset_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  preset: 1.5b\n  remat: dots\nseed: 3\n")
    cfg = load_config(f, ["model.n_layers=4", "mesh.ici.fsdp=2", "optim.learning_rate=3e-4"])
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.remat) == (1536, 4, "dots")
    assert cfg.model.audio_encoder.d_model == 1280
    assert cfg.mesh.ici.fsdp == 2 and cfg.optim.learning_rate == 3e-4 and cfg.seed == 3
    assert isinstance(cfg, Config)


@pytest.mark.parametrize("overrides, match", [
    (["model.preset=13b"], r"model.preset='13b' is unknown; known presets: tiny, 0.5b, 1.5b, 7b"),
    (["model.preset=tiny", "model.n_kv_heads=3"], r"model.n_heads=4 must be a multiple of model.n_kv_heads=3"),
    (["model.preset=tiny", "model.bogus=1"], r"unknown key\(s\) 'bogus' in model; valid keys: .*d_model"),
    (["trian.steps=1"], r"unknown key\(s\) 'trian' in config; valid keys: data, dpo, eval, mesh, model, optim, seed, train"),
    (["model.preset=tiny", "model.n_layers=two"], r"model.n_layers='two' must be an integer"),
    (["model.preset=tiny", "model.remat=some"], r"model.remat='some' is not one of"),
    (["model.preset=tiny", "model.audio_encoder.n_heads=3"], r"model.audio_encoder.d_model=32 must be divisible"),
    (["nonsense"], r"must look like dotted.key=value"),
])
def test_bad_configs_name_the_value(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/config.yaml")


def test_mesh_must_match_devices():
    cfg = load_config(None, ["mesh.ici.data=3", "mesh.ici.fsdp=1"])
    with pytest.raises(ConfigError, match=r"mesh sizes \(mesh.ici.data=3\) multiply to 3 but 8 devices"):
        make_mesh(cfg.mesh)
    cfg = load_config(None, ["mesh.ici.data=3", "mesh.ici.fsdp=-1"])
    with pytest.raises(ConfigError, match=r"mesh.ici.fsdp=-1 cannot be filled"):
        make_mesh(cfg.mesh)
    cfg = load_config(None, ["mesh.ici.data=2", "mesh.ici.tensor=-1", "mesh.ici.fsdp=-1"])
    with pytest.raises(ConfigError, match="only one mesh size may be -1"):
        make_mesh(cfg.mesh)
    with pytest.raises(ConfigError, match="--mesh axis 'pipe' is unknown"):
        parse_mesh_arg("pipe=2")


def test_auto_axis_and_dcn():
    cfg = load_config(None, ["mesh.ici.fsdp=-1", "mesh.ici.tensor=2", "mesh.dcn.data=2"])
    mesh = make_mesh(cfg.mesh)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_base_files_merge_under_the_config(tmp_path):
    from ualm_jax.config import ConfigError, load_config

    (tmp_path / "mix").mkdir()
    (tmp_path / "mix" / "blend.yaml").write_text(
        "data: {source: mixture, mixture: [{name: a, path: x, share: 1.0}], cfg_dropout: 0.1}\n"
        "train: {steps: 7}\n")
    (tmp_path / "run.yaml").write_text("base: mix/blend.yaml\ntrain: {batch_size: 4}\n"
                                       "data: {cfg_dropout: 0.2}\n")
    cfg = load_config(tmp_path / "run.yaml", ["train.steps=9"])
    assert cfg.data.source == "mixture" and cfg.data.mixture[0]["name"] == "a"
    assert (cfg.train.steps, cfg.train.batch_size, cfg.data.cfg_dropout) == (9, 4, 0.2)
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "missing.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="named by `base:`"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("name", ["ualm_7b_pretrain", "ualm_7b_align", "ualm_gen_1.5b"])
def test_shipped_configs_use_the_mixture_presets(name):
    from data_pipelines.mixture import parse_mixture, target_shares
    from ualm_jax.config import load_config

    cfg = load_config(f"configs/{name}.yaml")
    shares = target_shares(parse_mixture(cfg.data.mixture))
    if name == "ualm_gen_1.5b":
        assert shares == {"t2a": 1.0}
    else:  # UALM.md's token blend: understanding 27.7%, t2a 33.1% (after 2x), text 39.2%
        assert shares["caption"] + shares["audio_qa"] == pytest.approx(0.277)
        assert shares["t2a"] == pytest.approx(0.331)
        assert shares["text"] == pytest.approx(0.392)


@pytest.mark.parametrize("override, match", [
    ("optim.learning_rate=nan", r"optim.learning_rate=nan must be a finite number >= 0"),
    ("optim.learning_rate=inf", r"optim.learning_rate=inf must be a finite number >= 0"),
    ("optim.learning_rate=-1e-4", r"optim.learning_rate=-0.0001 must be a finite number >= 0"),
    ("optim.eps=0", r"optim.eps=0.0 must be a finite number > 0"),
    ("optim.eps=inf", r"optim.eps=inf must be a finite number > 0"),
    ("optim.b2=1", r"optim.b2=1.0 must be a finite number in \[0, 1\)"),
    ("optim.b1=2", r"optim.b1=2.0 must be a finite number in \[0, 1\)"),
    ("optim.b1=-0.1", r"optim.b1=-0.1 must be a finite number in \[0, 1\)"),
    ("optim.clip_norm=-1", r"optim.clip_norm=-1.0 must be a finite number >= 0 \(0 disables clipping\)"),
    ("optim.clip_norm=nan", r"optim.clip_norm=nan must be a finite number >= 0"),
    ("optim.weight_decay=-0.1", r"optim.weight_decay=-0.1 must be a finite number >= 0"),
    ("optim.end_learning_rate_ratio=1.5", r"optim.end_learning_rate_ratio=1.5 must be a finite number in \[0, 1\]"),
    ("optim.warmup_steps=-5", r"optim.warmup_steps=-5 must be >= 0"),
    ("train.min_free_disk_factor=-1", r"train.min_free_disk_factor=-1.0 must be a finite number >= 0"),
    ("train.min_free_disk_factor=nan", r"train.min_free_disk_factor=nan must be a finite number >= 0"),
    ("train.seq_len=3", r"train.seq_len=3 must be >= 8"),
    ("train.probe_timeout_s=0", r"train.probe_timeout_s=0.0 must be a finite number > 0"),
    ("dpo.beta=nan", r"dpo.beta=nan must be a finite number > 0"),
    ("dpo.ce_weight=-1", r"dpo.ce_weight=-1.0 must be a finite number >= 0"),
    ("eval.cfg_scale=nan", r"eval.cfg_scale=nan must be a finite number > 0"),
])
def test_out_of_range_optimiser_and_train_values_are_refused(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["model.preset=tiny", override])


def test_in_range_edges_are_accepted():
    cfg = load_config(None, ["model.preset=tiny", "optim.learning_rate=0", "optim.b1=0",
                             "optim.b2=0.999", "optim.clip_norm=0", "optim.warmup_steps=0",
                             "optim.weight_decay=0", "optim.end_learning_rate_ratio=1",
                             "train.min_free_disk_factor=0", "train.seq_len=8"])
    assert cfg.optim.clip_norm == 0 and cfg.train.seq_len == 8


def test_config_without_model_section_is_the_default_preset(tmp_path):
    from ualm_jax.model.flops import param_count
    from ualm_jax.config import preset_config

    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 3\n")
    tiny = preset_config("tiny")
    for cfg in (load_config(f), load_config(None), load_config(None, ["model.d_ff=128"])):
        assert cfg.model.preset == "tiny"
        assert cfg.model == tiny
        assert param_count(cfg.model) == param_count(load_config(None, ["model.preset=tiny"]).model)
    assert sum(param_count(tiny).values()) < 10_000_000
    # Keys without a preset apply on top of the default preset.
    assert load_config(None, ["model.n_layers=3"]).model.d_model == tiny.d_model
