"""X-codec (general-audio variant, `hf-audio/xcodec-hubert-general`) through transformers'
`XcodecModel`, loaded from a LOCAL directory only (config.json + weights; never the network).

16 kHz mono, hop 320 -> 50 frames/s, residual VQ of 1024 codes; the number of codebooks follows the
bandwidth (4 kbps -> 8 codebooks, UALM's K). torch and transformers are imported on first use so the
rest of the data pipeline does not pay for them.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from data_pipelines.codecs.base import Codec


class XCodec(Codec):
    def __init__(self, model, bandwidth: Optional[float] = None, device: str = "cpu"):
        """model: a loaded `transformers.XcodecModel`; bandwidth (kbps) must be one of
        `config.target_bandwidths` (default: the highest, i.e. all quantizers)."""
        cfg = model.config
        bandwidths = list(cfg.target_bandwidths)
        self.bandwidth = float(bandwidths[-1] if bandwidth is None else bandwidth)
        if self.bandwidth not in bandwidths:
            raise ValueError(f"bandwidth {bandwidth} kbps not in the model's {bandwidths}")
        self.model = model.to(device).eval()
        self.device = device
        self.sample_rate = int(cfg.sample_rate)
        self.codebook_size = int(cfg.codebook_size)
        self.frame_rate = float(cfg.frame_rate)
        self.hop_length = int(cfg.hop_length)
        self.num_codebooks = int(model.quantizer.get_num_quantizers_for_bandwidth(self.bandwidth))

    @classmethod
    def from_pretrained(cls, path: str, bandwidth: Optional[float] = None,
                        device: str = "cpu") -> "XCodec":
        from transformers import XcodecModel

        model = XcodecModel.from_pretrained(str(path), local_files_only=True)
        return cls(model, bandwidth=bandwidth, device=device)

    def encode(self, wave: np.ndarray, sr: int) -> np.ndarray:
        import torch

        x = torch.from_numpy(self.prepare(wave, sr))[None, None].to(self.device)
        with torch.inference_mode():
            codes = self.model.encode(x, bandwidth=self.bandwidth, return_dict=False)  # [1, K, T]
        return codes[0].T.cpu().numpy().astype(np.int32)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        import torch

        c = torch.from_numpy(self.check_codes(codes).T.copy())[None].to(self.device)  # [1, K, T]
        with torch.inference_mode():
            wave = self.model.decode(c, return_dict=False)  # [1, 1, N]
        return wave[0, 0].float().cpu().numpy()
