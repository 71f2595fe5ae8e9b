"""Tests run on CPU with 8 fake devices so sharding is real."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def tiny_cfg():
    from ualm_jax.model.presets import preset_config

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
    from ualm_jax.train.synthetic import stream_for_model

    b = next(stream_for_model(tiny_cfg, batch=4, seq=64, seed=1))
    b.pop("task_ids")
    return b
