"""`ualm export`: a UALM checkpoint (saved on any mesh) -> PyTorch / HF files.

--format pytorch: the whole model with HF Qwen2 names for body and tables, in safetensors
  (`model.safetensors`; `pytorch_model.bin` too with torch_bin=True):
    model.embed_tokens.weight, lm_head.weight   [V_joint, d]  (sharding padding removed)
    model.layers.{i}.*, model.norm.weight       the HF Qwen2 body
    stream_emb.weight [K, d] (row 0 is e_0 = 0), adaptor.audio.weight / .bias (or adaptor.fc1/fc2)
    audio_encoder.*                             Whisper names (conv1, layers.{i}..., layer_norm)
  + config.json (transformers' Qwen2Config for the body over the joint vocab) and
  ualm_config.json (vocabulary intervals, K, C, encoder and adapter settings).
--format hf-text: a plain Qwen2ForCausalLM of the text part only (text rows of table and head),
  with the run's tokenizer files (data.tokenizer), so AutoTokenizer gives the real tokenizer.
--format ualm-reference: the authors' own checkpoint layout (convert/reference.py).
Every export carries a model card (README.md) and is readable by others (files 0644, folders 0755).
Files are written into OUT.tmp-* and renamed to OUT at the end, after a checksum manifest
(MANIFEST.sha256), so a failed export leaves nothing that looks complete.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

import ualm_jax.storage as storage
from ualm_jax.checkpoint import load_params, resolve
from ualm_jax.config import load_config
from ualm_jax.convert.export_files import (MANIFEST, commit_export, copy_tokenizer, qwen2_config,
                                            raise_if_disk_full)
from ualm_jax.convert.hf_qwen2 import decoder_to_hf
from ualm_jax.format.vocab import JointVocab

FORMATS = ("pytorch", "hf-text", "ualm-reference")
def ualm_config(cfg) -> dict:
    vocab = JointVocab.from_model_config(cfg)
    enc = cfg.audio_encoder
    return {
        "vocab": vocab.describe(), "num_codebooks": cfg.num_codebooks,
        "codebook_size": cfg.codebook_size, "num_special": cfg.num_special,
        "text_vocab_size": cfg.text_vocab_size, "adapter": cfg.adapter,
        "audio_encoder": ({"n_mels": enc.n_mels, "d_model": enc.d_model, "n_layers": enc.n_layers,
                           "n_heads": enc.n_heads, "d_ff": enc.d_ff,
                           "max_mel_frames": enc.max_mel_frames, "pool": enc.pool}
                          if enc.enabled else None),
        "stream_embedding": "logits of stream k = (h + stream_emb[k]) @ lm_head.T; stream_emb[0] = 0",
        "loss_objective": cfg.loss_objective, "max_loss_interval": cfg.max_loss_interval,
        "stream_weights": cfg.audio_stream_weights(),
    }


def _adapter_tensors(adaptor: dict) -> dict:
    out = {}
    for name, layer in adaptor.items():
        out[f"adaptor.{name}.weight"] = np.ascontiguousarray(np.asarray(layer["kernel"]).T)
        out[f"adaptor.{name}.bias"] = np.asarray(layer["bias"])
    return out


def export_tensors(params: dict, cfg, fmt: str) -> tuple[dict, bool]:
    """(name -> array, tied) for one format. Consumes `params` as it goes (lower peak memory)."""
    vocab = JointVocab.from_model_config(cfg)
    embed = params.pop("embed")
    head = embed if cfg.tie_embeddings else params.pop("head")
    out = decoder_to_hf(params.pop("decoder"), cfg)
    if fmt == "hf-text":
        rows = slice(vocab.text_offset, vocab.audio_offset)
        out["model.embed_tokens.weight"] = np.ascontiguousarray(embed[rows])
        tied = bool(np.array_equal(embed[rows], head[rows]))
        if not tied:  # an untied head stays a separate tensor; equal rows export tied, like the source
            out["lm_head.weight"] = np.ascontiguousarray(head[rows])
        return out, tied
    out["model.embed_tokens.weight"] = np.ascontiguousarray(embed[:vocab.size])
    out["lm_head.weight"] = np.ascontiguousarray(head[:vocab.size])
    emb = np.array(params.pop("stream_emb"))
    emb[0] = 0.0  # the model uses e_0 = 0 whatever the parameter holds
    out["stream_emb.weight"] = emb
    if "adaptor" in params:
        out.update(_adapter_tensors(params.pop("adaptor")))
    if "audio_encoder" in params:
        from ualm_jax.convert.hf_whisper import whisper_encoder_params_to_hf

        out.update(whisper_encoder_params_to_hf(params.pop("audio_encoder"), cfg.audio_encoder,
                                                "audio_encoder."))
    return out, False


def _export_to_url(checkpoint, out: str, **kw) -> str:
    """Object storage has no atomic rename: export to local disk, then upload with the manifest
    last. An export there is complete exactly when MANIFEST.sha256 exists (`verify` checks it)."""
    dest = storage.as_path(out)
    if dest.exists() and any(dest.iterdir()) and not kw.get("overwrite"):
        raise FileExistsError(f"{out} exists; pass --overwrite or choose another --out")
    local = Path(tempfile.mkdtemp(prefix="ualm-export-"))
    try:
        export(checkpoint, local / "out", **kw)
        if dest.exists():
            dest.rmtree()
        storage.upload_tree(local / "out", out, last=[MANIFEST])
    finally:
        shutil.rmtree(local, ignore_errors=True)
    return out


def export(checkpoint: str | Path, out: str | Path, fmt: str = "pytorch", dtype: str | None = None,
           torch_bin: bool = False, overwrite: bool = False) -> Path:
    if storage.is_url(out):
        return _export_to_url(checkpoint, str(out), fmt=fmt, dtype=dtype, torch_bin=torch_bin,
                              overwrite=overwrite)
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not an export folder (--overwrite replaces only "
                              "folders): remove it or choose another --out")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite or choose another --out")
    config_path, ckpts, step = resolve(checkpoint)  # checks the step's checksums first
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} is missing: the checkpoint's run config is needed "
                                "to name and shape the tensors")
    cfg = load_config(config_path)
    print(f"export: reading step {step} of {checkpoint} ...", flush=True)  # the long phases
    params = load_params(ckpts / str(step), verify=False)  # checked above
    if fmt == "ualm-reference":  # a layout of its own (convert/reference.py)
        from ualm_jax.convert.reference import export_reference

        try:
            return export_reference(params, cfg, step, out, dtype)
        except Exception as e:
            raise_if_disk_full(e, out)
            raise
    tensors, tied = export_tensors(params, cfg.model, fmt)
    del params
    if dtype:
        import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

        tensors = {k: v.astype(dtype) for k, v in tensors.items()}
    out_dtype = str(next(iter(tensors.values())).dtype)

    print(f"export: writing {len(tensors)} tensors "
          f"({sum(v.nbytes for v in tensors.values()) / 2**30:.2f} GiB, {out_dtype}) ...", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        from safetensors.numpy import save_file

        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if torch_bin:
            import torch

            torch.save({k: torch.from_numpy(np.asarray(v, np.float32)).to(
                getattr(torch, out_dtype, torch.float32)) for k, v in tensors.items()},
                tmp / "pytorch_model.bin")
        vocab = JointVocab.from_model_config(cfg.model)
        vocab_size = cfg.model.text_vocab_size if fmt == "hf-text" else vocab.size
        (tmp / "config.json").write_text(json.dumps(
            qwen2_config(cfg.model, vocab_size, tied, out_dtype), indent=2) + "\n")
        if fmt == "pytorch":
            (tmp / "ualm_config.json").write_text(json.dumps(
                dict(ualm_config(cfg.model), source_step=step), indent=2) + "\n")
            notes = ["not the authors' checkpoint format: `--format ualm-reference` writes that"]
        else:
            copied = copy_tokenizer(cfg, tmp)
            notes = [f"tokenizer files: {', '.join(copied)}" if copied
                     else "no tokenizer files: the run had no data.tokenizer"]
        from ualm_jax.convert.model_card import model_card

        (tmp / "README.md").write_text(model_card(fmt, cfg, step, notes))
        commit_export(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise_if_disk_full(e, out)
        raise
    return out


def verify(out: str | Path) -> bool:
    """True when every file listed in MANIFEST.sha256 is present and matches."""
    out = storage.as_path(out)
    manifest = out / MANIFEST
    if not manifest.exists():
        return False
    for line in manifest.read_text().splitlines():
        digest, name = line.split("  ", 1)
        if not (out / name).exists() or storage.sha256(out / name) != digest:
            return False
    return True
