"""`ualm import-hf`: a local HF Qwen2/Qwen2.5 checkpoint -> a UALM params checkpoint.

Backbone shapes come from config.json; the UALM parts (K, C, encoder, adapter) from our config.
Text rows are copied into the shifted text interval of both the input table and the untied head
(a tied source head is copied, not shared); special and audio rows start from normal noise with
the text rows' std (row 0, pad, zero); stream embeddings, adapter (and the audio encoder unless a Whisper/AF3
checkpoint is given) are initialised as the model initialises them. Output layout is a run
directory: OUT/config.yaml + OUT/checkpoints/0 (params only), usable as `train.init_from`.
A UALM checkpoint (our exports, the authors' format) is refused: `ualm import-reference` reads it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import ualm_jax.storage as storage
from ualm_jax.checkpoint import save_params
from ualm_jax.config import Config
from ualm_jax.convert.hf_files import HFTensors, read_config
from ualm_jax.convert.hf_qwen2 import decoder_from_hf
from ualm_jax.model.params import build_model, init_params
from ualm_jax.format.vocab import JointVocab

QWEN2_ARCHS = ("Qwen2ForCausalLM", "Qwen2Model")


def _field(hf: dict, key: str, source: str, kind: str, default=None):
    """hf[key] (or `default` when absent) checked to be of `kind`: a wrong type becomes a
    ValueError naming the field and the file, not a TypeError deep in the model code."""
    value = hf.get(key, default)
    ok = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
          "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "bool": lambda v: isinstance(v, bool)}[kind]
    if value is not None and not ok(value):
        what = {"int": "a positive integer", "float": "a number", "bool": "true or false"}[kind]
        raise ValueError(f"{source}: {key} is {json.dumps(value)} ({type(value).__name__}); "
                         f"expected {what}")
    return value


def backbone_from_hf_config(hf: dict, source: str = "config.json") -> dict:
    archs = hf.get("architectures") or []
    if hf.get("model_type") != "qwen2" and not any(a in QWEN2_ARCHS for a in archs):
        raise ValueError(f"{source}: unknown architecture (model_type={hf.get('model_type')!r}, "
                         f"architectures={archs}); expected a Qwen2/Qwen2.5 checkpoint")
    need = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size")
    missing = [k for k in need if hf.get(k) is None]
    if missing:
        raise ValueError(f"{source} lacks {', '.join(missing)}")
    heads = _field(hf, "num_attention_heads", source, "int")
    d_model = _field(hf, "hidden_size", source, "int")
    rope = hf.get("rope_parameters")
    rope = hf["rope_theta"] if "rope_theta" in hf else \
        (rope.get("rope_theta", 1e6) if isinstance(rope, dict) else 1e6)
    return dict(
        text_vocab_size=_field(hf, "vocab_size", source, "int"), d_model=d_model,
        n_layers=_field(hf, "num_hidden_layers", source, "int"), n_heads=heads,
        n_kv_heads=_field(hf, "num_key_value_heads", source, "int", heads) or heads,
        head_dim=_field(hf, "head_dim", source, "int") or d_model // heads,
        d_ff=_field(hf, "intermediate_size", source, "int"),
        rms_norm_eps=_field(hf, "rms_norm_eps", source, "float", 1e-6) or 1e-6,
        rope_theta=float(_field({"rope_theta": rope}, "rope_theta", source, "float") or 1e6),
        qkv_bias=True)


def _small_parts(cfg, seed: int) -> dict:
    """Adapter, stream embeddings and encoder as the model initialises them, without building
    the (large) decoder and tables: their shapes do not depend on depth or vocabulary."""
    small = dataclasses.replace(cfg, n_layers=1, text_vocab_size=8, num_special=16,
                                vocab_pad_multiple=8)
    params = init_params(build_model(small), jax.random.key(seed))
    return {k: jax.tree.map(np.asarray, v) for k, v in params.items()
            if k in ("adaptor", "stream_emb", "audio_encoder")}


def vocab_tables(tensors, cfg, tied_source: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    vocab = JointVocab.from_model_config(cfg)
    emb_name = "model.embed_tokens.weight"
    emb = tensors[emb_name]
    expect = (cfg.text_vocab_size, cfg.d_model)
    if emb.shape != expect:
        raise ValueError(f"tensor {emb_name} has shape {emb.shape}, expected {expect} from config.json")
    head_src = emb if tied_source else tensors["lm_head.weight"]
    if head_src.shape != expect:
        raise ValueError(f"tensor lm_head.weight has shape {head_src.shape}, expected {expect}")
    rng = np.random.default_rng(seed)
    out = []
    for src in (emb, head_src):
        std = float(np.asarray(src, np.float32).std())
        table = np.zeros((vocab.padded_size, cfg.d_model), np.float32)
        table[:vocab.size] = rng.normal(0.0, std, (vocab.size, cfg.d_model))
        table[vocab.text_offset:vocab.audio_offset] = np.asarray(src, np.float32)
        table[0] = 0.0  # pad: zero as the reference's padding_idx=0 table (and its head) start
        out.append(table)
    return out[0], out[1]


def refuse_ualm_checkpoint(hf_dir: Path, tensor_names=()) -> None:
    """import-hf reads a plain Qwen2 TEXT checkpoint; a UALM export (joint vocabulary, stream
    embeddings) imported as one would silently be a wrong model."""
    marks = [n for n in ("ualm_config.json", "mp_rank_00_model_states.pt") if (hf_dir / n).exists()]
    if "stream_emb.weight" in tensor_names:
        marks.append("a stream_emb.weight tensor")
    if marks:
        raise ValueError(f"{hf_dir} is a UALM checkpoint ({', '.join(marks)}: joint vocabulary "
                         f"and stream embeddings), not a plain Qwen2 text checkpoint; import it "
                         f"with `ualm import-reference {hf_dir} --config RUN_CONFIG.yaml --out "
                         f"CKPT` (for `--format hf-text` exports and HF Qwen2 models use import-hf)")


def import_hf(hf_dir: str | Path, out_dir: str | Path, cfg: Config,
              whisper_dir: str | Path | None = None) -> dict:
    hf_dir, out_dir = Path(hf_dir), storage.as_path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} is a file; --out must be a new directory")
    if (out_dir / "checkpoints").exists():
        raise FileExistsError(f"{out_dir} already holds checkpoints; choose a new --out")
    refuse_ualm_checkpoint(hf_dir)
    hf_cfg = read_config(hf_dir)
    for k, v in backbone_from_hf_config(hf_cfg, str(hf_dir / "config.json")).items():
        setattr(cfg.model, k, v)
    cfg.model.tie_embeddings = False  # UALM unties; a tied source head is copied
    tied = bool(_field(hf_cfg, "tie_word_embeddings", str(hf_dir / "config.json"), "bool", False))
    tensors = HFTensors(hf_dir)
    refuse_ualm_checkpoint(hf_dir, tensors)
    if not tied and "lm_head.weight" not in tensors:
        raise ValueError(f"{hf_dir}/config.json says tie_word_embeddings=false but there is no "
                         "lm_head.weight tensor")
    if whisper_dir is not None:
        from ualm_jax.convert.hf_whisper import read_config as whisper_config

        for k, v in whisper_config(read_config(whisper_dir)).items():
            setattr(cfg.model.audio_encoder, k, v)
    cfg.validate()

    params = _small_parts(cfg.model, cfg.seed)
    if whisper_dir is not None:
        from ualm_jax.convert.hf_whisper import whisper_encoder_params_from_hf

        params["audio_encoder"] = whisper_encoder_params_from_hf(HFTensors(whisper_dir),
                                                                 cfg.model.audio_encoder)
    params["embed"], params["head"] = vocab_tables(tensors, cfg.model, tied, cfg.seed)
    dtype = jnp.dtype(cfg.model.param_dtype)
    params["decoder"] = decoder_from_hf(lambda n: tensors[n], cfg.model, dtype)

    # Anything the source holds that we did not read is reported, not silently dropped.
    read = set(n for n in tensors if n.startswith("model.layers.") or n in
               ("model.norm.weight", "model.embed_tokens.weight", "lm_head.weight"))
    unread = sorted(set(tensors) - read)
    report = {"source": str(hf_dir), "tied_source": tied, "tensors": len(tensors),
              "unread_tensors": unread, "whisper": str(whisper_dir) if whisper_dir else None,
              "vocab": JointVocab.from_model_config(cfg.model).describe()}
    write_run(out_dir, cfg, params, report)
    return report


@contextlib.contextmanager
def _save_errors_raised_not_logged():
    """Orbax logs a failed save's error, traceback and all, from each of its threads before the
    same error is raised here; the raise (one line from the CLI) is enough. Its warning that a
    numpy-only tree has no jax.Array metadata is dropped too (true of every import, and harmless)."""
    class Drop(logging.Filter):
        def filter(self, record):
            if record.levelno >= logging.ERROR and record.exc_info:
                return False
            return not str(record.msg).startswith("No jax.Array in TypeHandlerRegistry")

    drop, logger = Drop(), logging.getLogger("absl")
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def write_run(out_dir, cfg: Config, params: dict, report: dict) -> None:
    """OUT/config.yaml + OUT/checkpoints/0 + OUT/import_report.json (last). A local OUT is written
    into a temporary sibling folder and moved into place when complete; on object storage (no
    rename) a failed import removes the checkpoint it began. Either way a failed import leaves
    nothing that makes the same command refuse to rerun; a full disk fails as ENOSPC naming OUT."""
    from ualm_jax.convert.export_files import raise_if_disk_full

    def write(d) -> None:
        (d / "config.yaml").write_text(cfg.to_yaml())
        with _save_errors_raised_not_logged():
            save_params(d / "checkpoints", params)
        (d / "import_report.json").write_text(json.dumps(report, indent=2) + "\n")

    if storage.is_url(out_dir):
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            write(out_dir)
        except BaseException as e:
            with contextlib.suppress(Exception):
                if (out_dir / "checkpoints").exists():
                    (out_dir / "checkpoints").rmtree()
            raise_if_disk_full(e, out_dir)
            raise
        return
    tmp = None
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
        write(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; mkdir would have made it 0755
        if out_dir.exists():  # an existing folder without checkpoints (checked above): fill it
            for name in ("checkpoints", "config.yaml", "import_report.json"):
                os.replace(tmp / name, out_dir / name)
            tmp.rmdir()
        else:
            os.replace(tmp, out_dir)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise_if_disk_full(e, out_dir)
        raise
