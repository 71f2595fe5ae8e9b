"""`ualm bench step` runs the real train step over 8 CPU devices and prints one JSON line."""
import json
import os
import subprocess
import sys

import pytest


def _run(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    return subprocess.run([sys.executable, "-m", "ualm_jax.cli", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_bench_step_prints_json():
    r = _run("bench", "step", "--model", "tiny", "--batch", "8", "--seq", "64",
             "--mesh", "data=2,fsdp=2,tensor=2", "--steps", "2", "--warmup", "1",
             "--peak-tflops", "1.0", "--set", "model.loss_objective=consistent")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    rec = json.loads(lines[0])
    for key in ("tokens_per_s", "mfu", "flops_per_token", "step_s", "mesh", "devices", "flop_formula"):
        assert key in rec
    assert rec["devices"] == 8 and rec["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert rec["objective"] == "consistent" and rec["tokens_per_s"] > 0 and rec["mfu"] > 0
    assert rec["loss"] == pytest.approx(rec["loss"]) and rec["loss"] > 0


def test_bench_decode_prints_both_loops():
    r = _run("bench", "decode", "--model", "tiny", "--batch", "4", "--prompt-len", "8",
             "--max-new", "12", "--steps", "1", "--cfg", "2.0", "--devices", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads([x for x in r.stdout.splitlines() if x.startswith("{")][0])
    assert rec["bench"] == "decode" and rec["devices"] == 4 and rec["rows"] == 8
    for loop in ("device_loop", "host_loop"):
        assert rec[loop]["positions_per_s"] > 0 and 1 <= rec[loop]["steps"] <= 13
    # The two loops write the same clips (same seed and keys): the same frames and steps.
    assert rec["device_loop"]["audio_frames"] == rec["host_loop"]["audio_frames"]
    assert rec["device_over_host"] > 0


def test_bench_bad_mesh_is_a_clear_error():
    r = _run("bench", "step", "--model", "tiny", "--mesh", "data=3", "--steps", "1")
    assert r.returncode == 2
    assert "mesh sizes (mesh.ici.data=3) multiply to 3 but 8 devices are present" in r.stderr


def test_bench_data_and_compile_print_json():
    r = _run("bench", "data", "--batch", "2", "--seq", "1024", "--seconds", "0.5")
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads([x for x in r.stdout.splitlines() if x.startswith("{")][0])
    assert rec["bench"] == "data" and rec["packed_tokens_per_s"] > 0
    assert 0 < rec["packing_efficiency"] <= 1 and rec["seq"] == 1024

    r = _run("bench", "compile", "--model", "tiny", "--topology", "cpu:8", "--seq", "64")
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads([x for x in r.stdout.splitlines() if x.startswith("{")][0])
    assert rec["per_chip_bytes"]["total"] > 0 and rec["fits"] is None


def test_bench_import_and_export_report_peak_over_model(tmp_path):
    for what in ("import", "export"):
        r = _run("bench", what, "--model", "tiny", "--workdir", str(tmp_path / what))
        assert r.returncode == 0, r.stderr[-2000:]
        lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
        assert len(lines) == 1
        rec = json.loads(lines[0])
        assert rec["bench"] == what and rec["model"] == "tiny"
        assert rec["model_bytes_fp32"] > 0 and rec["peak_rss_bytes"] > 0
        assert rec["peak_over_model"] == rec["peak_rss_bytes"] / rec["model_bytes_fp32"]
