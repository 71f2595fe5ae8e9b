"""`ualm dpo make-pairs` on a tiny random checkpoint: the manifest it writes builds as preference
records without skips, the threshold drops pairs (and says why), unknown judges fail clearly."""
import argparse
import json

import jax
import numpy as np
import pytest

from tiny_models import clap_dir, needs_torch  # noqa: F401  (tiny random CLAP fixture)
from ualm_jax.checkpoint import save_params
from ualm_jax.config import load_config
from ualm_jax.cli.dpo import add_parser as add_dpo_parser
from ualm_jax.recipes.make_pairs import make_judge, make_pairs
from ualm_jax.model.params import build_model, init_params

GEN = dict(max_new=24, max_audio_frames=16)  # ~0.3 s clips: fast, above the builder's 0.1 s


def tiny_run(root):
    """A procedural world (3 prompts with references and events), a tiny BPE, a SpectralCodec
    fitted on the world's clips and a random tiny checkpoint whose config names both."""
    import soundfile as sf

    from data_pipelines.codecs.spectral import SpectralCodec
    from data_pipelines.tokenizer import TextTokenizer, train_tiny_bpe
    from data_pipelines.demo.world import make_world

    paths = make_world(str(root / "world"), n_clips=6, seed=0, clip_seconds=1.0, eval_fraction=0.5,
                       qa_per_clip=1, n_text=2)
    caps = [json.loads(x)["caption"] for x in open(paths["captions"])]
    tok = train_tiny_bpe(caps * 5, 300, str(root / "tok"))
    waves = [sf.read(str(root / "world" / json.loads(x)["audio"]))[0] for x in open(paths["captions"])]
    SpectralCodec.fit(waves, 16000, K=4, C=32, seed=0, iters=5).save(str(root / "codec"))
    cfg = load_config(None, ["model.preset=tiny", f"model.text_vocab_size={TextTokenizer(tok).vocab_size}",
                             "model.audio_encoder.enabled=false", f"data.tokenizer={tok}",
                             f"data.codec={root / 'codec'}"])
    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text(cfg.to_yaml())
    save_params(run / "checkpoints", init_params(build_model(cfg.model), jax.random.key(0)))
    return run, paths["prompts"], tok, str(root / "codec")


_RUNS: dict = {}


def shared_tiny_run(tmp_path_factory):
    """One tiny_run per pytest session, shared with test_cli_eval (building it costs ~10 s)."""
    if "run" not in _RUNS:
        _RUNS["run"] = tiny_run(tmp_path_factory.mktemp("tiny_run"))
    return _RUNS["run"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return shared_tiny_run(tmp_path_factory)


def _parser():
    p = argparse.ArgumentParser(prog="ualm")
    add_dpo_parser(p.add_subparsers(dest="command", required=True))
    return p


@needs_torch
def test_pairs_build_as_preference_records(setup, clap_dir, tmp_path):
    from data_pipelines.build import build

    run, prompts, tok, codec = setup
    out = tmp_path / "pairs"
    report = make_pairs(run, prompts, 3, f"clap:{clap_dir}", out, threshold=0.0, seed=0, **GEN)
    assert report["prompts"] == 3 and report["samples"] == 9 and str(clap_dir) in report["judge"]
    assert report["pairs"] >= 1 and report["pairs"] + report["skipped"] == 3
    assert report["mean_score_chosen"] > report["mean_score_rejected"]
    lines = [json.loads(x) for x in open(out / "pairs.jsonl")]
    assert len(lines) == report["pairs"]
    for line in lines:
        assert line["score_chosen"] > line["score_rejected"]
        assert (out / line["chosen"]).is_file() and (out / line["rejected"]).is_file()
    assert len(open(out / "chosen.jsonl").readlines()) == report["pairs"]
    assert json.loads((out / "make_pairs_report.json").read_text())["pairs"] == report["pairs"]
    built = build("preference", str(out / "pairs.jsonl"), str(tmp_path / "built"), codec=codec,
                  tokenizer=tok)
    assert built["skipped"] == 0 and built["written"] == report["pairs"]


def test_threshold_above_one_keeps_nothing_and_says_why(setup, tmp_path, capsys):
    run, prompts, _, _ = setup
    out = tmp_path / "none"
    args = _parser().parse_args([
        "dpo", "make-pairs", "--checkpoint", str(run), "--prompts", prompts, "--samples", "2",
        "--judge", "builtin", "--threshold", "1.5", "--out", str(out), "--cfg", "3.0",
        "--max-new", str(GEN["max_new"]), "--max-audio-frames", str(GEN["max_audio_frames"])])
    assert args.func(args) == 0
    report = json.loads((out / "make_pairs_report.json").read_text())
    assert report["pairs"] == 0 and report["skipped"] == 3 and report["judge"].startswith("builtin")
    assert set(report["skipped_by_reason"]) <= {"below_threshold", "tie", "too_few_samples"}
    assert all(s["reason"] and s["detail"] for s in report["skipped_prompts"])
    assert (out / "pairs.jsonl").read_text() == ""
    assert "0 pairs, 3 skipped" in capsys.readouterr().out


def test_unknown_judge_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown judge 'gpt'.*builtin.*clap:DIR"):
        make_judge("gpt")
    with pytest.raises(FileNotFoundError, match="no CLAP model directory"):
        make_judge(f"clap:{tmp_path / 'missing'}")
    # Through the CLI handler: fails before any checkpoint is read.
    args = _parser().parse_args(["dpo", "make-pairs", "--checkpoint", str(tmp_path / "nope"),
                                 "--prompts", "p.jsonl", "--samples", "2", "--judge", "nope"])
    with pytest.raises(ValueError, match="unknown judge 'nope'"):
        args.func(args)
    with pytest.raises(ValueError, match="at least 2"):
        make_pairs(tmp_path, "p.jsonl", 1, "builtin", tmp_path)


def test_cli_defaults_are_the_library_s():
    """`ualm dpo make-pairs` states the judges without importing the recipe (JAX) at --help; its
    sampling defaults are GenerationConfig's, as make_pairs' own are."""
    import inspect

    from ualm_jax.cli.dpo import JUDGE_HELP
    from ualm_jax.infer.decode import GenerationConfig
    from ualm_jax.recipes import make_pairs as recipe

    assert JUDGE_HELP == recipe.JUDGE_HELP
    args = _parser().parse_args(["dpo", "make-pairs", "--checkpoint", "c", "--prompts", "p",
                                 "--samples", "2", "--judge", "builtin"])
    lib = inspect.signature(make_pairs).parameters
    gen = GenerationConfig()
    assert args.cfg == lib["cfg_scale"].default == gen.cfg_scale == 3.0
    assert args.temperature == lib["temperature"].default == gen.audio_temperature
    assert (args.top_k, args.max_new, args.batch_size) == (
        lib["top_k"].default, lib["max_new"].default, lib["batch_size"].default)


def test_builtin_judge_scores_in_unit_range():
    from data_pipelines.demo.world import SAMPLE_RATE

    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    tone = (0.5 * np.sin(2 * np.pi * 880 * t)).astype(np.float32)
    s = make_judge("builtin").score([tone, np.zeros_like(tone)], SAMPLE_RATE, ["a tone", "a tone"])
    assert s.shape == (2,) and ((0 <= s) & (s <= 1)).all() and s[1] == 0.0


def test_choose_best_worst_ties_and_threshold():
    from ualm_jax.recipes.make_pairs import _choose

    pick, reason, _ = _choose([(0.2, 0), (0.9, 1), (0.5, 2)], 3, 0.5, 0.1)
    assert pick == ((0.9, 1), (0.2, 0)) and reason is None
    assert _choose([(0.2, 0), (0.9, 1)], 2, 0.8, 0.1)[1] == "below_threshold"
    assert _choose([(0.4, 0), (0.4, 1)], 2, 0.0, 0.1)[1] == "tie"  # equals never pair
    assert _choose([(0.4, 0)], 3, 0.0, 0.1)[1] == "too_few_samples"
