"""`ualm eval` on a tiny random checkpoint: every metric names its model, --json parses, and the
train loop logs the same metrics at its evals when eval.prompts is set."""
import argparse
import json
from pathlib import Path

import pytest

from tiny_models import clap_dir, needs_torch  # noqa: F401  (tiny random CLAP fixture)
from test_make_pairs import shared_tiny_run
from ualm_jax.cli.eval import add_parser as add_eval_parser
from ualm_jax.eval.generation import format_table

GEN = ["--max-new", "24", "--max-audio-frames", "16"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return shared_tiny_run(tmp_path_factory)


def _run(argv, capsys):
    p = argparse.ArgumentParser(prog="ualm")
    add_eval_parser(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["eval", *argv])
    assert args.func(args) == 0
    return capsys.readouterr().out


@needs_torch
def test_table_names_every_model(setup, clap_dir, tmp_path, capsys):
    run, prompts, _, _ = setup
    out = _run(["--checkpoint", str(run), "--prompts", prompts, "--clap", str(clap_dir),
                "--fd-model", "mel-stats", "--out", str(tmp_path / "ev"), *GEN], capsys)
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("gen/")}
    assert set(rows) == {"gen/clap", "gen/fd", "gen/world_match", "gen/world_judge"}
    assert str(clap_dir) in rows["gen/clap"] and "mel-stats" in rows["gen/fd"]
    assert "analyser" in rows["gen/world_match"] and "analyser" in rows["gen/world_judge"]
    saved = json.loads((tmp_path / "ev" / "eval_metrics.json").read_text())
    assert saved["prompts"] == 3 and set(saved["metrics"]) == set(rows)
    assert len(list((tmp_path / "ev").glob("sample_*.wav"))) == 3


def test_json_output_parses(setup, capsys):
    run, prompts, _, _ = setup
    out = _run(["--checkpoint", str(run), "--prompts", prompts, "--fd-model", "mel-stats",
                "--json", "--max-prompts", "2", "--cfg", "1.0", *GEN], capsys)
    payload = json.loads(out)
    assert payload["prompts"] == 2 and payload["cfg_scale"] == 1.0
    m = payload["metrics"]
    assert m["gen/fd"]["model"].startswith("mel-stats") and m["gen/fd"]["n"] == 2
    assert 0.0 <= m["gen/world_match"]["value"] <= 1.0
    assert "gen/clap" in payload["skipped"]  # no --clap: skipped, and said so


def test_train_loop_logs_generation_metrics(setup, tmp_path):
    from ualm_jax.config import load_config
    from ualm_jax.eval.hooks import eval_hooks
    from ualm_jax.train.loop import train

    run, prompts, _, _ = setup
    cfg = load_config(run / "config.yaml", [
        f"eval.prompts={prompts}", "eval.max_prompts=2", "eval.fd_model=mel-stats",
        "train.steps=1", "train.eval_every=1", "train.eval_batches=1", "train.batch_size=8",
        "train.seq_len=64", "train.tensorboard=true", "mesh.ici.fsdp=8"])
    summary = train(cfg, tmp_path / "run", hooks=eval_hooks(cfg))
    ev = summary["eval"]
    assert {"eval/gen/world_match", "eval/gen/world_judge", "eval/gen/fd"} <= set(ev)
    assert 0.0 <= ev["eval/gen/world_match"] <= 1.0 and ev["eval/gen/fd"] >= 0.0
    assert ev["eval/gen_models"]["gen/fd"].startswith("mel-stats")
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/gen/world_match" in r for r in logged)
    # The generated clips as TensorBoard audio summaries, their captions as text.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"audio": 0})
    ea.Reload()
    assert "gen/0" in ea.Tags()["audio"] and ea.Audio("gen/0")[0].sample_rate > 0


def test_format_table_lists_skips():
    from ualm_jax.eval.generation import GenerationEval
    from ualm_jax.eval.metrics import MetricResult

    ev = GenerationEval({"gen/fd": MetricResult(1.5, 4, "mel-stats(sr=16000,n_mels=64)")},
                        {"gen/clap": "no --clap model"}, prompts=4)
    text = format_table(ev)
    assert "mel-stats(sr=16000,n_mels=64)" in text and "skipped: no --clap model" in text


def test_bad_fd_model_is_clear(setup, capsys):
    run, prompts, _, _ = setup
    with pytest.raises(FileNotFoundError, match="neither 'mel-stats' nor a model directory"):
        _run(["--checkpoint", str(run), "--prompts", prompts, "--fd-model", "openl3"], capsys)
