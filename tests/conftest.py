"""Tests run on CPU with 8 fake devices so sharding is real."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

# One XLA compilation cache for the whole run, subprocesses included: the tests compile the same
# tiny train, eval and decode steps many times over (a cached program is the same program, so
# results stay bit for bit what a fresh compile gives). Removed when the session ends.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="ualm-tests-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

# gs:// through fsspec/gcsfs from the first path operation on (see ualm_jax/storage.py), so the
# session-wide GCS server fixture works whatever ran before it.
os.environ.setdefault("EPATH_USE_TF", "false")
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    """Everything under tests/integration/ is marked `integration` (runs the product end to end:
    training, CLIs, servers, processes); tests/unit/ is the fast run (`make test-fast`)."""
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def tiny_cfg():
    from ualm_jax.config import preset_config

    return preset_config("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg):
    from ualm_jax.model.params import build_model

    return build_model(tiny_cfg)


@pytest.fixture(scope="session")
def tiny_params(tiny_model):
    from ualm_jax.model.params import init_params

    params = init_params(tiny_model, jax.random.key(0))
    # Non-trivial stream embeddings, norms and biases so the tests see every term.
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype), params)


@pytest.fixture(scope="session")
def tiny_batch(tiny_cfg):
    from data_pipelines.synthetic import stream_for_model

    b = next(stream_for_model(tiny_cfg, batch=4, seq=64, seed=1))
    b.pop("task_ids")
    return b


@pytest.fixture(scope="session")
def gcs():
    """A GCS-compatible server on 127.0.0.1 for the whole session; clients in this process and
    in child processes (which inherit the environment) reach it instead of Google."""
    from gcs_server import FakeGcs, restore_env, set_env

    server = FakeGcs()
    old = set_env(server.env())
    yield server
    restore_env(old)
    server.stop()


@pytest.fixture(scope="session")
def tiny_xcodec_dir(tmp_path_factory):
    """X-codec's real architecture at toy width (HuBERT + DAC, hop 320, 1024 codes), random
    weights and random codebooks (transformers initialises codebooks to zero), saved like a hub
    checkpoint."""
    torch = pytest.importorskip("torch")
    from transformers import XcodecConfig, XcodecModel

    torch.manual_seed(0)
    cfg = XcodecConfig(
        target_bandwidths=[0.5, 1.0, 2.0], codebook_size=1024,  # 0.5 kbps per codebook at 50 Hz
        acoustic_model_config=dict(encoder_hidden_size=4, decoder_hidden_size=16, hidden_size=8,
                                   downsampling_ratios=[8, 5, 4, 2], upsampling_ratios=[8, 5, 4, 2]),
        semantic_model_config=dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=16, conv_dim=[8] * 7, num_conv_pos_embeddings=16,
                                   num_conv_pos_embedding_groups=2))
    model = XcodecModel(cfg).eval()
    with torch.no_grad():
        for q in model.quantizer.quantizers:
            q.codebook.embed.copy_(torch.randn_like(q.codebook.embed))
    path = tmp_path_factory.mktemp("xcodec")
    model.save_pretrained(path)
    return str(path)


@pytest.fixture
def launcher(monkeypatch):
    """Imports launch/NAME.py as a module, leaving sys.path and sys.modules as they were."""
    import importlib.util
    import sys

    from paths import REPO

    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"_launch_{name}",
                                                      REPO / "launch" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    yield load
    for k in set(sys.modules) - before:  # the launchers' own modules only
        if k.startswith("_launch_") or k in ("shellsafe", "templating", "preflight"):
            del sys.modules[k]
