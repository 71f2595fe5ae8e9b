from setuptools import find_packages, setup

setup(
    name="ualm-jax",
    version="0.1.0",
    description="Train UALM-style unified audio language models with JAX on TPU pods and GPUs.",
    python_requires=">=3.10",
    packages=find_packages(include=["ualm_jax", "ualm_jax.*", "data_pipelines", "data_pipelines.*"])
    + ["ualm_jax.configs", "ualm_jax.configs.mixtures", "ualm_jax.configs.models",
       "ualm_jax.configs.sweeps"],
    # The top-level configs/ ships inside the package, so `ualm ... --config demo.yaml` finds the
    # presets by name wherever `ualm` is installed (ualm_jax/config.py: config_path).
    package_dir={"ualm_jax.configs": "configs"},
    package_data={"ualm_jax.configs": ["*.yaml"], "ualm_jax.configs.mixtures": ["*.yaml"],
                  "ualm_jax.configs.models": ["*.yaml"], "ualm_jax.configs.sweeps": ["*.yaml"]},
    install_requires=[
        "jax>=0.10", "flax>=0.12", "optax>=0.2.8", "orbax-checkpoint>=0.12", "grain>=0.2.18",
        "seqio>=0.0.20", "tensorflow-datasets>=4.9", "numpy>=2", "librosa>=0.11", "soundfile",
        "pyyaml", "safetensors", "tensorboardx", "tokenizers", "soxr",
    ],
    extras_require={"torch": ["torch", "transformers"]},
    entry_points={"console_scripts": ["ualm=ualm_jax.cli:main"]},
)
