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
    (["model.preset=tiny", "model.bogus=1"], r"override 'model.bogus=1': unknown key 'model.bogus'; valid keys in model: .*d_model"),
    (["trian.steps=1"], r"override 'trian.steps=1': unknown key 'trian' \(did you mean train\?\); valid keys in config: data, dpo, eval, mesh, model, optim, seed, train"),
    (["optim.learning_rat=1e-4"], r"unknown key 'optim.learning_rat' \(did you mean optim.learning_rate\?\)"),
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
    else:  # docs/ualm.md's token blend: understanding 27.7%, t2a 33.1% (after 2x), text 39.2%
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


# Schema rules (issue 14): Literal choices, typed mixture entries, one merge rule, shape fields.
@pytest.mark.parametrize("override, match", [
    ("train.nan_policy=maybe", r"train.nan_policy='maybe' is not one of skip, stop"),
    ("train.stage=half", r"train.stage='half' is not one of full, align, custom"),
    ("model.attention=flash", r"model.attention='flash' is not one of auto, xla, cudnn"),
    ("model.dtype=int8", r"model.dtype='int8' is not one of bfloat16, float32, float16"),
    ("data.supervise_headers=all", r"data.supervise_headers='all' is not one of assistant, reasoning, none"),
    ("dpo.reference=cached", r"dpo.reference='cached' is not one of online, offline"),
    ("optim.schedule=linear", r"optim.schedule='linear' is not one of cosine, constant"),
])
def test_literal_fields_refuse_other_values_naming_key_and_choices(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_literal_fields_are_rechecked_on_objects_built_in_code():
    import dataclasses

    cfg = load_config(None)
    with pytest.raises(ConfigError, match=r"model.remat='most' is not one of none, full, dots"):
        dataclasses.replace(cfg.model, remat="most").validate()
    with pytest.raises(ConfigError, match=r"data.source='web' is not one of synthetic, mixture"):
        dataclasses.replace(cfg.data, source="web").validate()


@pytest.mark.parametrize("entry, match", [
    ("{name: b, share: -1}", r"data.mixture\[1\].share=-1: expected a number >= 0"),
    ("{name: b, upsample: 0}", r"data.mixture\[1\].upsample=0: expected a number > 0"),
    ("{name: b, path: 3}", r"data.mixture\[1\].path=3: expected a directory path string"),
    ("{name: a}", r"data.mixture\[1\].name='a': already used by data.mixture\[0\]"),
    ("{path: x}", r"data.mixture\[1\].name=None: expected a non-empty task name"),
    ("{name: b, weight: 2}", r"data.mixture\[1\] has unknown key\(s\) weight; expected name, path, share, upsample"),
    ("just_a_name", r"data.mixture\[1\] must be a mapping"),
])
def test_bad_mixture_entry_fails_at_load(tmp_path, entry, match):
    f = tmp_path / "c.yaml"
    f.write_text(f"data:\n  source: mixture\n  mixture:\n  - {{name: a, path: x, share: 1.0}}\n  - {entry}\n")
    with pytest.raises(ConfigError, match=match):
        load_config(f)


def test_mixture_entries_are_typed_but_serialise_as_written(tmp_path):
    import yaml

    from data_pipelines import mixture as mix
    from ualm_jax.config import MixtureEntry, parse_mixture

    assert mix.MixtureEntry is MixtureEntry and mix.parse_mixture is parse_mixture
    cfg = load_config(None, ["data.source=mixture",
                             "data.mixture=[{name: a, path: x}, {name: b, share: 2, upsample: 2}]"])
    assert parse_mixture(cfg.data.mixture)[1] == MixtureEntry("b", "", 2.0, 2.0)
    dumped = yaml.safe_load(cfg.to_yaml())["data"]["mixture"]
    assert dumped == [{"name": "a", "path": "x"}, {"name": "b", "share": 2, "upsample": 2}]
    f = tmp_path / "round.yaml"
    f.write_text(cfg.to_yaml())
    assert load_config(f) == cfg
    # Not checked unless the mixture is the data source.
    assert load_config(None, ["data.mixture=[{bogus: 1}]"]).data.source == "synthetic"


def test_one_merge_rule_for_base_files_overrides_and_presets(tmp_path):
    from ualm_jax.config import _default_rules

    (tmp_path / "base.yaml").write_text(
        "mesh:\n  rules: {batch: [data], embed: null, mlp: tensor}\ntrain: {freeze: [a, b]}\n")
    (tmp_path / "run.yaml").write_text(
        "base: base.yaml\nmesh:\n  rules: {embed: tensor}\ntrain: {freeze: [c]}\n")
    cfg = load_config(tmp_path / "run.yaml", ["mesh.rules.mlp=null", "mesh.rules={heads: null}"])
    # Mappings merge key by key in every layer; lists are replaced whole.
    assert cfg.mesh.rules == {"batch": ["data"], "embed": "tensor", "mlp": None, "heads": None}
    assert cfg.train.freeze == ["c"]
    assert load_config(None).mesh.rules == _default_rules()  # no layer names rules: the default
    # The preset is the bottom layer of `model`, merged by the same rule (a mapping override of a
    # nested section keeps the preset's other keys).
    tiny = load_config(None).model.audio_encoder
    enc = load_config(None, ["model.audio_encoder={n_layers: 1}"]).model.audio_encoder
    assert enc.n_layers == 1 and (enc.d_model, enc.n_mels) == (tiny.d_model, tiny.n_mels)


def test_shape_keys_come_from_the_schema(tmp_path):
    import dataclasses

    from ualm_jax.config import AudioEncoderConfig, shape_keys
    from ualm_jax.train.rundir import check_same_model

    previous = ("text_vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                "d_ff", "num_codebooks", "codebook_size", "num_special", "vocab_pad_multiple",
                "tie_embeddings", "adapter", "scan_layers", "param_dtype")
    encoder = tuple(f"audio_encoder.{f.name}" for f in dataclasses.fields(AudioEncoderConfig)
                    if f.name != "frozen")
    assert len(shape_keys()) == len(set(shape_keys()))
    assert set(shape_keys()) == set(previous) | set(encoder)

    (tmp_path / "checkpoints" / "10").mkdir(parents=True)
    (tmp_path / "config.yaml").write_text(load_config(None).to_yaml())
    check_same_model(tmp_path, load_config(None, ["model.audio_encoder.frozen=false",
                                                  "model.remat=dots", "model.dtype=bfloat16"]))
    for override, match in [("model.d_ff=256", r"model.d_ff was 128, now 256"),
                            ("model.audio_encoder.pool=4", r"model.audio_encoder.pool was 2, now 4"),
                            ("model.param_dtype=bfloat16", r"model.param_dtype was 'float32'")]:
        with pytest.raises(ConfigError, match=match):
            check_same_model(tmp_path, load_config(None, [override]))


def test_one_key_for_a_dpo_run():
    """train.mode=dpo implies data.source=preference and back; train.objective is its old name."""
    common = ["dpo.reference=offline", "data.preference_path=pairs"]
    for over in (["train.mode=dpo"], ["data.source=preference"], ["train.objective=dpo"]):
        cfg = load_config(None, over + common)
        assert (cfg.train.mode, cfg.data.source) == ("dpo", "preference"), over
    assert "objective" not in cfg.to_dict()["train"]
    with pytest.raises(ConfigError, match="train.objective=lm and train.mode=dpo disagree"):
        load_config(None, ["train.objective=lm", "train.mode=dpo"] + common)
    with pytest.raises(ConfigError, match="train.mode=dpo reads preference pairs"):
        load_config(None, ["train.mode=dpo", "data.source=synthetic"] + common)


def test_a_yaml_typo_names_its_file_and_the_closest_key(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("train:\n  stpes: 3\n")
    top = tmp_path / "top.yaml"
    top.write_text("base: base.yaml\noptim:\n  learning_rate: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"base\.yaml: unknown key 'train.stpes' \(did you mean train.steps\?\)"):
        load_config(top)
    base.write_text("model:\n  audio_encoder:\n    n_mel: 16\n")
    with pytest.raises(ConfigError, match=r"base\.yaml: unknown key 'model.audio_encoder.n_mel' "
                                          r"\(did you mean model.audio_encoder.n_mels\?\)"):
        load_config(top)
    base.write_text("train:\n  objective: lm\n")  # the former name of train.mode still loads
    assert load_config(top).train.mode == "lm"


def test_config_yaml_in_a_folder_keeps_paths_relative_to_that_folder(tmp_path, monkeypatch):
    """A run dir's config.yaml names local paths relative to itself (./ or ../), so it loads from
    any directory and after the run dir moves together with its data; URLs stay; a builder's
    `spectral:DIR` codec spec becomes the folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    cfg = load_config(None, ["data.tokenizer=data/tok.json", "data.codec=spectral:data/codec",
                             "train.init_from=gs://b/init"])
    assert cfg.data.codec == "data/codec"
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(cfg.to_yaml(relative_to=run))
    text = (run / "config.yaml").read_text()
    assert "tokenizer: ../../data/tok.json" in text and "codec: ../../data/codec" in text
    assert "init_from: gs://b/init" in text
    moved = tmp_path / "elsewhere" / "project"
    moved.mkdir(parents=True)
    (tmp_path / "runs").rename(moved / "runs")
    (tmp_path / "data").rename(moved / "data")
    monkeypatch.chdir("/")
    again = load_config(moved / "runs" / "r1" / "config.yaml")
    assert again.data.tokenizer == str(moved / "data" / "tok.json")
    assert again.data.codec == str(moved / "data" / "codec")
    assert again.train.init_from == "gs://b/init"
