"""Run directories, checkpoints, exports and data on gs://, against a real GCS-compatible server
started on 127.0.0.1 by the `gcs` fixture (fake-gcs-server, in-memory): train + SIGTERM + resume
bit for bit, a killed save never taken for complete, export/inspect/generate from the bucket, a
data build in the bucket trained through the documented route, and one-line failures for an
unreachable, a missing and a read-only bucket."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from ualm_jax.checkpoint import Checkpointer, load_params, resolve
from ualm_jax.cli import main as ualm
from ualm_jax.config import ConfigError, load_config
from ualm_jax.train.loop import train
from paths import REPO  # noqa: E402

ROOT = str(REPO)
BASE = ["model.preset=tiny", "train.batch_size=8", "train.seq_len=64", "train.log_every=1",
        "train.eval_batches=1", "train.checkpoint_every=0", "optim.warmup_steps=2",
        "optim.learning_rate=1e-2", "optim.schedule=constant", "mesh.ici.fsdp=8"]


def cli_env(**extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env.update(extra)
    return env


def metrics_from(text: str) -> dict:
    recs = [json.loads(x) for x in text.splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


@pytest.fixture(scope="module")
def bucket(gcs):
    return gcs.make_bucket("ualm-test")


def test_train_sigterm_resume_on_gcs_is_bitwise_local(gcs, bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing named gs: may appear here
    url = f"{bucket}/run"
    # First run on the bucket: SIGTERM once a few steps are done; it saves and exits 0.
    proc = subprocess.Popen([sys.executable, "-m", "ualm_jax.cli", "train", "--run-dir", url,
                             *BASE, "train.steps=100000", "train.tensorboard=true"],
                            cwd=tmp_path, env=cli_env(PYTHONPATH=ROOT), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGTERM)
            break
    out = "".join(seen) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "preempted: saved step" in out
    stopped = resolve(url)[2]
    assert stopped >= 3
    # Resume on the bucket to stopped + 3 steps; the same run straight on local disk.
    total = stopped + 3
    resumed = train(load_config(None, BASE + [f"train.steps={total}", "train.tensorboard=true"]), url)
    assert resumed["step"] == total
    straight = train(load_config(None, BASE + [f"train.steps={total}"]), tmp_path / "local")
    remote_losses = metrics_from(gcs.read("ualm-test", "run/metrics.jsonl").decode())
    local_losses = metrics_from((tmp_path / "local" / "metrics.jsonl").read_text())
    assert sorted(remote_losses) == list(range(1, total + 1))
    assert remote_losses == local_losses  # float equality: bitwise
    a, b = jax.tree.leaves(load_params(url)), jax.tree.leaves(straight["state"]["params"])
    assert all(np.array_equal(x, np.asarray(y)) for x, y in zip(a, b))
    names = gcs.objects("ualm-test", "run/")
    for f in ("config.yaml", "params.tsv", "flops.json", "metrics.jsonl"):
        assert f"run/{f}" in names, f
    assert any(n.startswith("run/tensorboard/events") for n in names)
    assert f"run/checkpoints/{total}/commit_success.txt" in names
    assert not any(p.name.startswith("gs") for p in tmp_path.iterdir())


KILL_SAVE = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    from ualm_jax.checkpoint import Checkpointer
    url, delay = sys.argv[1], float(sys.argv[2])
    ck = Checkpointer(url)
    ck.save(1, {"w": np.ones(8, np.float32)}, {"pos": 1}); ck.wait()
    ck.save(2, {"w": np.zeros(8, np.float32), "big": np.arange(1 << 22, dtype=np.float32)}, {"pos": 2})
    time.sleep(delay)
    os.kill(os.getpid(), 9)  # preempted hard in the middle of the asynchronous save
""")


def test_a_killed_save_is_never_taken_for_complete(gcs, bucket):
    partial = 0
    for i, delay in enumerate((0.0, 0.05, 0.1, 0.3)):
        url = f"{bucket}/killed{i}"
        r = subprocess.run([sys.executable, "-c", KILL_SAVE, url, str(delay)], env=cli_env(),
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == -9, r.stderr[-2000:]
        two = [n for n in gcs.objects("ualm-test", f"killed{i}/2/")]
        if two and f"killed{i}/2/commit_success.txt" not in two:
            partial += 1
        # Whatever the save had written, only finalised steps are listed and restored.
        ck = Checkpointer(url, read_only=True)
        assert ck.all_steps() == ([1, 2] if f"killed{i}/2/commit_success.txt" in two else [1])
        if ck.all_steps() == [1]:
            assert resolve(url)[2] == 1
            state, data, step = ck.restore({"w": jax.ShapeDtypeStruct((8,), np.float32)})
            assert step == 1 and data == {"pos": 1} and np.all(np.asarray(state["w"]) == 1)
            # A restarted run saves that step again, completely.
            ck2 = Checkpointer(url, async_save=False)
            ck2.save(2, {"w": np.full(8, 2.0, np.float32)}, {"pos": 2}, force=True)
            ck2.close()
            assert Checkpointer(url, read_only=True).all_steps() == [1, 2]
    assert partial >= 1, "no kill landed inside a save: the test proved nothing"


@pytest.fixture(scope="module")
def tiny_run(gcs, bucket, tmp_path_factory):
    """A tiny trained run with a tokenizer and codec, written to the bucket."""
    from data_pipelines.codecs.spectral import SpectralCodec
    from data_pipelines.tokenizer import TextTokenizer, train_tiny_bpe

    root = tmp_path_factory.mktemp("gcsrun")
    tok = train_tiny_bpe(["a high tone then a noise burst", "a low chirp"] * 20, 300, str(root / "tok"))
    sr = 16000
    t = np.arange(sr) / sr
    waves = [np.sin(2 * np.pi * f * t).astype(np.float32) * 0.5 for f in (220, 440, 880)]
    SpectralCodec.fit(waves, sr, K=4, C=32, seed=0).save(str(root / "codec"))
    url = f"{bucket}/tiny"
    cfg = load_config(None, BASE + ["train.steps=2", f"model.text_vocab_size={TextTokenizer(tok).vocab_size}",
                                    "model.audio_encoder.max_mel_frames=100",
                                    f"data.tokenizer={tok}", f"data.codec={root / 'codec'}"])
    train(cfg, url)
    return url, root


def test_export_inspect_generate_from_the_bucket(gcs, tiny_run, tmp_path, capsys):
    url, _ = tiny_run
    assert ualm(["export", url, "--format", "pytorch", "--out", f"{url}-export"]) == 0
    assert ualm(["export", url, "--format", "pytorch", "--out", str(tmp_path / "export")]) == 0
    remote = sorted(n.split("/", 1)[1] for n in gcs.objects("ualm-test", "tiny-export/"))
    local = sorted(p.name for p in (tmp_path / "export").iterdir())
    assert remote == local and "MANIFEST.sha256" in local
    for name in local:  # identical bytes, file by file
        assert gcs.read("ualm-test", f"tiny-export/{name}") == (tmp_path / "export" / name).read_bytes()
    from ualm_jax.convert.export import verify

    assert verify(f"{url}-export")
    capsys.readouterr()
    assert ualm(["inspect", url, "--json"]) == 0
    ckpt = json.loads(capsys.readouterr().out)
    assert "step 2" in ckpt["title"] and ckpt["total"] > 0
    assert ualm(["inspect", f"{url}-export", "--json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert any(t["name"] == "lm_head.weight" for t in exported["tensors"])
    wav = tmp_path / "tone.wav"
    assert ualm(["generate", "--checkpoint", url, "--task", "text-to-audio", "--prompt", "a low chirp",
                 "--max-new", "24", "--out", str(wav)]) == 0
    assert wav.stat().st_size > 44
    # A second export onto the same URL is refused, not mixed with the first.
    assert ualm(["export", url, "--format", "pytorch", "--out", f"{url}-export"]) == 2
    assert "exists" in capsys.readouterr().err


def test_a_data_build_in_the_bucket_trains_through_the_staging_route(gcs, bucket, tmp_path):
    from data_pipelines.tokenizer import train_tiny_bpe

    rng = np.random.default_rng(0)
    words = "one two three four five six seven eight".split()
    rows = [{"messages": [{"role": "user", "content": " ".join(rng.choice(words, 4))},
                          {"role": "assistant", "content": " ".join(rng.choice(words, 3))}]}
            for _ in range(40)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = train_tiny_bpe(words * 8, 280, str(tmp_path / "tok"))
    data_url = f"{bucket}/data/sft"
    assert ualm(["data", "build", "text-sft", "--manifest", str(tmp_path / "sft.jsonl"),
                 "--out", data_url, "--tokenizer", tok, "--eval-fraction", "0.2"]) == 0
    names = gcs.objects("ualm-test", "data/sft/")
    assert "data/sft/build_report.json" in names and len(names) > 3
    mixture = [f"data.mixture=[{{name: text, path: '{data_url}'}}]", "data.source=mixture"]
    with pytest.raises(ConfigError, match=r"data.mixture\[0\].path=gs://.*data.stage_dir.*gcsfuse"):
        load_config(None, BASE + mixture + ["train.steps=2"])
    cfg = load_config(None, BASE + mixture + ["train.steps=2", f"data.stage_dir={tmp_path / 'stage'}"])
    out = train(cfg, f"{bucket}/data-run")
    assert out["step"] == 2 and np.isfinite(out["first_loss"]["loss"])
    staged = list((tmp_path / "stage").iterdir())
    assert len(staged) == 1 and (staged[0] / "build_report.json").exists()


def _train_cli(url, tmp_path, **env):
    return subprocess.run([sys.executable, "-m", "ualm_jax.cli", "train", "--run-dir", url, *BASE,
                           "train.steps=1", "train.probe_timeout_s=5"], cwd=tmp_path,
                          env=cli_env(PYTHONPATH=ROOT, **env), capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("case", ["unreachable", "missing bucket", "read-only bucket"])
def test_unusable_run_dirs_fail_before_compiling_with_one_line(gcs, bucket, tmp_path, case):
    from gcs_server import free_port

    front = None
    if case == "unreachable":
        dead = f"http://127.0.0.1:{free_port()}"
        r = _train_cli(f"{bucket}/x", tmp_path, **gcs.env(dead))
        expect = ["is not reachable", dead]
    elif case == "missing bucket":
        r = _train_cli("gs://no-such-bucket-here/run", tmp_path)
        expect = ["gs://no-such-bucket-here/run is not writable", gcs.url]
    else:
        front = gcs.read_only_front()
        r = _train_cli(f"{bucket}/ro", tmp_path, **gcs.env(front.url))
        expect = [f"{bucket}/ro is not writable", front.url]
        front.stop()
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    err = [line for line in r.stderr.splitlines() if line.startswith("ualm")]
    assert len(err) == 1, r.stderr[-3000:]
    for text in expect + ["STORAGE_EMULATOR_HOST", "credentials"]:
        assert text in err[0], err[0]
    assert "Traceback" not in r.stderr and "step 1/" not in r.stdout
    assert not any(p.name.startswith("gs") for p in tmp_path.iterdir())


@pytest.mark.slow
def test_two_processes_checkpoint_to_and_resume_from_the_bucket(gcs, bucket, tmp_path):
    """Two processes joined by jax.distributed (launch/local.py) on one gs:// run directory."""
    from test_launch import TINY, launch_local

    config, url = tmp_path / "tiny.yaml", f"{bucket}/two"
    config.write_text(TINY)
    first = launch_local(config, url, "train.steps=2")
    assert "[p0] distributed: process 0 of 2" in first and "[p1] distributed: process 1 of 2" in first
    assert Checkpointer(f"{url}/checkpoints", read_only=True).all_steps() == [2]
    second = launch_local(config, url)
    for i in (0, 1):
        assert f"[p{i}] resumed from step 2" in second
    assert Checkpointer(f"{url}/checkpoints", read_only=True).all_steps()[-1] == 4
    recs = [json.loads(x) for x in gcs.read("ualm-test", "two/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4]
    assert not any(p.name.startswith("gs") for p in tmp_path.iterdir())


def test_import_hf_into_the_bucket_then_train_from_it(gcs, bucket, tmp_path):
    """`ualm import-hf --out gs://...` writes the run layout there; `train.init_from` reads it."""
    from test_convert import make_hf

    make_hf(tmp_path / "hf", tied=False)
    url = f"{bucket}/imported"
    assert ualm(["import-hf", str(tmp_path / "hf"), "--out", url, "model.preset=tiny",
                 "model.text_vocab_size=300"]) == 0
    names = gcs.objects("ualm-test", "imported/")
    assert {"imported/config.yaml", "imported/import_report.json",
            "imported/checkpoints/0/commit_success.txt"} <= set(names)
    imported = load_params(url)
    over = BASE + ["train.steps=1", "model.text_vocab_size=300", f"train.init_from={url}",
                   "optim.learning_rate=0"]
    # The import has no audio encoder (none was asked for): a run with one is refused by name.
    with pytest.raises(ConfigError, match=r"train.init_from=.* holds checkpoints of another model: .*"
                                          r"model.audio_encoder.enabled was False, now True"):
        train(load_config(None, over), tmp_path / "refused")
    cfg = load_config(None, over + ["model.audio_encoder.enabled=false"])
    out = train(cfg, tmp_path / "run")["state"]["params"]
    q = ("decoder", "layers", "self_attn", "q_proj", "kernel")
    a, b = imported, out
    for k in q:
        a, b = a[k], b[k]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # lr 0: the imported weights
