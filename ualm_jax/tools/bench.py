"""`ualm bench step`: the real train step on whatever devices exist; one JSON line per run."""
from __future__ import annotations

import json
import time

import jax
import numpy as np

from data_pipelines.synthetic import TASKS, stream_for_model
from ualm_jax.config import Config, ConfigError, load_config
from ualm_jax.format.batch import batch_spec, check_batch
from ualm_jax.model.flops import FORMULA, audio_windows, batch_step_flops
from ualm_jax.model.params import build_model
from ualm_jax.sharding import parse_mesh_arg, shard_batch
from ualm_jax.train import freeze
from ualm_jax.train.mfu import mfu, peak_flops_per_device
from ualm_jax.train.setup import setup_training
from ualm_jax.train.state import create_state


def bench_config(model: str, mesh: str | None, text_only: bool = False, overrides=()) -> Config:
    """The config every bench builds its step from: the preset, overrides, and `--mesh`."""
    over = [f"model.preset={model}"] + list(overrides)
    if text_only:
        over += ["model.num_codebooks=0", "model.audio_encoder.enabled=false"]
    cfg: Config = load_config(None, over)
    if mesh:
        cfg.mesh.ici = parse_mesh_arg(mesh)
    return cfg


def bench_host_batch(cfg: Config, batch: int, seq: int, text_only: bool = False) -> dict:
    """One synthetic batch of the batch contract for `cfg` (real encoder windows and masks,
    data.max_clips_per_row clip slots), every position supervised: the bench measures the step,
    not the data."""
    stream = stream_for_model(cfg.model, batch, seq, seed=cfg.seed, text_only=text_only,
                              max_clips=cfg.data.max_clips_per_row)
    host_batch = next(stream)
    host_batch["loss_weights"] = np.where(host_batch["tokens"] > 0, 1.0, 0.0).astype(np.float32)
    return host_batch


def bench_setup(cfg: Config, batch: int, seq: int, microbatches: int = 1, devices=None):
    """The training setup (train/setup.py) for a bench: `ualm train`'s step, freeze masks and
    task ids, on a global batch of `batch` x `seq`."""
    cfg.train.seq_len, cfg.train.microbatches = seq, microbatches
    cfg.train.batch_size = batch
    return setup_training(cfg, TASKS, devices=devices, rows=batch)


def bench_step(model: str, batch: int, seq: int, mesh: str | None, steps: int, warmup: int = 2,
               text_only: bool = False, microbatches: int = 1, overrides=(),
               peak_tflops: float | None = None) -> dict:
    cfg = bench_config(model, mesh, text_only, overrides)
    if batch % microbatches:
        raise ConfigError(f"--batch={batch} must be divisible by --microbatches={microbatches}")
    t0 = time.perf_counter()
    setup = bench_setup(cfg, batch, seq, microbatches)
    host_batch = bench_host_batch(cfg, batch, seq, text_only)
    check_batch(host_batch, batch_spec(cfg, batch), "bench batch")
    dev_batch = shard_batch(host_batch, setup.mesh, cfg.mesh.rules)
    state = create_state(setup.model, setup.tx, setup.shardings, jax.random.key(cfg.seed))
    compiled = setup.step_fn.lower(state, dev_batch).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, metrics = compiled(state, dev_batch)
    jax.block_until_ready(state)
    t1 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, dev_batch)
    jax.block_until_ready(state)
    step_s = (time.perf_counter() - t1) / max(steps, 1)
    tokens_per_s = batch * seq / step_s
    flops = batch_step_flops(cfg.model, host_batch, freeze.adapter_trained(setup.trainable))
    n_dev = setup.mesh.devices.size
    peak = peak_tflops * 1e12 if peak_tflops else peak_flops_per_device()
    return {
        "bench": "step", "model": model, "text_only": text_only, "batch": batch, "seq": seq,
        "microbatches": microbatches, "objective": cfg.model.loss_objective,
        "remat": cfg.model.remat, "dtype": cfg.model.dtype,
        "mesh": {k: int(v) for k, v in setup.mesh.shape.items()}, "devices": n_dev,
        "device_kind": jax.devices()[0].device_kind, "backend": jax.default_backend(),
        "steps": steps, "step_s": step_s, "tokens_per_s": tokens_per_s,
        "flops_per_step": flops, "flops_per_token": flops["total"] / (batch * seq),
        "flop_formula": FORMULA, "audio_windows": audio_windows(host_batch),
        "peak_flops_per_device": peak, "mfu": mfu(flops["total"] / step_s, n_dev, peak),
        "compile_s": compile_s, "loss": float(metrics["loss"]),
    }


def print_json(record: dict) -> None:
    print(json.dumps(record), flush=True)


def _dir_bytes(path) -> int:
    from pathlib import Path

    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def params_bytes_fp32(model_cfg) -> int:
    """The model's parameter count x 4 bytes (the fp32 size the memory ratios are against)."""
    from ualm_jax.model.params import abstract_params

    shapes, _ = abstract_params(build_model(model_cfg))
    return 4 * sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def _child_peak_rss(code: str, *argv) -> tuple[int, float, bool]:
    """(peak resident bytes of a CPU-only child running `code`, its seconds, whether an earlier
    child of this process may have set the peak instead)."""
    import os
    import resource
    import subprocess
    import sys

    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    subprocess.run([sys.executable, "-c", code, *map(str, argv)], check=True, env=env)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    return peak, seconds, before != 0


def write_random_hf_qwen2(model_cfg, dest, seed: int = 0, tied: bool = True) -> int:
    """A random HF Qwen2 checkpoint (config.json + model.safetensors, fp32) with the backbone
    shapes of `model_cfg`; returns its tensor bytes."""
    import json
    from pathlib import Path

    from safetensors.numpy import save_file

    from ualm_jax.convert.hf_qwen2 import HF_LAYER, _expected_hf_shape, _layer_map

    m, dest = model_cfg, Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {"model.embed_tokens.weight": rng.standard_normal(
        (m.text_vocab_size, m.d_model), dtype=np.float32) * np.float32(0.02),
        "model.norm.weight": np.ones(m.d_model, np.float32)}
    if not tied:
        tensors["lm_head.weight"] = rng.standard_normal(
            (m.text_vocab_size, m.d_model), dtype=np.float32) * np.float32(0.02)
    for path, (suffix, _, _) in _layer_map(m).items():
        for i in range(m.n_layers):
            shape = _expected_hf_shape(m, path)
            tensors[HF_LAYER.format(i=i) + suffix] = (
                np.ones(shape, np.float32) if path[-1] == "scale" else
                rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02))
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    hf = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2",
              vocab_size=m.text_vocab_size, hidden_size=m.d_model, num_hidden_layers=m.n_layers,
              num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads,
              head_dim=m.head_dim, intermediate_size=m.d_ff, rms_norm_eps=m.rms_norm_eps,
              rope_theta=m.rope_theta, tie_word_embeddings=tied, torch_dtype="float32")
    (dest / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return sum(x.nbytes for x in tensors.values())


def bench_import(model: str, workdir: str) -> dict:
    """Writes a random HF Qwen2 checkpoint of `model`'s backbone shape, imports it (`ualm
    import-hf`) in a child process and reports the child's peak resident memory against the
    imported model's fp32 size."""
    import shutil
    from pathlib import Path

    work = Path(workdir)
    cfg = load_config(None, [f"model.preset={model}"])
    src = work / f"hf-{model}"
    if not (src / "config.json").exists():
        write_random_hf_qwen2(cfg.model, src, seed=cfg.seed)
    out = work / f"import-{model}"
    shutil.rmtree(out, ignore_errors=True)
    code = ("import sys; from ualm_jax.config import load_config; "
            "from ualm_jax.convert.hf_import import import_hf; "
            "import_hf(sys.argv[1], sys.argv[2], load_config(None, [f'model.preset={sys.argv[3]}']))")
    peak, seconds, earlier = _child_peak_rss(code, src, out, model)
    model_bytes = params_bytes_fp32(load_config(out / "config.yaml").model)
    return {"bench": "import", "model": model, "source_bytes": _dir_bytes(src),
            "model_bytes_fp32": model_bytes, "checkpoint_bytes": _dir_bytes(out / "checkpoints"),
            "peak_rss_bytes": peak, "peak_over_model": peak / model_bytes, "seconds": seconds,
            "note": "peak includes earlier children of this process" if earlier else None}


def bench_export(model: str, workdir: str, fmt: str = "pytorch") -> dict:
    """Writes a random params checkpoint of `model`, exports it in a child process and reports
    the child's peak resident memory against the checkpoint's size on disk."""
    from pathlib import Path

    from ualm_jax.checkpoint import save_params
    from ualm_jax.model.params import init_params

    work = Path(workdir)
    ckpt = work / f"ckpt-{model}"
    if not (ckpt / "checkpoints").exists():
        cfg = load_config(None, [f"model.preset={model}"])
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / "config.yaml").write_text(cfg.to_yaml())
        params = init_params(build_model(cfg.model), jax.random.key(0))
        save_params(ckpt / "checkpoints", params)
        del params
    out = work / f"export-{model}-{fmt}"
    code = ("import sys; from ualm_jax.convert.export import export; "
            "export(sys.argv[1], sys.argv[2], sys.argv[3], overwrite=True)")
    peak, seconds, earlier = _child_peak_rss(code, ckpt, out, fmt)
    ckpt_bytes = _dir_bytes(ckpt / "checkpoints")
    model_bytes = params_bytes_fp32(load_config(ckpt / "config.yaml").model)
    return {"bench": "export", "model": model, "format": fmt, "checkpoint_bytes": ckpt_bytes,
            "export_bytes": _dir_bytes(out), "model_bytes_fp32": model_bytes,
            "peak_rss_bytes": peak, "peak_over_checkpoint": peak / ckpt_bytes,
            "peak_over_model": peak / model_bytes, "seconds": seconds,
            "note": "peak includes earlier children of this process" if earlier else None}


CODEC_FRAME_RATE = 50.0  # X-codec (and the demo's SpectralCodec): 16 kHz, hop 320


def bench_decode(model: str, batch: int, prompt_len: int, max_new: int, mesh: str | None,
                 devices: int | None = None, cfg_scale: float = 1.0, repeats: int = 2,
                 host_loop: bool = True, overrides=()) -> dict:
    """Text-to-audio decoding of random-weight `model` (every stream sampled, the delay ramps
    forced): `batch` prompts of `prompt_len` text ids, `max_new` positions each, guidance when
    cfg_scale != 1 (2 rows per prompt). Times the on-device loop (one dispatch per generation)
    and, with host_loop, the host-driven reference loop (one dispatch and one host round trip
    per position), both after a warm-up generation that compiles them. Random weights end a clip
    whenever stream 0 samples its pad (1 in C+1 per step): positions/s counts the loop's steps x
    prompts, audio seconds/s the frames actually written (50 frames a second)."""
    from ualm_jax.format import vocab as V
    from ualm_jax.infer.decode import GenerationConfig, Generator, generate
    from ualm_jax.model.params import init_params
    from ualm_jax.sharding import make_mesh

    cfg = bench_config(model, mesh, overrides=overrides)
    if cfg.model.num_codebooks < 1:
        raise ConfigError(f"model {model} has no audio streams to decode")
    devs = jax.devices()[:devices] if devices else None
    m = make_mesh(cfg.mesh, devs)
    params = init_params(build_model(cfg.model), jax.random.key(cfg.seed))
    k = cfg.model.num_codebooks
    rng = np.random.default_rng(0)
    vocab_text = cfg.model.text_vocab_size
    cond, uncond = [], []
    for _ in range(batch):
        p = np.zeros((prompt_len + 5, k), np.int32)
        p[:, 0] = [V.BOS, V.USER, V.TEXT, *(256 + rng.integers(0, vocab_text, prompt_len)),
                   V.ASSISTANT, V.AUDIO]
        u = p.copy()
        u[:-2] = V.PAD
        cond.append(p)
        uncond.append(u)
    guided = cfg_scale != 1.0
    rows = batch * (2 if guided else 1)
    t0 = time.perf_counter()
    gen = Generator(cfg.model, params, rows, prompt_len + 5 + max_new + 32, mesh=m,
                    rules=cfg.mesh.rules)
    gcfg = GenerationConfig(max_new=max_new, max_audio_frames=max_new, cfg_scale=cfg_scale,
                            batch=batch)

    def run(on_device: bool):
        """-> (audio frames written, loop steps): a clip's delayed rows minus its K-1 ramp; the
        loop runs until its longest clip's closer."""
        out = generate(gen, cond, gcfg, "audio", uncond_prompts=uncond if guided else None,
                       on_device=on_device)
        rows = [len(segs[0].ids) for segs in out]
        return sum(max(r - (k - 1), 0) for r in rows), max(rows) + 1

    run(True)
    setup_s = time.perf_counter() - t0
    rec = {"bench": "decode", "model": model, "batch": batch, "rows": rows, "prompt_len": prompt_len,
           "max_new": max_new, "cfg_scale": cfg_scale, "streams": k,
           "mesh": {a: int(s) for a, s in m.shape.items()}, "devices": int(m.devices.size),
           "device_kind": jax.devices()[0].device_kind, "backend": jax.default_backend(),
           "compile_and_first_s": setup_s}
    loops = [("device", True)] + ([("host", False)] if host_loop else [])
    for name, on_device in loops:
        if not on_device:
            run(False)  # compile the per-step functions
        t = time.perf_counter()
        frames, steps = run(on_device)
        for _ in range(repeats - 1):
            run(on_device)
        seconds = (time.perf_counter() - t) / repeats
        rec[f"{name}_loop"] = {
            "seconds": seconds, "steps": steps, "step_ms": 1e3 * seconds / steps,
            # every prompt advances one position per step (rows already done included)
            "positions_per_s": batch * steps / seconds,
            "audio_frames": frames, "audio_seconds_per_s": frames / CODEC_FRAME_RATE / seconds}
    if host_loop:
        rec["device_over_host"] = rec["device_loop"]["positions_per_s"] / rec["host_loop"]["positions_per_s"]
    return rec
