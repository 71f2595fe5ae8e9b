"""Training on built shards through the Grain mixture (data.source=mixture): per-task metrics, exact
resume of the iterator position, and the `ualm mixture inspect|eval` commands on the same data."""
import json
import shutil

import jax
import numpy as np
import pytest

sf = pytest.importorskip("soundfile")
pytest.importorskip("tensorflow_datasets")

from ualm_jax.cli import main  # noqa: E402
from ualm_jax.config import load_config  # noqa: E402
from ualm_jax.train.loop import train  # noqa: E402

WORDS = "one two three four five six seven eight nine ten plus minus equals first then".split()


def tone(freq, seconds, sr=16000):
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Three tasks built from manifests: text SFT, text-to-audio and captioning (with held-out
    lines), a tiny BPE and a tiny SpectralCodec (K=4, C=32: the tiny preset's)."""
    from data_pipelines.build import build
    from data_pipelines.codecs import SpectralCodec
    from ualm_jax.format.template import AUDIO_TO_CAPTION_PROMPT, TEXT_TO_AUDIO_PROMPT
    from data_pipelines.tokenizer import train_tiny_bpe

    root = tmp_path_factory.mktemp("mixture")
    rng = np.random.default_rng(0)
    (root / "clips").mkdir()
    caps = []
    for i in range(12):
        f = [300, 600, 1200][i % 3]
        sf.write(root / "clips" / f"c{i}.wav", tone(f, 0.5 + 0.1 * (i % 4)), 16000)
        caps.append({"audio": f"clips/c{i}.wav", "caption": f"a tone at {f} hz",
                     **({"split": "validation"} if i % 4 == 0 else {})})
    sft = [{"messages": [{"role": "user", "content": " ".join(rng.choice(WORDS, 5))},
                         {"role": "assistant", "content": " ".join(rng.choice(WORDS, 3))}],
            **({"split": "validation"} if i % 5 == 0 else {})} for i in range(40)]
    for name, rows in (("caps", caps), ("sft", sft)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = WORDS + [c["caption"] for c in caps] + [TEXT_TO_AUDIO_PROMPT, AUDIO_TO_CAPTION_PROMPT]
    tok = train_tiny_bpe(texts * 4, 300, str(root / "tok"))
    codec = SpectralCodec.fit([tone(f, 1.0) for f in (300, 600, 1200)], 16000, K=4, C=32)
    codec_dir = codec.save(str(root / "codec"))
    paths = {}
    for name, kind, manifest, task in (("text", "text-sft", "sft", None),
                                       ("t2a", "captions", "caps", "t2a"),
                                       ("caption", "captions", "caps", "caption")):
        out = root / "data" / name
        report = build(kind, str(root / f"{manifest}.jsonl"), str(out), codec=f"spectral:{codec_dir}",
                       tokenizer=tok, n_mels=16, task=task)
        assert report["skipped"] == 0, report
        paths[name] = str(out)
        # The same manifest as TFRecord: what the SeqIO (tf.data) path reads natively.
        build(kind, str(root / f"{manifest}.jsonl"), str(root / "tfrec" / name),
              codec=f"spectral:{codec_dir}", tokenizer=tok, n_mels=16, task=task,
              file_format="tfrecord")
    mixture = ("data.mixture=[" + ",".join(
        f"{{name: {n}, path: '{p}', share: {s}}}" for n, p, s in
        (("text", paths["text"], 0.4), ("t2a", paths["t2a"], 0.3), ("caption", paths["caption"], 0.3)))
        + "]")
    config = root / "mix.yaml"
    config.write_text("model: {preset: tiny}\nmesh: {ici: {data: 2, fsdp: 2, tensor: 2}}\n")
    overrides = [mixture, "data.source=mixture", f"data.tokenizer={tok}",
                 "train.batch_size=8", "train.seq_len=128", "train.log_every=1",
                 "train.eval_batches=1", "train.checkpoint_every=2", "train.tensorboard=false",
                 "optim.warmup_steps=1", "optim.learning_rate=1e-2", "data.cfg_dropout=0.2"]
    seqio_mixture = mixture.replace(str(root / "data"), str(root / "tfrec"))
    return {"root": root, "config": str(config), "overrides": overrides,
            "seqio": [o for o in overrides if not o.startswith("data.mixture=")]
            + [seqio_mixture, "data.source=seqio"]}


def cfg_of(built, *extra):
    return load_config(built["config"], built["overrides"] + list(extra))


def records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(built):
    """Four steps in one go (checkpoints at 2 and 4)."""
    run = built["root"] / "straight"
    return {"run": run, **train(cfg_of(built, "train.steps=4"), run)}


@pytest.mark.slow
def test_mixture_training_per_task_metrics_and_exact_resume(built, straight, tmp_path):
    cfg = cfg_of(built, "train.steps=4")
    first = train(cfg, tmp_path / "b", max_steps_this_run=2)
    assert first["step"] == 2
    second = train(cfg, tmp_path / "b")
    assert second["step"] == 4

    la = {r["step"]: r["loss"] for r in records(straight["run"]) if "loss" in r}
    lb = {r["step"]: r["loss"] for r in records(tmp_path / "b") if "loss" in r}
    assert la == lb  # the resumed iterator continued the same packed stream, bit for bit
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in
               zip(jax.tree.leaves(straight["state"]["params"]), jax.tree.leaves(second["state"]["params"])))
    recs = [r for r in records(straight["run"]) if "loss" in r]
    seen = set().union(*({k.split("/", 1)[1] for k in r if k.startswith("loss/") and "stream" not in k}
                         for r in recs))
    assert seen == {"text", "t2a", "caption"}
    ev = straight["eval"]
    assert {"eval/loss/text", "eval/loss/t2a", "eval/loss/caption"} <= set(ev)
    assert all(0.0 <= ev[f"eval/accuracy/{t}"] <= 1.0 for t in ("text", "t2a", "caption"))


@pytest.mark.slow
def test_mixture_eval_reports_each_task(built, straight, capsys):
    argv = ["mixture", "eval", "--config", built["config"], "--checkpoint", str(straight["run"]),
            "--batches", "1", *built["overrides"]]
    assert main(argv + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == 4 and [t["name"] for t in out["tasks"]] == ["text", "t2a", "caption"]
    for t in out["tasks"]:
        assert np.isfinite(t["loss"]) and 0.0 <= t["accuracy"] <= 1.0 and t["targets"] > 0
    # The same held-out batch the run's last eval saw: the same numbers.
    ev = straight["eval"]
    assert out["loss"] == pytest.approx(ev["eval/loss"], rel=1e-5)
    for t in out["tasks"]:
        assert t["loss"] == pytest.approx(ev[f"eval/loss/{t['name']}"], rel=1e-5)
    assert main(argv) == 0
    assert "token acc" in capsys.readouterr().out


def test_mixture_inspect_json_and_text(built, capsys):
    argv = ["mixture", "inspect", "--config", built["config"], "--batches", "6", *built["overrides"],
            "train.steps=100"]
    assert main(argv + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    names = [t["name"] for t in out["tasks"]]
    assert names == ["text", "t2a", "caption"]
    assert sum(t["target_share"] for t in out["tasks"]) == pytest.approx(1.0)
    assert sum(t["realised_share"] for t in out["tasks"]) == pytest.approx(1.0)
    assert [t["target_share"] for t in out["tasks"]] == pytest.approx([0.4, 0.3, 0.3])
    for t in out["tasks"]:
        assert t["examples"] > 0 and t["validation_examples"] > 0 and t["epochs"] > 0
    assert 0.0 < out["packing_efficiency"] <= 1.0
    assert "--- example 1: task" in out["example"]

    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "realised" in text and "one packed row:" in text and "<assistant>" in text


def test_mixture_inspect_needs_a_mixture(built, capsys):
    assert main(["mixture", "inspect", "--config", built["config"]]) == 2
    assert "data.source=mixture" in capsys.readouterr().err


# SeqIO as the training source (data.source=seqio) ----------------------------------------------
def seqio_cfg(built, *extra):
    return load_config(built["config"], built["seqio"] + list(extra))


@pytest.mark.slow
def test_seqio_training_resumes_bit_for_bit(built, tmp_path):
    """TFRecord builds through SeqIO Tasks: 3 steps + resume + 3 equals 6 straight (the tf.data
    iterator state is in the checkpoint), with per-task metrics under the entry names."""
    cfg = seqio_cfg(built, "train.steps=6", "train.checkpoint_every=3", "train.eval_every=6")
    a = train(cfg, tmp_path / "a")
    first = train(cfg, tmp_path / "b", max_steps_this_run=3)
    assert first["step"] == 3
    b = train(cfg, tmp_path / "b")
    assert b["step"] == 6
    la = {r["step"]: r["loss"] for r in records(tmp_path / "a") if "loss" in r}
    lb = {r["step"]: r["loss"] for r in records(tmp_path / "b") if "loss" in r}
    assert len(la) == 6 and la == lb
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in
               zip(jax.tree.leaves(a["state"]["params"]), jax.tree.leaves(b["state"]["params"])))
    seen = set().union(*({k.split("/", 1)[1] for k in r if k.startswith("loss/") and "stream" not in k}
                         for r in records(tmp_path / "a") if "loss" in r))
    assert seen == {"text", "t2a", "caption"}
    assert {"eval/loss/text", "eval/loss/t2a", "eval/loss/caption"} <= set(a["eval"])


def test_seqio_over_tfrecord_streams_the_grain_examples_of_the_same_manifests(built):
    """The same manifests built as ArrayRecord (Grain) and TFRecord (SeqIO), shuffling off: the
    two paths render the same mixed stream of examples, in the same order."""
    from data_pipelines.grain_pipeline import make_config_iterator
    from data_pipelines.seqio_pipeline import make_seqio_iterator

    grain_it = make_config_iterator(cfg_of(built, "data.shuffle=false"), "train", 0, 1)
    seqio_it = make_seqio_iterator(seqio_cfg(built, "data.shuffle=false"), "train", 0, 1)
    for i, x in enumerate(seqio_it._dataset.take(80).as_numpy_iterator()):
        e = grain_it.stream[i]
        assert int(x["task_id"]) == e.task, i
        np.testing.assert_array_equal(x["tokens"], e.tokens, err_msg=str(i))
        np.testing.assert_array_equal(x["loss_weights"], e.loss_weights, err_msg=str(i))
    for _ in range(3):  # both pack into the batch contract
        a, b = next(grain_it), next(seqio_it)
        assert {k: (v.shape, v.dtype) for k, v in a.items()} == \
            {k: (v.shape, v.dtype) for k, v in b.items()}


def test_seqio_mixture_inspect_and_eval(built, straight, capsys):
    argv = ["mixture", "inspect", "--config", built["config"], "--batches", "4", *built["seqio"],
            "train.steps=100", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["source"] == "seqio" and [t["name"] for t in out["tasks"]] == ["text", "t2a", "caption"]
    assert [t["target_share"] for t in out["tasks"]] == pytest.approx([0.4, 0.3, 0.3])
    assert sum(t["realised_share"] for t in out["tasks"]) == pytest.approx(1.0)
    for t in out["tasks"]:
        assert t["examples"] > 0 and t["validation_examples"] > 0 and t["mean_tokens"] > 0
    argv = ["mixture", "eval", "--config", built["config"], "--checkpoint", str(straight["run"]),
            "--batches", "1", *built["seqio"], "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in out["tasks"]] == ["text", "t2a", "caption"]
    assert all(np.isfinite(t["loss"]) and t["targets"] > 0 for t in out["tasks"])


def test_a_users_registered_mixture_keeps_its_rates(built, tmp_path, monkeypatch, capsys):
    """A T5X-style module registers a Mixture over two of our registered builds (by entry name)
    with its own rates; `data.seqio.modules` imports it, `data.seqio.mixture` selects it."""
    (tmp_path / "my_mixtures.py").write_text(
        "import seqio\n"
        "seqio.MixtureRegistry.remove('my_blend')\n"
        "seqio.MixtureRegistry.add('my_blend', [('text', 3.0), ('caption', 1.0)])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = ["mixture", "inspect", "--config", built["config"], "--batches", "8", *built["seqio"],
            "data.seqio.modules=[my_mixtures]", "data.seqio.mixture=my_blend", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    tasks = {t["name"]: t for t in out["tasks"]}
    assert list(tasks) == ["caption", "text"]  # seqio orders a Mixture's tasks by name
    assert tasks["text"]["sampling_weight"] == pytest.approx(0.75)
    assert tasks["caption"]["target_share"] is None and tasks["text"]["realised_share"] > 0
    bad = argv[:-3] + ["data.seqio.mixture=not_there"]
    assert main(bad) == 2
    assert "'not_there' is not a registered seqio Mixture or Task" in capsys.readouterr().err


# `ualm mixture sweep` -------------------------------------------------------------------------
BLENDS = ("blends:\n"
          "  - {name: even, shares: {text: 1, t2a: 1, caption: 1}}\n"
          "  - {name: no_text, shares: {t2a: 1, caption: 1}}\n"
          "  - {name: text_heavy, shares: {text: 4, t2a: 1, caption: 1}}\n"
          "  - {name: audio, shares: {text: 1, t2a: 3, caption: 2}}\n")


@pytest.mark.slow
def test_mixture_sweep_trains_each_blend_fits_and_resumes(built, tmp_path, capsys):
    (tmp_path / "blends.yaml").write_text(BLENDS)
    out = tmp_path / "sweep"
    argv = ["mixture", "sweep", "--config", built["config"], "--blends", str(tmp_path / "blends.yaml"),
            "--out", str(out), "--steps", "2", "--eval-batches", "1", *built["overrides"]]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "PREDICTED best blend (a prediction, not a result)" in text and "leave-one-out" in text
    rows = [json.loads(x) for x in (out / "sweep.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == ["even", "no_text", "text_heavy", "audio"]
    for r in rows:
        assert sum(r["shares"].values()) == pytest.approx(1.0)
        assert sum(r["realised_shares"].values()) == pytest.approx(1.0)
        for t in ("text", "t2a", "caption"):
            assert np.isfinite(r["held_out"][t]["loss"]) and r["held_out"][t]["targets"] > 0
    assert rows[1]["tokens"]["text"] == 0 and rows[2]["tokens"]["text"] > rows[0]["tokens"]["text"]
    # Every blend is scored on the same held-out batches of each task.
    for t in ("text", "t2a", "caption"):
        assert len({r["held_out"][t]["targets"] for r in rows}) == 1
    fit = json.loads((out / "fit.json").read_text())
    best = fit["prediction"]["shares"]
    assert sum(best.values()) == pytest.approx(1.0) and fit["prediction"]["error"] > 0
    assert 0.25 - 1e-6 <= best["caption"] <= 0.5 + 1e-6  # inside the sampled range
    assert {t["task"] for t in fit["tasks"]} == {"text", "t2a", "caption"}
    assert (out / "sweep.png").stat().st_size > 0

    # A rerun trains nothing (every result.json stays as it was); another plan is refused.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json")}
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json")} == stamps
    (tmp_path / "other.yaml").write_text("blends:\n  - {text: 1}\n  - {t2a: 1}\n  - {caption: 1}\n")
    other = [a if a != str(tmp_path / "blends.yaml") else str(tmp_path / "other.yaml") for a in argv]
    assert main(other) == 2
    assert "holds another sweep's blends" in capsys.readouterr().err

    # Two blends retrained in their own processes, both at once: the numbers of one process.
    for name in ("even", "audio"):
        (out / "runs" / name / "result.json").unlink()
        shutil.rmtree(out / "runs" / name / "checkpoints")
    assert main(argv + ["--parallel", "2", "--json"]) == 0
    par = {r["name"]: r for r in map(json.loads, (out / "sweep.jsonl").read_text().splitlines())}
    assert list(par) == ["even", "no_text", "text_heavy", "audio"]
    for name in ("even", "audio"):
        seq = next(r for r in rows if r["name"] == name)
        assert par[name]["held_out"] == seq["held_out"] and par[name]["tokens"] == seq["tokens"]
    assert (out / "runs" / "even.log").exists()
