"""One CLI convention: every flag has help (defaults shown), bare key=value overrides with --set as
an alias on every command that reads a config, --checkpoint wherever a checkpoint is read,
`ualm --version`, `ualm config show`, `ualm train --dry-run` (which writes nothing)."""
import argparse
import json

import pytest

from ualm_jax import __version__
from ualm_jax.cli import build_parser, main, parse_args, walk_parsers


def parse(*argv):
    return parse_args(build_parser(), list(argv))


def test_every_flag_has_help_and_shows_its_default():
    parser = build_parser()
    missing = [f"{p.prog} {a.dest}" for p in walk_parsers(parser) for a in p._actions
               if not a.help and not isinstance(a, argparse._SubParsersAction)]
    assert not missing, missing
    text = next(p for p in walk_parsers(parser) if p.prog == "ualm bench step").format_help()
    assert "(default: 5)" in text and "(default: tiny)" in text
    kinds = next(p for p in walk_parsers(parser) if p.prog == "ualm data build").format_help()
    assert all(k in kinds for k in ("captions ", "audio-qa ", "preference ", '"messages"'))


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"ualm-jax {__version__}"


@pytest.mark.parametrize("argv", [
    ["train", "--run-dir", "r"], ["demo"], ["bench", "step"], ["config", "show"],
    ["mixture", "inspect", "--config", "c.yaml"], ["import-hf", "hf", "--out", "o"],
    ["generate", "--task", "caption", "--audio", "a.wav", "--checkpoint", "ck"],
    ["eval", "--checkpoint", "ck", "--prompts", "p.jsonl"],
    ["dpo", "make-pairs", "--checkpoint", "ck", "--prompts", "p", "--samples", "2",
     "--judge", "builtin"],
])
def test_bare_overrides_and_set_everywhere(argv):
    args = parse(*argv, "model.attention=xla", "--set", "train.steps=3", "seed=1")
    assert args.overrides == ["model.attention=xla", "train.steps=3", "seed=1"]


def test_checkpoint_positional_or_flag():
    assert parse("export", "run", "--out", "x").checkpoint == "run"
    assert parse("export", "--checkpoint", "run", "--out", "x").checkpoint == "run"
    assert parse("inspect", "--checkpoint", "run").checkpoint == "run"
    with pytest.raises(SystemExit):
        parse("export", "a", "--checkpoint", "b", "--out", "x")
    with pytest.raises(SystemExit):
        parse("inspect")
    # One name for where outputs go: --out is accepted for the run and work folders too.
    assert parse("train", "--out", "r").run_dir == "r"
    assert parse("bench", "export", "--out", "w").out == "w"


def test_config_show(capsys):
    assert main(["config", "show", "--json", "model.preset=tiny", "train.batch_size=2",
                 "--set", "train.seq_len=64"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["train"]["seq_len"] == 64
    assert info["batch_spec"]["tokens"][0] == [2, 64, 4]
    assert info["parameters"]["total"] == sum(info["parameters"]["by_part"].values()) > 0
    assert main(["config", "show", "model.preset=tiny"]) == 0
    out = capsys.readouterr().out
    assert "# parameters:" in out and "# batch spec" in out and "audio_mel_mask" in out


def test_train_dry_run_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--dry-run", "--run-dir", str(tmp_path / "run"), "model.preset=tiny",
                 "train.batch_size=8", "train.seq_len=64"]) == 0
    out = capsys.readouterr().out
    assert "nothing written" in out and "matches the batch contract" in out and "GiB" in out
    assert "warning: the audio encoder is randomly initialised and frozen" in out  # tiny freezes it
    assert list(tmp_path.iterdir()) == []
    assert main(["train", "model.preset=tiny"]) == 2  # no --run-dir: one line says what to give
    assert "needs --run-dir" in capsys.readouterr().err


def test_import_hf_never_invents_an_encoder(tmp_path, capsys):
    from test_convert import make_hf

    from ualm_jax.config import load_config

    make_hf(tmp_path / "hf", False)
    tiny = ["model.preset=tiny", "model.dtype=float32"]
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "a")] + tiny) == 0
    assert "audio encoder: none (a text-only UALM" in capsys.readouterr().out
    cfg = load_config(tmp_path / "a" / "config.yaml")
    assert not cfg.model.audio_encoder.enabled and cfg.model.num_codebooks > 0
    # Asked for (an override, a config or --whisper): built, and said to be random.
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "b"),
                 "model.audio_encoder.enabled=true"] + tiny) == 0
    assert "audio encoder: randomly initialised" in capsys.readouterr().out
    assert load_config(tmp_path / "b" / "config.yaml").model.audio_encoder.enabled
