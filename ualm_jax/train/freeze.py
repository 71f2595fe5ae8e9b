"""What each training stage trains.

full:   everything but the audio encoder (frozen in every UALM stage unless
        model.audio_encoder.frozen=false).
align:  only the adapter, the stream embeddings and the audio rows of the input table and the
        head; every other row and parameter stays bit-identical.
custom: everything; combine with train.freeze globs.
`train.freeze` globs (fnmatch on 'a/b/c' names, e.g. 'decoder/layers/*') freeze more in any stage.
In every stage row 0 (pad) of the input table stays frozen at zero, like the reference's
padding_idx=0 row: a pad id then adds nothing to the summed input embedding, masked or not.

A spec leaf is True (train), False (frozen: no update, no optimiser state) or a [rows, 1] float
mask (only rows with 1 are trained; used for the vocab tables in `align`).
"""
from __future__ import annotations

import fnmatch

import jax
import numpy as np

from ualm_jax.format.vocab import vocab_of
from ualm_jax.model.paths import named_leaves, param_names


def trainable_spec(params, model_cfg, train_cfg):
    vocab = vocab_of(model_cfg)
    names = param_names(params)

    def rows_mask(shape):
        m = np.zeros((shape[0], 1), np.float32)
        m[vocab.audio_offset:vocab.size] = 1.0
        return m

    def all_but_pad(shape):
        m = np.ones((shape[0], 1), np.float32)
        m[0] = 0.0
        return m

    def one(name, x):
        top = name.split("/")[0]
        if any(fnmatch.fnmatchcase(name, g) for g in train_cfg.freeze):
            return False
        if top == "audio_encoder" and model_cfg.audio_encoder.frozen:
            return False
        if train_cfg.stage == "align":
            if top in ("adaptor", "stream_emb"):
                return True
            if top in ("embed", "head"):
                return rows_mask(x.shape)
            return False
        if top == "embed":
            return all_but_pad(x.shape)
        return True

    return jax.tree.map(one, names, params)


def _is_spec(s) -> bool:
    return isinstance(s, (bool, np.ndarray))


def whole_tensor_trainable(spec):
    """Bools for the optimiser: a row-masked table keeps optimiser state (True)."""
    return jax.tree.map(lambda s: s is not False, spec, is_leaf=_is_spec)


def row_masks(spec) -> dict:
    """{parameter name: [rows,1] mask} for the partially trained tables."""
    return {name: s for name, s in named_leaves(spec, is_leaf=_is_spec) if isinstance(s, np.ndarray)}


def adapter_trained(spec) -> bool:
    """Whether any adapter parameter is trained (its backward pass counts in the model FLOPs)."""
    sub = spec.get("adaptor") if isinstance(spec, dict) else None
    return sub is not None and any(s is not False for s in jax.tree.leaves(sub, is_leaf=_is_spec))


def count_trainable(spec, params) -> int:
    total = 0
    for s, x in zip(jax.tree.leaves(spec, is_leaf=_is_spec), jax.tree.leaves(params)):
        if isinstance(s, np.ndarray):
            total += int(s.sum()) * int(np.prod(x.shape[1:]))
        elif s:
            total += int(np.prod(x.shape))
    return total


def random_frozen_encoder(cfg) -> str | None:
    """Why training with this config leaves a randomly initialised audio encoder untrained (it is
    frozen, by `model.audio_encoder.frozen`, `train.stage=align` or a `train.freeze` glob, and no
    `train.init_from` loads one), or None. Such a run's audio understanding reads noise."""
    enc = cfg.model.audio_encoder
    if not enc.enabled or cfg.train.init_from:
        return None
    if enc.frozen:
        why = "model.audio_encoder.frozen=true"
    elif cfg.train.stage == "align":
        why = "train.stage=align"
    elif any(fnmatch.fnmatchcase("audio_encoder/x", g) or g.startswith("audio_encoder")
             for g in cfg.train.freeze):
        why = "a train.freeze glob"
    else:
        return None
    return (f"the audio encoder is randomly initialised and frozen ({why}, no train.init_from): "
            "it will not learn, so audio input stays noise to the model. Load one with "
            "`ualm import-hf HF_DIR --whisper WHISPER_DIR --out INIT` and train.init_from=INIT, "
            "or train it with model.audio_encoder.frozen=false")
