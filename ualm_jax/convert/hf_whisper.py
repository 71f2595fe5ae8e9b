"""HF Whisper encoder names <-> our `AudioEncoder` params. Numpy in, numpy out; no torch here.

Works for WhisperForConditionalGeneration (`model.encoder.`), WhisperModel (`encoder.`), a bare
encoder (no prefix) and Audio Flamingo 3's audio tower (`audio_tower.` / `model.audio_tower.`),
which all use Whisper's tensor names; the prefix is found automatically when the given one is
absent. Layouts:
  conv1/conv2 weight  HF [out, in, k]  -> ours [k, in, out]   (flax NWC Conv)
  q/k/v_proj weight   HF [d, d]        -> ours [d, H, hd]     (k_proj has no bias)
  out_proj weight     HF [d, d]        -> ours [H, hd, d]
  fc1/fc2 weight      HF [out, in]     -> ours [in, out]
  LayerNorm           weight / bias    -> scale / bias
  embed_positions     HF [P, d]        -> ours [max_mel_frames // 2, d] (first rows of HF's)
Per-layer tensors stack on a leading [n_layers] axis (our scanned `layers`).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ualm_jax.config import AudioEncoderConfig
from ualm_jax.convert.hf_qwen2 import get_path, set_path

DEFAULT_PREFIX = "model.encoder."
_POS = "embed_positions.weight"


def _specs(cfg: AudioEncoderConfig):
    """([top-level specs], [per-layer specs]); a spec is
    (hf suffix, our path, hf shape, from_hf(w), to_hf(x))."""
    d, h, f, m = cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.n_mels
    if d % h:
        raise ValueError(f"d_model={d} is not divisible by n_heads={h}")
    hd = d // h
    same = (lambda w: w, lambda x: x)
    conv = (lambda w: w.transpose(2, 1, 0), lambda x: x.transpose(2, 1, 0))

    def linear(ours: tuple, n_in: int):  # the first n_in dims of our kernel are HF's `in`
        n_i, n_o = int(np.prod(ours[:n_in])), int(np.prod(ours[n_in:]))
        return (lambda w: w.T.reshape(ours), lambda x: x.reshape(n_i, n_o).T)

    head_bias = (lambda w: w.reshape(h, hd), lambda x: x.reshape(d))
    top = [
        ("conv1.weight", ("conv1", "kernel"), (d, m, 3), *conv),
        ("conv1.bias", ("conv1", "bias"), (d,), *same),
        ("conv2.weight", ("conv2", "kernel"), (d, d, 3), *conv),
        ("conv2.bias", ("conv2", "bias"), (d,), *same),
        ("layer_norm.weight", ("layer_norm", "scale"), (d,), *same),
        ("layer_norm.bias", ("layer_norm", "bias"), (d,), *same),
    ]
    layer = [
        ("self_attn.q_proj.weight", ("q_proj", "kernel"), (d, d), *linear((d, h, hd), 1)),
        ("self_attn.q_proj.bias", ("q_proj", "bias"), (d,), *head_bias),
        ("self_attn.k_proj.weight", ("k_proj", "kernel"), (d, d), *linear((d, h, hd), 1)),
        ("self_attn.v_proj.weight", ("v_proj", "kernel"), (d, d), *linear((d, h, hd), 1)),
        ("self_attn.v_proj.bias", ("v_proj", "bias"), (d,), *head_bias),
        ("self_attn.out_proj.weight", ("out_proj", "kernel"), (d, d), *linear((h, hd, d), 2)),
        ("self_attn.out_proj.bias", ("out_proj", "bias"), (d,), *same),
        ("self_attn_layer_norm.weight", ("self_attn_layer_norm", "scale"), (d,), *same),
        ("self_attn_layer_norm.bias", ("self_attn_layer_norm", "bias"), (d,), *same),
        ("fc1.weight", ("fc1", "kernel"), (f, d), *linear((d, f), 1)),
        ("fc1.bias", ("fc1", "bias"), (f,), *same),
        ("fc2.weight", ("fc2", "kernel"), (d, f), *linear((f, d), 1)),
        ("fc2.bias", ("fc2", "bias"), (d,), *same),
        ("final_layer_norm.weight", ("final_layer_norm", "scale"), (d,), *same),
        ("final_layer_norm.bias", ("final_layer_norm", "bias"), (d,), *same),
    ]
    return top, layer


def find_prefix(state_dict: Mapping[str, Any], prefix: str = DEFAULT_PREFIX) -> str:
    """`prefix` if `prefix + "conv1.weight"` exists, else the one prefix that has a `conv1.weight`
    (`encoder.`, ``, `audio_tower.`, ...)."""
    if prefix + "conv1.weight" in state_dict:
        return prefix
    found = sorted(k[: -len("conv1.weight")] for k in state_dict
                   if k == "conv1.weight" or k.endswith(".conv1.weight"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise ValueError(f"missing tensor {prefix}conv1.weight (no Whisper encoder found: no "
                         f"tensor named *conv1.weight among {len(state_dict)} tensors)")
    raise ValueError(f"missing tensor {prefix}conv1.weight; several encoder prefixes are "
                     f"present {found}: pass one as `prefix`")


def whisper_encoder_params_from_hf(state_dict: Mapping[str, np.ndarray], cfg: AudioEncoderConfig,
                                   prefix: str = DEFAULT_PREFIX) -> dict:
    """Our `AudioEncoder` params (nested dict of numpy arrays, dtype kept) from HF Whisper tensors.
    Every shape is checked against `cfg`; errors name the tensor. Tensors under the prefix that
    are not used (e.g. more layers than cfg.n_layers) are an error too."""
    prefix = find_prefix(state_dict, prefix)
    used: set[str] = set()

    def get(suffix: str, shape: tuple) -> np.ndarray:
        name = prefix + suffix
        if name not in state_dict:
            raise ValueError(f"missing tensor {name}")
        w = np.asarray(state_dict[name])
        if tuple(w.shape) != tuple(shape):
            raise ValueError(f"tensor {name}: expected shape {tuple(shape)}, found "
                             f"{tuple(w.shape)} (n_mels={cfg.n_mels}, d_model={cfg.d_model}, "
                             f"n_heads={cfg.n_heads}, d_ff={cfg.d_ff})")
        used.add(name)
        return w

    top, layer = _specs(cfg)
    out: dict = {}
    for suffix, path, shape, from_hf, _ in top:
        set_path(out, path, from_hf(get(suffix, shape)))
    for suffix, path, shape, from_hf, _ in layer:
        ws = [from_hf(get(f"layers.{i}.{suffix}", shape)) for i in range(cfg.n_layers)]
        set_path(out, ("layers",) + path, np.stack(ws, axis=0))

    n_pos, d = cfg.max_mel_frames // 2, cfg.d_model
    name = prefix + _POS
    if name not in state_dict:
        raise ValueError(f"missing tensor {name}")
    pos = np.asarray(state_dict[name])
    if pos.ndim != 2 or pos.shape[1] != d or pos.shape[0] < n_pos:
        raise ValueError(f"tensor {name}: expected shape ({n_pos}, {d}) or more rows "
                         f"(max_mel_frames={cfg.max_mel_frames} needs {n_pos} positions), "
                         f"found {tuple(pos.shape)}")
    used.add(name)
    out["embed_positions"] = pos[:n_pos]

    extra = sorted(k for k in state_dict if k.startswith(prefix) and k not in used)
    if extra:
        raise ValueError(f"unexpected tensors under '{prefix}' (is n_layers={cfg.n_layers} "
                         f"right?): {extra[:8]}{' ...' if len(extra) > 8 else ''}")
    return out


def whisper_encoder_params_to_hf(params: Mapping, cfg: AudioEncoderConfig,
                                 prefix: str = DEFAULT_PREFIX) -> dict[str, np.ndarray]:
    """Inverse of `whisper_encoder_params_from_hf`: HF-named contiguous numpy tensors.
    embed_positions is exported with our length (max_mel_frames // 2 rows)."""
    top, layer = _specs(cfg)
    out: dict[str, np.ndarray] = {}
    for suffix, path, _, _, to_hf in top:
        out[prefix + suffix] = np.ascontiguousarray(to_hf(np.asarray(get_path(params, path))))
    for suffix, path, _, _, to_hf in layer:
        stacked = np.asarray(get_path(params, ("layers",) + path))
        for i in range(cfg.n_layers):
            out[f"{prefix}layers.{i}.{suffix}"] = np.ascontiguousarray(to_hf(stacked[i]))
    out[prefix + _POS] = np.ascontiguousarray(np.asarray(params["embed_positions"]))
    return out


def read_config(hf_config: Mapping[str, Any]) -> dict:
    """AudioEncoderConfig fields from an HF config dict: a WhisperConfig, an Audio Flamingo 3
    config (its `audio_config` is used) or an AF3 encoder config (hidden_size/num_hidden_layers
    names). `pool` is not set here: Whisper has none, AF-Whisper pools by 2."""
    c = hf_config.get("audio_config") or hf_config

    def pick(*names):
        for n in names:
            if n in c:
                return c[n]
        raise ValueError(f"HF config has none of {names}")

    act = c.get("activation_function", "gelu")
    if act != "gelu":  # our encoder hard-codes exact (erf) GELU
        raise ValueError(f"activation_function={act!r} is not supported (only 'gelu')")
    return {
        "n_mels": int(pick("num_mel_bins")),
        "d_model": int(pick("d_model", "hidden_size")),
        "n_layers": int(pick("encoder_layers", "num_hidden_layers")),
        "n_heads": int(pick("encoder_attention_heads", "num_attention_heads")),
        "d_ff": int(pick("encoder_ffn_dim", "intermediate_size")),
        "max_mel_frames": 2 * int(pick("max_source_positions")),
    }
