"""`ualm bench compile` and `ualm train --dry-run --topology`: ahead-of-time compile of the real
train step of a config or preset, and its memory report.

The cpu:N path runs everywhere (conftest gives 8 CPU devices); the TPU path needs libtpu
(requirements-tpu.txt) and is skipped without it."""
import importlib.util
import json

import pytest

from paths import REPO
from ualm_jax.tools.bench_compile import bench_compile, parse_topology
from ualm_jax.cli import main
from ualm_jax.config import ConfigError, load_config
from ualm_jax.tools.describe import describe_config
from ualm_jax.train.dry_run import dry_run
from ualm_jax.train.topology_compile import TpuCompileUnavailable, plan_for


def test_cpu_topology_compiles_the_train_step():
    rec = bench_compile(model="tiny", topology="cpu:8", seq=32, mesh="data=2,fsdp=2,tensor=2")
    assert rec["chips"] == 8 and rec["platform"] == "cpu"
    assert rec["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert rec["batch"] == 4 and rec["seq"] == 32  # default: one sequence per data x fsdp shard
    mem = rec["per_chip_bytes"]
    assert mem["argument"] > 0 and mem["output"] > 0 and mem["temp"] > 0
    assert mem["generated_code"] >= 0
    assert mem["total"] == (mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
                            + mem["generated_code"])
    assert mem["total"] >= mem["argument"]
    assert rec["fits"] is None and rec["hbm_bytes"] is None
    assert rec["compile_s"] > 0 and rec["model_flops_per_step"] > 0
    assert rec["flops_per_step"] is None or rec["flops_per_step"] > 0


@pytest.mark.parametrize("name,generation,grid,chips", [
    ("v5p-128", "v5p", (4, 4, 4), 64), ("v5p-8", "v5p", (2, 2, 1), 4),
    ("v4-32", "v4", (2, 2, 4), 16), ("v5e-8", "v5e", (2, 4), 8),
    ("v5litepod-256", "v5e", (16, 16), 256), ("v6e-32", "v6e", (4, 8), 32),
    ("v5p:4x4x12", "v5p", (4, 4, 12), 192),
])
def test_topology_names(name, generation, grid, chips):
    t = parse_topology(name)
    assert (t.platform, t.generation, t.grid, t.chips) == ("tpu", generation, grid, chips)
    assert t.hbm_bytes > 0


@pytest.mark.parametrize("name,message", [
    ("bogus-8", "--topology 'bogus-8' is unknown"),
    ("v5p-12", "is not a power of two"),
    ("v5p-7", "multiple of 2"),
    ("v5e:2x2x2", "2 positive dimensions"),
    ("cpu:0", "N >= 1"),
])
def test_bad_topology_is_a_clear_error(name, message):
    with pytest.raises(ConfigError, match=message):
        bench_compile(model="tiny", topology=name)


def test_cpu_topology_larger_than_the_devices_is_a_clear_error():
    with pytest.raises(ConfigError, match="needs 64 CPU devices but JAX has 8"):
        bench_compile(model="tiny", topology="cpu:64")


def test_batch_that_does_not_split_over_the_mesh_is_a_clear_error():
    with pytest.raises(ConfigError, match="data x fsdp = 8 batch shards: use a multiple of 8"):
        bench_compile(model="tiny", topology="cpu:8", batch=4)


def test_missing_libtpu_names_the_package_and_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "libtpu" else real(name, *a))
    monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
    with pytest.raises(TpuCompileUnavailable, match=r"needs libtpu \(libtpu==0\.0\.42\.\*.*"
                                                   r"pip install .*-r requirements-tpu\.txt"):
        bench_compile(model="tiny", topology="v5p-8")


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu not installed (pip install -r requirements-tpu.txt)")
def test_tpu_topology_compiles_without_a_tpu():
    rec = bench_compile(model="tiny", topology="v5e-4", seq=32)
    assert rec["platform"] == "tpu" and rec["device_kind"] == "TPU v5 lite" and rec["chips"] == 4
    assert rec["libtpu_topology"] == "v5e:2x2" and rec["mesh"]["fsdp"] == 4
    assert rec["per_chip_bytes"]["argument"] > 0 and rec["per_chip_bytes"]["generated_code"] > 0
    assert rec["hbm_bytes"] == 16 * 1024 ** 3 and rec["fits"] is True


# --- What is compiled: the user's config, not the --model default ------------------------------

GEN_15B = REPO / "configs" / "ualm_gen_1.5b.yaml"
SMALL = """model: {preset: tiny, remat: dots}
mesh: {ici: {data: 1, fsdp: -1, tensor: 1}}
train: {batch_size: 16, seq_len: 64, microbatches: 2}
"""


def _cli(capsys, *argv):
    """(exit code, the stdout JSON record or None, stderr lines) of `ualm ARGV` in-process."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    lines = [line for line in out.out.splitlines() if line.strip()]
    rec = json.loads(lines[0]) if len(lines) == 1 and lines[0].startswith("{") else None
    return rc, rec, out.err.splitlines(), out.out


def test_bench_compile_compiles_the_config_not_the_preset(capsys):
    # The reported bug: --config was ignored and the tiny preset compiled. The 1.5B config at a
    # short sequence (an override) and a small batch (a flag): abstract inputs, nothing allocated.
    rc, rec, err, _ = _cli(capsys, "bench", "compile", "--config", GEN_15B, "--topology", "cpu:8",
                           "train.seq_len=64", "--batch", "8")
    assert rc == 0, err
    want = load_config(GEN_15B)
    assert rec["config"] == str(GEN_15B) and rec["overrides"] == ["train.seq_len=64"]
    assert rec["model"] == "1.5b" and rec["model_dims"]["d_model"] == want.model.d_model == 1536
    assert rec["model_dims"]["n_layers"] == 28 and rec["model_dims"]["d_ff"] == 8960
    assert rec["model_dims"]["audio_encoder"]["n_layers"] == 32
    assert rec["parameters"] == {k: describe_config(want)["parameters"][k]
                                 for k in ("total", "trainable")}
    assert rec["parameters"]["total"] > 2e9
    assert rec["seq"] == 64 and rec["batch"] == 8  # the override and the flag
    assert rec["remat"] == "full" and rec["tasks"] == ["t2a"]  # from the config (tiny: none)
    assert rec["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert rec["batch_spec"]["tokens"][0][:2] == [8, 64]
    assert rec["per_chip_bytes"]["argument"] > 1e9  # 1.5B parameters' state over 8 chips
    # Progress on stderr, the JSON alone on stdout.
    assert any(line.startswith(f"config {GEN_15B}") and "2.44B parameters" in line for line in err)
    assert "compiling the train step for cpu:8 ..." in "\n".join(err)
    assert any(line.startswith("compiled in ") for line in err)


def test_config_values_apply_and_the_flags_override_them(tmp_path, capsys):
    cfg = tmp_path / "small.yaml"
    cfg.write_text(SMALL)
    rc, rec, err, _ = _cli(capsys, "bench", "compile", "--config", cfg, "--topology", "cpu:8")
    assert rc == 0, err
    assert (rec["batch"], rec["seq"], rec["microbatches"], rec["remat"]) == (16, 64, 2, "dots")
    assert rec["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and rec["model"] == "tiny"
    rc, rec, err, _ = _cli(capsys, "bench", "compile", "--config", cfg, "--topology", "cpu:8",
                           "--batch", "8", "--seq", "32", "--microbatches", "1",
                           "--mesh", "data=2,fsdp=2,tensor=2", "model.remat=full")
    assert rc == 0, err
    assert (rec["batch"], rec["seq"], rec["microbatches"], rec["remat"]) == (8, 32, 1, "full")
    assert rec["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}


def test_preset_overrides_of_the_train_shape_are_honoured(capsys):
    rc, rec, err, _ = _cli(capsys, "bench", "compile", "--model", "tiny", "--topology", "cpu:8",
                           "train.seq_len=48", "train.microbatches=2")
    assert rc == 0, err
    assert rec["config"] is None and rec["model"] == "tiny"
    assert (rec["seq"], rec["microbatches"], rec["batch"]) == (48, 2, 16)  # 8 shards x 2


def test_model_and_config_together_is_one_line(capsys):
    rc, rec, err, out = _cli(capsys, "bench", "compile", "--config", GEN_15B, "--model", "7b",
                             "--topology", "cpu:8")
    assert rc == 2 and out == "" and len(err) == 1
    assert "--model 7b and --config" in err[0] and "model.preset=7b" in err[0]


@pytest.mark.parametrize("what", ["step", "decode", "export", "import"])
def test_benches_without_config_refuse_it(what, tmp_path, capsys):
    # Only `bench data` and `bench compile` have --config: argparse refuses it for the others.
    with pytest.raises(SystemExit) as e:
        _cli(capsys, "bench", what, "--config", GEN_15B, "--workdir", tmp_path / "w")
    out = capsys.readouterr()
    assert e.value.code == 2 and out.out == ""
    assert "unrecognized arguments: --config" in out.err.splitlines()[-1]
    assert list(tmp_path.iterdir()) == []  # refused before doing anything


def test_train_dry_run_for_a_topology_is_the_bench_compile(tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "small.yaml"
    cfg.write_text(SMALL)
    monkeypatch.chdir(tmp_path)
    rc, _, err, out = _cli(capsys, "train", "--config", cfg, "--dry-run", "--topology", "cpu:8",
                           "train.seq_len=32")
    assert rc == 0, err
    assert out.startswith("dry run for cpu:8: nothing written, no data read")
    assert f"config {cfg} + train.seq_len=32: model tiny (d_model 64" in out
    assert "batch 16 x seq 32, microbatches 2" in out and "per chip at peak" in out
    assert "compiling the train step for cpu:8 ..." in "\n".join(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.yaml"]  # nothing written
    # The same compile as `ualm bench compile --config`: the same memory to the byte.
    over = ["train.seq_len=32"]
    a = dry_run(load_config(cfg, over), "cpu:8", str(cfg), over, progress=None)
    b = bench_compile(config=str(cfg), overrides=over, topology="cpu:8", progress=None)
    assert a["per_chip_bytes"] == b["per_chip_bytes"] and a["per_chip_bytes"]["total"] > 0
    assert {k: v for k, v in a.items() if not k.endswith("_s") and k != "warnings"} == \
        {k: v for k, v in b.items() if not k.endswith("_s")}


def test_topology_without_dry_run_is_refused(capsys):
    rc, _, err, out = _cli(capsys, "train", "--topology", "v5e-8", "model.preset=tiny")
    assert rc == 2 and out == "" and len(err) == 1 and "add --dry-run" in err[0]


@pytest.mark.parametrize("argv", [
    ["bench", "compile", "--config", GEN_15B, "--topology", "v5e-8"],
    ["train", "--config", GEN_15B, "--dry-run", "--topology", "v5p-128"],
])
def test_tpu_topology_without_libtpu_is_one_line(argv, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "libtpu" else real(name, *a))
    monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
    rc, _, err, out = _cli(capsys, *argv)
    assert rc == 2 and out == "" and len(err) == 1
    assert "needs libtpu" in err[0] and "requirements-tpu.txt" in err[0]


def test_out_of_hbm_is_a_does_not_fit_answer(tmp_path, capsys, monkeypatch):
    # XLA:TPU refuses to compile a step larger than HBM; that refusal is the answer, not a crash.
    # (Without libtpu the refusal is simulated on cpu:8; `fits` needs a TPU topology's HBM.)
    import jax.stages

    def refuse(self, *a, **k):
        raise RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory "
                           "required for HLO temporaries (61.23G) exceeds available HBM (15.75G).")

    monkeypatch.setattr(jax.stages.Lowered, "compile", refuse)
    cfg = tmp_path / "small.yaml"
    cfg.write_text(SMALL)
    monkeypatch.chdir(tmp_path)
    rc, _, err, out = _cli(capsys, "train", "--config", cfg, "--dry-run", "--topology", "cpu:8")
    assert rc == 1, err
    assert "does NOT fit" in out and "HLO temporaries (61.23G)" in out
    rc, rec, err, _ = _cli(capsys, "bench", "compile", "--config", cfg, "--topology", "cpu:8")
    assert rc == 0 and rec["fits"] is False and rec["per_chip_bytes"] is None
    assert rec["compile_error"].startswith("Ran out of memory on HBM")
    assert any(line.startswith("does NOT fit: Ran out of memory") for line in err)


def test_other_compile_failures_still_raise(monkeypatch):
    import jax.stages

    def broken(self, *a, **k):
        raise RuntimeError("INTERNAL: something else")

    monkeypatch.setattr(jax.stages.Lowered, "compile", broken)
    with pytest.raises(RuntimeError, match="INTERNAL: something else"):
        bench_compile(model="tiny", topology="cpu:8", seq=32, progress=None)


def test_online_dpo_is_refused_before_loading_a_reference():
    cfg = load_config(None, ["model.preset=tiny"])
    cfg.train.mode, cfg.dpo.reference = "dpo", "online"
    with pytest.raises(ConfigError, match="dpo.reference=online cannot be compiled ahead of time"):
        plan_for(cfg, "cpu:8")


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu not installed (pip install -r requirements-tpu.txt)")
def test_the_15b_config_does_not_fit_v5e_8_unaccumulated(capsys):
    # 256 x 4096 in one pass on 8 x 16 GiB: XLA:TPU's refusal comes back as fits=false.
    rc, rec, err, _ = _cli(capsys, "bench", "compile", "--config", GEN_15B, "--topology", "v5e-8")
    assert rc == 0, err
    assert rec["model"] == "1.5b" and rec["parameters"]["total"] > 2e9 and rec["batch"] == 256
    assert rec["fits"] is False and "HBM" in rec["compile_error"]
