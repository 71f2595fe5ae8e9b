"""Audio codecs: waveform <-> codes [T, K]. `load_codec(spec)` reads every codec spec the builders
take: a codec folder (config.json says which class) or "spectral:DIR"."""
from __future__ import annotations

import json
import os

import ualm_jax.storage as storage
from data_pipelines.codecs.base import Codec
from data_pipelines.codecs.spectral import SpectralCodec
from data_pipelines.codecs.xcodec import XCodec

__all__ = ["Codec", "SpectralCodec", "XCodec", "codec_dir", "codec_identity", "codec_kind",
           "load_codec"]

SPECTRAL_PREFIX = "spectral:"  # `--codec spectral:DIR`, as the README's build example writes it


def codec_dir(spec) -> str:
    """The folder a codec spec names: "spectral:DIR" -> DIR; a folder (or URL) as it is."""
    spec = os.fspath(spec)
    return spec[len(SPECTRAL_PREFIX):] if spec.startswith(SPECTRAL_PREFIX) else spec


def codec_kind(spec) -> str:
    """"spectral", "xcodec" or "" (no config.json, not readable, or no known codec) of a local
    codec folder or spec."""
    path = os.path.join(codec_dir(spec), "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return ""
    if not isinstance(cfg, dict):
        return ""
    return "spectral" if cfg.get("codec") == "spectral_rvq" else (
        "xcodec" if cfg.get("model_type") == "xcodec" else "")


def codec_identity(spec) -> str:
    """What makes two codec specs the same codec: a SpectralCodec's contents (each build holds
    its own copy, so paths differ; np.savez stamps times, so bytes differ too), else the folder's
    absolute path (or URL)."""
    import hashlib

    directory = codec_dir(spec)
    if not storage.is_url(directory) and codec_kind(directory) == "spectral":
        codec = SpectralCodec.load(directory)
        h = hashlib.sha256(json.dumps(codec.config(), sort_keys=True).encode())
        h.update(codec.codebooks.tobytes())
        return "spectral:" + h.hexdigest()
    return directory if storage.is_url(directory) else os.path.abspath(directory)


def load_codec(spec, **kwargs) -> Codec:
    """A codec from any spec: a Codec (returned as it is), a folder holding a saved SpectralCodec
    or a local X-codec checkpoint (transformers `model_type: xcodec`), or "spectral:DIR"."""
    if isinstance(spec, Codec):
        return spec
    directory = codec_dir(spec)
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no codec config.json in {directory}")
    kind = codec_kind(directory)
    if os.fspath(spec).startswith(SPECTRAL_PREFIX) and kind != "spectral":
        raise ValueError(f"{path} describes no SpectralCodec (spectral_rvq), yet the codec was "
                         f"given as {os.fspath(spec)}")
    if kind == "spectral":
        codec = SpectralCodec.load(directory)
    elif kind == "xcodec":
        codec = XCodec.from_pretrained(directory, **kwargs)
    else:
        raise ValueError(f"{path} describes no known codec (neither spectral_rvq nor xcodec)")
    codec.source = os.path.abspath(directory)  # where it came from (builds record it)
    return codec
