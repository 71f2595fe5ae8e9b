"""Training runs on the tiny model over 8 CPU devices: resume, preemption, meshes, freezing,
accumulation, metrics, NaN handling, run-dir errors."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ualm_jax.checkpoint import Checkpointer, with_shardings
from ualm_jax.config import ConfigError, load_config
from ualm_jax.model.params import build_model
from ualm_jax.sharding import make_mesh, parse_mesh_arg
from ualm_jax.train.loop import NonFiniteLoss, train
from ualm_jax.train.setup import model_and_optimizer
from ualm_jax.train.optim import make_optimizer
from ualm_jax.train.state import abstract_state, create_state, state_shardings
from ualm_jax.train.step import make_train_step
from paths import REPO  # noqa: E402

BASE = ["model.preset=tiny", "train.batch_size=8", "train.seq_len=64", "train.log_every=1",
        "train.eval_batches=1", "train.checkpoint_every=0", "train.tensorboard=false",
        "optim.warmup_steps=2", "optim.learning_rate=1e-2", "mesh.ici.fsdp=8"]


def cfg_with(*extra):
    return load_config(None, BASE + list(extra))


def losses(run_dir):
    recs = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def params_equal(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_resume_is_bitwise_exact(tmp_path):
    cfg = cfg_with("train.steps=6")
    straight = train(cfg, tmp_path / "a")
    first = train(cfg, tmp_path / "b", max_steps_this_run=3)
    assert first["step"] == 3 and first["preempted"]
    second = train(cfg, tmp_path / "b")
    assert second["step"] == 6
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(la) == sorted(lb) == list(range(1, 7))
    assert la == lb  # float equality: bitwise
    assert params_equal(straight["state"]["params"], second["state"]["params"])


def test_metrics_file_and_start_files(tmp_path):
    cfg = cfg_with("train.steps=3", "train.eval_every=3", "train.tensorboard=true")
    train(cfg, tmp_path)
    recs = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    step_recs = [r for r in recs if "loss" in r]
    assert [r["step"] for r in step_recs] == [1, 2, 3]
    for key in ("loss", "grad_norm", "lr", "tokens_per_s", "mfu", "loss/stream_0", "loss/stream_3",
                "loss/text", "skipped_steps", "task_mix"):
        assert key in step_recs[-1], key
    assert all(np.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in step_recs)
    evals = [r for r in recs if "eval/loss" in r]
    assert len(evals) == 1 and "eval/loss/t2a" in evals[0]
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "flops.json").exists()
    table = (tmp_path / "params.tsv").read_text()
    assert "decoder/layers/self_attn/q_proj/kernel\t2x64x4x16\tfloat32\tlayers,embed,heads,head_dim\tNone,fsdp" in table
    assert any(f.name.startswith("events") for f in (tmp_path / "tensorboard").iterdir())
    assert load_config(tmp_path / "config.yaml").train.steps == 3  # the resolved config reloads


def test_align_stage_freezes_all_but_audio_rows(tmp_path):
    cfg = cfg_with("train.steps=2", "train.stage=align")
    model = build_model(cfg.model)
    init = create_state(model, make_optimizer(cfg.optim, 2), None, jax.random.key(cfg.seed))["params"]
    out = train(cfg, tmp_path)["state"]["params"]
    v = model.vocab
    for name in ("embed", "head"):
        a, b = np.asarray(init[name]), np.asarray(out[name])
        assert np.array_equal(a[:v.audio_offset], b[:v.audio_offset]), name  # text rows
        assert np.array_equal(a[v.size:], b[v.size:]), name  # padding rows
        assert not np.array_equal(a[v.audio_offset:v.size], b[v.audio_offset:v.size]), name
    for top in ("decoder", "audio_encoder"):
        assert params_equal(init[top], out[top]), top
    assert not params_equal(init["adaptor"], out["adaptor"])


def test_full_stage_keeps_audio_encoder_and_freeze_globs(tmp_path):
    cfg = cfg_with("train.steps=2", "train.freeze=[decoder/layers/mlp/*]")
    model = build_model(cfg.model)
    init = create_state(model, make_optimizer(cfg.optim, 2), None, jax.random.key(cfg.seed))["params"]
    out = train(cfg, tmp_path)["state"]["params"]
    assert params_equal(init["audio_encoder"], out["audio_encoder"])  # no weight decay either
    assert params_equal(init["decoder"]["layers"]["mlp"], out["decoder"]["layers"]["mlp"])
    assert not params_equal(init["decoder"]["layers"]["self_attn"], out["decoder"]["layers"]["self_attn"])


def test_gradient_accumulation_equals_large_batch(tiny_batch):
    cfg = cfg_with()
    model = build_model(cfg.model)
    tx = make_optimizer(cfg.optim, 10)
    one = jax.devices()[0]
    state = jax.device_put(create_state(model, tx, None, jax.random.key(0)), one)
    batch = jax.device_put(tiny_batch, one)
    results = []
    for mb in (1, 2, 4):
        step = jax.jit(make_train_step(model, tx, microbatches=mb))
        new_state, metrics = step(state, batch)
        results.append((float(metrics["loss"]), new_state["params"]))
    for loss, params in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                             atol=1e-6, rtol=1e-5),
                     params, results[0][1])


def test_restore_onto_another_mesh(tmp_path):
    cfg = cfg_with("train.steps=2")
    saved = train(cfg, tmp_path)["state"]
    for mesh_arg in ("data=2,fsdp=2,tensor=2", "tensor=4,fsdp=2"):
        cfg2 = cfg_with("train.steps=2")
        cfg2.mesh.ici = parse_mesh_arg(mesh_arg)
        mesh = make_mesh(cfg2.mesh)
        model, tx, _, _ = model_and_optimizer(cfg2)
        shardings, _ = state_shardings(model, tx, mesh, cfg2.mesh.rules)
        ck = Checkpointer(tmp_path / "checkpoints", read_only=True)
        state, data_state, step = ck.restore(with_shardings(abstract_state(model, tx), shardings))
        assert step == 2 and data_state == {"step": 2}
        q = state["params"]["decoder"]["layers"]["self_attn"]["q_proj"]["kernel"]
        assert q.sharding.is_equivalent_to(
            shardings["params"]["decoder"]["layers"]["self_attn"]["q_proj"]["kernel"], q.ndim)
        assert params_equal(state["params"], saved["params"])
    # And training continues on the new mesh from the same run dir.
    cfg3 = cfg_with("train.steps=3")
    cfg3.mesh.ici = parse_mesh_arg("data=2,fsdp=2,tensor=2")
    assert train(cfg3, tmp_path)["step"] == 3


def test_nan_steps_are_skipped_or_stop(tmp_path):
    cfg = cfg_with("train.steps=4", "optim.learning_rate=1e30", "optim.clip_norm=0",
                   "optim.warmup_steps=0", "optim.schedule=constant")
    out = train(cfg, tmp_path / "skip")
    assert out["skipped_steps"] >= 1
    recs = [json.loads(x) for x in open(tmp_path / "skip" / "metrics.jsonl") if '"skipped"' in x]
    assert recs[-1]["skipped_steps"] == out["skipped_steps"]
    cfg.train.nan_policy = "stop"
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss, gradient or update at step \d+ .*task mix"):
        train(cfg, tmp_path / "stop")


def test_non_finite_update_with_finite_loss_and_gradient_is_skipped(tmp_path):
    # eps=0 (refused at load; set behind validation's back here) divides 0 by 0 in AdamW for every
    # parameter with a zero gradient (unused vocabulary rows): loss and gradient stay finite, the
    # update does not. It must never reach the weights or the checkpoint.
    cfg = cfg_with("train.steps=2")
    cfg.optim.eps = 0.0
    out = train(cfg, tmp_path / "skip")
    assert out["skipped_steps"] == 2
    recs = [json.loads(x) for x in open(tmp_path / "skip" / "metrics.jsonl") if '"skipped"' in x]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in recs)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(out["state"]["params"]))
    model, tx, _, _ = model_and_optimizer(cfg)
    shardings, _ = state_shardings(model, tx, make_mesh(cfg.mesh), cfg.mesh.rules)
    init = create_state(model, tx, shardings, jax.random.key(cfg.seed))
    assert params_equal(out["state"]["params"], init["params"])  # never updated
    cfg.train.nan_policy = "stop"
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss, gradient or update at step 1 "):
        train(cfg, tmp_path / "stop")


def _catches_sigterm(pid: int) -> bool:
    """Whether process `pid` has a SIGTERM handler installed (Linux /proc SigCgt mask)."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    except OSError:
        pass
    return False


def test_sigterm_during_start_up_exits_zero_with_nothing_trained(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    cmd = [sys.executable, "-m", "ualm_jax.cli", "train", "--run-dir", str(run), "train.steps=5"] + BASE
    root = str(REPO)
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    # As soon as the handler is in (the first thing `ualm train` does; /proc tells), or after 1 s.
    while time.time() - started < (30 if os.path.exists(f"/proc/{proc.pid}/status") else 1):
        if _catches_sigterm(proc.pid):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "stopped before the first step: nothing was trained" in out
    assert "preempted: saved step" not in out
    assert not (run / "checkpoints").exists() or \
        not Checkpointer(run / "checkpoints", read_only=True).all_steps()


def test_sigterm_recorded_before_the_loop_stops_before_the_first_step(tmp_path, monkeypatch):
    from ualm_jax import sigterm
    from ualm_jax.train import data as data_lib

    train(cfg_with("train.steps=1"), tmp_path)  # a resumed run: its checkpoint stays as it was
    before = Checkpointer(tmp_path / "checkpoints", read_only=True).all_steps()
    opened = data_lib.make_train_iterator

    def open_then_terminated(cfg):  # SIGTERM arrives in the middle of set-up
        it = opened(cfg)
        os.kill(os.getpid(), signal.SIGTERM)
        return it

    monkeypatch.setattr(data_lib, "make_train_iterator", open_then_terminated)
    sigterm.install()
    try:
        out = train(cfg_with("train.steps=3"), tmp_path)
        assert out["nothing_trained"] and out["preempted"] and out["step"] == 1
        assert Checkpointer(tmp_path / "checkpoints", read_only=True).all_steps() == before == [1]
        # Recorded before train() starts: it returns at once, touching nothing.
        assert train(cfg_with("train.steps=3"), tmp_path / "fresh")["nothing_trained"]
        assert not (tmp_path / "fresh").exists()
    finally:
        sigterm.restore()
    assert not sigterm.requested()


def test_run_dir_errors(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="is not writable"):
        train(cfg_with("train.steps=1"), blocker / "run")
    with pytest.raises(ConfigError, match=r"GiB free, but one checkpoint takes"):
        train(cfg_with("train.steps=1", "train.min_free_disk_factor=1e12"), tmp_path / "r")
    # A failed start leaves no half-made run dir: the new folder is gone, an empty one stays empty.
    assert not (tmp_path / "r").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError):
        train(cfg_with("train.steps=1", "train.min_free_disk_factor=1e12"), tmp_path / "empty")
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())


def test_a_random_frozen_encoder_is_named_at_start(tmp_path, capsys):
    train(cfg_with("train.steps=1", "model.audio_encoder.frozen=true"), tmp_path / "a")
    out = capsys.readouterr().out
    assert "warning: the audio encoder is randomly initialised and frozen " \
           "(model.audio_encoder.frozen=true, no train.init_from)" in out
    # Only a frozen encoder that nothing loads is named (the rule, without training again).
    from ualm_jax.train.freeze import random_frozen_encoder

    assert random_frozen_encoder(cfg_with("model.audio_encoder.frozen=false")) is None
    assert random_frozen_encoder(cfg_with("train.init_from=somewhere")) is None
    assert random_frozen_encoder(cfg_with("model.audio_encoder.enabled=false")) is None
    assert "train.stage=align" in random_frozen_encoder(
        cfg_with("model.audio_encoder.frozen=false", "train.stage=align"))
    assert "train.freeze glob" in random_frozen_encoder(
        cfg_with("model.audio_encoder.frozen=false", "train.freeze=[audio_encoder/*]"))


def test_resume_with_another_model_is_refused(tmp_path):
    train(cfg_with("train.steps=1"), tmp_path)
    before = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"holds checkpoints of another model: model.d_ff was 128, now 256"):
        train(cfg_with("train.steps=2", "model.d_ff=256"), tmp_path)
    # The refused start wrote nothing: the run's records are as they were.
    assert (tmp_path / "config.yaml").read_text() == before
    assert not (tmp_path / "config_history").exists()


def test_sigterm_saves_and_exits_zero(tmp_path):
    run = tmp_path / "run"
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  steps: 100000\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    cmd = [sys.executable, "-m", "ualm_jax.cli", "train", "--config", str(config),
           "--run-dir", str(run)] + BASE
    root = str(REPO)
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "preempted: saved step" in out
    steps = Checkpointer(run / "checkpoints", read_only=True).all_steps()
    assert len(steps) == 1 and 3 <= steps[0] < 100000


def test_one_trainer_per_run_dir_and_stale_leases_are_taken_over(tmp_path):
    import socket

    from ualm_jax.train.lease import LEASE_FILE

    run = tmp_path / "run"
    run.mkdir()
    cfg = cfg_with("train.steps=1")
    # A live holder on this host (this test's parent process stands in for another trainer).
    live = {"host": socket.gethostname(), "pid": os.getppid(), "started": time.time(),
            "heartbeat": time.time()}
    (run / LEASE_FILE).write_text(json.dumps(live))
    with pytest.raises(ConfigError, match=rf"in use by another trainer \(host {socket.gethostname()}, "
                                          rf"pid {os.getppid()}, started"):
        train(cfg, run)
    # Another host with a fresh heartbeat: refused; with a stale one: taken over.
    (run / LEASE_FILE).write_text(json.dumps({**live, "host": "elsewhere", "pid": 1}))
    with pytest.raises(ConfigError, match="host elsewhere, pid 1"):
        train(cfg, run)
    (run / LEASE_FILE).write_text(json.dumps({**live, "host": "elsewhere", "heartbeat": time.time() - 600}))
    assert train(cfg, run)["step"] == 1
    assert not (run / LEASE_FILE).exists()  # released at the end
    # A holder on this host whose process is gone: taken over.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / LEASE_FILE).write_text(json.dumps({**live, "pid": dead.pid}))
    assert train(cfg_with("train.steps=2"), run)["step"] == 2


def test_a_second_trainer_on_a_live_run_dir_refuses(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    root = str(REPO)
    first = subprocess.Popen([sys.executable, "-m", "ualm_jax.cli", "train", "--run-dir", str(run),
                              *BASE, "train.steps=100000"], cwd=root, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in first.stdout:
            if line.startswith("step 1/"):
                break
        second = subprocess.run([sys.executable, "-m", "ualm_jax.cli", "train", "--run-dir", str(run),
                                 *BASE, "train.steps=100000"], cwd=root, env=env,
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stdout[-2000:]
        assert f"pid {first.pid}" in second.stderr and "in use by another trainer" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 0


def test_resume_records_config_changes_provenance_trackers_and_profile(tmp_path, monkeypatch,
                                                                        capsys):
    """A resume with another learning rate prints the change and keeps both configs with the step
    each took effect; every start appends its provenance; train.trackers=[wandb] logs an offline
    W&B run; train.profile_steps writes a profiler trace of those steps."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    extra = ["train.steps=4", "train.trackers=[wandb]", "train.profile_steps=[2,2]"]
    train(cfg_with(*extra), run, max_steps_this_run=2)
    assert not (run / "config_history").exists()  # nothing changed yet
    train(cfg_with(*extra, "optim.learning_rate=5e-3"), run)
    out = capsys.readouterr().out
    assert "resuming at step 2 with a changed config" in out and "optim.learning_rate: 0.01 -> 0.005" in out
    history = sorted(p.name for p in (run / "config_history").iterdir())
    assert history == ["step_0.yaml", "step_2.yaml"]
    assert load_config(run / "config_history" / "step_0.yaml").optim.learning_rate == 1e-2
    assert load_config(run / "config.yaml").optim.learning_rate == 5e-3
    starts = [json.loads(x) for x in (run / "provenance.jsonl").read_text().splitlines()]
    assert [s["step"] for s in starts] == [0, 2]
    assert starts[0]["versions"]["jax"] == jax.__version__ and starts[0]["devices"] == {"cpu": 8}
    assert starts[0]["command"] and starts[0]["host"]
    offline = list((run / "wandb").glob("offline-run-*"))
    assert offline and any(offline[0].rglob("*.wandb"))
    traces = list((run / "profile").rglob("*.xplane.pb"))
    assert traces, list((run / "profile").rglob("*"))
    assert "profile of steps 2..2" in out
