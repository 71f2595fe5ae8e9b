"""`ualm bench compile`: ahead-of-time compile of the real train step and its memory report.

The cpu:N path runs everywhere (conftest gives 8 CPU devices); the TPU path needs libtpu
(requirements-tpu.txt) and is skipped without it."""
import importlib.util

import pytest

from ualm_jax.bench_compile import (TpuCompileUnavailable, bench_compile, parse_topology)
from ualm_jax.config import ConfigError


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
