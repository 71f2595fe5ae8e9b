"""Audio codecs: waveform <-> codes [T, K]. `load_codec(dir)` picks the class from config.json."""
from __future__ import annotations

import json
import os

from data_pipelines.codecs.base import Codec
from data_pipelines.codecs.spectral import SpectralCodec
from data_pipelines.codecs.xcodec import XCodec

__all__ = ["Codec", "SpectralCodec", "XCodec", "load_codec"]


def load_codec(directory: str, **kwargs) -> Codec:
    """A saved SpectralCodec or a local X-codec checkpoint (transformers `model_type: xcodec`)."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no codec config.json in {directory}")
    with open(path) as f:
        cfg = json.load(f)
    if cfg.get("codec") == "spectral_rvq":
        codec = SpectralCodec.load(directory)
    elif cfg.get("model_type") == "xcodec":
        codec = XCodec.from_pretrained(directory, **kwargs)
    else:
        codec = None
    if codec is not None:
        codec.source = os.path.abspath(directory)  # where it came from (builds record it)
        return codec
    raise ValueError(f"{path} describes no known codec (neither spectral_rvq nor xcodec)")
