"""HF Qwen2 names <-> our decoder params. The one place that knows the mapping (import, export
and parity tests all use it). Numpy in, numpy out; no torch import here.

HF Linear weights are [out, in]; our DenseGeneral kernels are [in, *out] with heads split out:
q_proj [d, H, D], k/v_proj [d, Hkv, D], o_proj [H, D, d]. Scanned layers stack on axis 0.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

HF_LAYER = "model.layers.{i}."


def _layer_map(cfg) -> dict[str, tuple[tuple, Callable, Callable]]:
    """our path (inside one layer) -> (hf suffix, from_hf(w), to_hf(x))."""
    d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def qkv(n):
        return (lambda w: w.T.reshape(d, n, hd), lambda x: x.reshape(d, n * hd).T)

    def qkv_bias(n):
        return (lambda w: w.reshape(n, hd), lambda x: x.reshape(n * hd))

    same = (lambda w: w, lambda x: x)
    t = (lambda w: w.T, lambda x: x.T)
    m = {
        ("self_attn", "q_proj", "kernel"): ("self_attn.q_proj.weight",) + qkv(h),
        ("self_attn", "k_proj", "kernel"): ("self_attn.k_proj.weight",) + qkv(kv),
        ("self_attn", "v_proj", "kernel"): ("self_attn.v_proj.weight",) + qkv(kv),
        ("self_attn", "o_proj", "kernel"): ("self_attn.o_proj.weight",
                                            lambda w: w.T.reshape(h, hd, d),
                                            lambda x: x.reshape(h * hd, d).T),
        ("mlp", "gate_proj", "kernel"): ("mlp.gate_proj.weight",) + t,
        ("mlp", "up_proj", "kernel"): ("mlp.up_proj.weight",) + t,
        ("mlp", "down_proj", "kernel"): ("mlp.down_proj.weight",) + t,
        ("input_layernorm", "scale"): ("input_layernorm.weight",) + same,
        ("post_attention_layernorm", "scale"): ("post_attention_layernorm.weight",) + same,
    }
    if cfg.qkv_bias:
        m[("self_attn", "q_proj", "bias")] = ("self_attn.q_proj.bias",) + qkv_bias(h)
        m[("self_attn", "k_proj", "bias")] = ("self_attn.k_proj.bias",) + qkv_bias(kv)
        m[("self_attn", "v_proj", "bias")] = ("self_attn.v_proj.bias",) + qkv_bias(kv)
    return m


def set_path(tree: dict, path: tuple, value) -> None:
    """Sets tree[p0][p1]... = value, creating sections (shared by the HF mappings)."""
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def get_path(tree: dict, path: tuple):
    for k in path:
        tree = tree[k]
    return tree


def hf_decoder_names(cfg) -> list[str]:
    names = [HF_LAYER.format(i=i) + spec[0] for i in range(cfg.n_layers)
             for spec in _layer_map(cfg).values()]
    return names + ["model.norm.weight"]


def decoder_from_hf(get: Callable[[str], np.ndarray], cfg, dtype=None) -> dict:
    """Our `decoder` subtree from HF tensors; `get(name)` returns one numpy tensor (so a caller
    can read shard by shard). Shapes are checked; errors name the tensor. `dtype` (default: the
    source's): scanned layers are written one by one into one preallocated stacked array of it,
    so memory holds the result plus one source tensor, never a second copy of the decoder."""
    out: dict = {}
    for path, (suffix, from_hf, to_hf) in _layer_map(cfg).items():
        per_layer, stacked = [], None
        for i in range(cfg.n_layers):
            name = HF_LAYER.format(i=i) + suffix
            w = np.asarray(get(name))
            if tuple(w.shape) != _expected_hf_shape(cfg, path):
                raise ValueError(f"tensor {name} has shape {tuple(w.shape)}, expected "
                                 f"{_expected_hf_shape(cfg, path)} from the config (d_model={cfg.d_model}, n_heads={cfg.n_heads}, "
                                 f"n_kv_heads={cfg.n_kv_heads}, head_dim={cfg.head_dim}, "
                                 f"d_ff={cfg.d_ff})")
            x = from_hf(w)
            if not cfg.scan_layers:
                per_layer.append(x if dtype is None else x.astype(dtype, copy=False))
                continue
            if stacked is None:
                stacked = np.empty((cfg.n_layers,) + x.shape, x.dtype if dtype is None else dtype)
            stacked[i] = x
            del w, x
        if cfg.scan_layers:
            set_path(out, ("layers",) + path, stacked)
        else:
            for i, x in enumerate(per_layer):
                set_path(out, (f"layers_{i}",) + path, x)
    norm = np.asarray(get("model.norm.weight"))
    if norm.shape != (cfg.d_model,):
        raise ValueError(f"tensor model.norm.weight has shape {norm.shape}, expected ({cfg.d_model},)")
    set_path(out, ("norm", "scale"), norm if dtype is None else norm.astype(dtype, copy=False))
    return out


def _expected_hf_shape(cfg, path) -> tuple:
    d, h, kv, hd, ff = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    table = {
        ("self_attn", "q_proj", "kernel"): (h * hd, d), ("self_attn", "k_proj", "kernel"): (kv * hd, d),
        ("self_attn", "v_proj", "kernel"): (kv * hd, d), ("self_attn", "o_proj", "kernel"): (d, h * hd),
        ("mlp", "gate_proj", "kernel"): (ff, d), ("mlp", "up_proj", "kernel"): (ff, d),
        ("mlp", "down_proj", "kernel"): (d, ff), ("input_layernorm", "scale"): (d,),
        ("post_attention_layernorm", "scale"): (d,), ("self_attn", "q_proj", "bias"): (h * hd,),
        ("self_attn", "k_proj", "bias"): (kv * hd,), ("self_attn", "v_proj", "bias"): (kv * hd,),
    }
    return table[path]


def decoder_to_hf(decoder: dict, cfg) -> dict[str, np.ndarray]:
    out = {}
    for path, (suffix, from_hf, to_hf) in _layer_map(cfg).items():
        for i in range(cfg.n_layers):
            x = (np.asarray(get_path(decoder, ("layers",) + path))[i] if cfg.scan_layers
                 else np.asarray(get_path(decoder, (f"layers_{i}",) + path)))
            # Contiguous: safetensors writes the raw buffer of a transposed view otherwise.
            out[HF_LAYER.format(i=i) + suffix] = np.ascontiguousarray(to_hf(x))
    out["model.norm.weight"] = np.asarray(decoder["norm"]["scale"])
    return out
