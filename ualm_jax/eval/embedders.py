"""Swappable audio embedding / tagging backends for the generation metrics.

Every backend loads from a local directory only (no hub downloads) and records that directory
in `name`, so each metric can say which model produced it. The maths is in `metrics.py`.

- ClapEmbedder:    transformers ClapModel + ClapProcessor (LAION-CLAP: 48 kHz), audio and text.
- HFAudioEmbedder: any transformers audio model with hidden states, mean-pooled over time
                   (stand-in for OpenL3 once someone converts weights; also Whisper/AST/...).
- HFAudioTagger:   any transformers audio classifier -> class logits (stand-in for PaSST).
- MelStatsEmbedder: no weights, log-mel band means/stds; for smoke tests only.
"""
from __future__ import annotations

import abc
import math
import os
from typing import Sequence

import numpy as np

from data_pipelines.features import resample, split_windows, to_mono

# ---------------------------------------------------------------- waveform helpers
# to_mono / resample / split_windows are data_pipelines.features' (one copy, [N] / [N, channels]).


def peak_normalise(wave: np.ndarray, peak_db: float = -1.0) -> np.ndarray:
    """Scale so the absolute peak is peak_db dBFS (stable-audio-metrics uses -1 dB); silence stays."""
    peak = float(np.max(np.abs(wave))) if wave.size else 0.0
    if peak == 0.0:
        return wave
    return (wave * (10.0 ** (peak_db / 20.0) / peak)).astype(np.float32)


def _torch():
    import torch  # optional dependency: only the model-backed embedders need it

    return torch


# ---------------------------------------------------------------- interface


class AudioEmbedder(abc.ABC):
    """One embedding vector per clip. `name` says which model (and from where) made it."""

    name: str
    sample_rate: int

    def prepare(self, waves: Sequence[np.ndarray], sr: int) -> list[np.ndarray]:
        """Mono float32 at this embedder's rate; each wave is [N] or [N, channels]."""
        return [resample(to_mono(w), sr, self.sample_rate) for w in waves]

    @abc.abstractmethod
    def embed_audio(self, waves: Sequence[np.ndarray], sr: int) -> np.ndarray:
        """[N] clips at rate sr -> [N, D] float32."""

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """[N] texts -> [N, D], in the same space as the audio (joint models only)."""
        raise NotImplementedError(f"{type(self).__name__} has no text tower")

    @property
    def has_text(self) -> bool:
        return type(self).embed_text is not AudioEmbedder.embed_text


class MelStatsEmbedder(AudioEmbedder):
    """Mean and std over time of log-mel bands: a weight-free embedding for smoke metrics only."""

    def __init__(self, sample_rate: int = 16000, n_mels: int = 64, n_fft: int = 1024,
                 hop_length: int = 256):
        self.sample_rate, self.n_mels, self.n_fft, self.hop_length = sample_rate, n_mels, n_fft, hop_length
        self.name = f"mel-stats(sr={sample_rate},n_mels={n_mels})"

    def embed_audio(self, waves, sr):
        import librosa

        rows = []
        for w in self.prepare(waves, sr):
            if len(w) < self.n_fft:  # one full frame at least, so short clips still embed
                w = np.pad(w, (0, self.n_fft - len(w)))
            mel = librosa.feature.melspectrogram(y=w, sr=self.sample_rate, n_fft=self.n_fft,
                                                 hop_length=self.hop_length, n_mels=self.n_mels)
            logmel = np.log(mel + 1e-10)
            rows.append(np.concatenate([logmel.mean(axis=1), logmel.std(axis=1)]))
        return np.stack(rows).astype(np.float32)


# ---------------------------------------------------------------- CLAP


class ClapEmbedder(AudioEmbedder):
    """LAION-CLAP through transformers: audio and caption embeddings in one (normalised) space."""

    def __init__(self, model, processor, name: str, batch_size: int = 16, crop: bool = True,
                 quantise_int16: bool = True, device: str = "cpu"):
        self.model, self.processor, self.name = model.eval(), processor, name
        self.batch_size, self.crop, self.quantise_int16, self.device = batch_size, crop, quantise_int16, device
        fe = processor.feature_extractor
        self.sample_rate = int(fe.sampling_rate)
        self.max_samples = int(fe.nb_max_samples)
        tok_max = getattr(processor.tokenizer, "model_max_length", 512) or 512
        # RoBERTa positions start after the padding index: 2 of the table are not usable.
        self.max_text_tokens = min(int(tok_max), model.config.text_config.max_position_embeddings - 2)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str = "cpu", **kwargs) -> "ClapEmbedder":
        from transformers import ClapModel, ClapProcessor

        model = ClapModel.from_pretrained(path, local_files_only=True).to(device)
        processor = ClapProcessor.from_pretrained(path, local_files_only=True)
        return cls(model, processor, name=f"clap:{os.path.abspath(path)}", device=device, **kwargs)

    def _audio_inputs(self, waves: list[np.ndarray]) -> list[np.ndarray]:
        out = []
        for w in waves:
            # Longer clips get a *random* crop in the feature extractor; cut deterministically.
            if self.crop:
                w = w[:self.max_samples]
            if self.quantise_int16:  # what LAION-CLAP's own inference recipe does
                w = (np.clip(w, -1.0, 1.0) * 32767.0).astype(np.int16) / 32767.0
            out.append(w.astype(np.float32))
        return out

    def embed_audio(self, waves, sr):
        torch = _torch()
        waves = self._audio_inputs(self.prepare(waves, sr))
        rows = []
        for i in range(0, len(waves), self.batch_size):
            feats = self.processor.feature_extractor(waves[i:i + self.batch_size], sampling_rate=self.sample_rate,
                                                     return_tensors="pt")
            with torch.no_grad():
                out = self.model.get_audio_features(**{k: v.to(self.device) for k, v in feats.items()})
            rows.append(out.pooler_output.float().cpu().numpy())
        return np.concatenate(rows).astype(np.float32)

    def embed_text(self, texts):
        torch = _torch()
        rows = []
        for i in range(0, len(texts), self.batch_size):
            tok = self.processor.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                           max_length=self.max_text_tokens, return_tensors="pt")
            tok = {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
            with torch.no_grad():
                out = self.model.get_text_features(**tok)
            rows.append(out.pooler_output.float().cpu().numpy())
        return np.concatenate(rows).astype(np.float32)


# ---------------------------------------------------------------- generic transformers models


def _load_hf(path, auto_cls_name: str, device: str):
    import transformers

    fe = transformers.AutoFeatureExtractor.from_pretrained(path, local_files_only=True)
    model = getattr(transformers, auto_cls_name).from_pretrained(path, local_files_only=True)
    return fe, model.to(device).eval()


class HFAudioEmbedder(AudioEmbedder):
    """Any transformers audio model returning hidden states [1, T, D]; clips are run one at a time
    (no cross-clip padding in the mean) and frames are mean-pooled.

    layer=None uses last_hidden_state; an int picks hidden_states[layer].
    """

    def __init__(self, model, feature_extractor, name: str, layer: int | None = None, device: str = "cpu"):
        self.model, self.feature_extractor, self.name = model.eval(), feature_extractor, name
        self.layer, self.device = layer, device
        self.sample_rate = int(feature_extractor.sampling_rate)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, layer: int | None = None,
                        device: str = "cpu") -> "HFAudioEmbedder":
        fe, model = _load_hf(path, "AutoModel", device)
        if getattr(model.config, "is_encoder_decoder", False):
            model = model.get_encoder()  # e.g. Whisper: only the audio encoder embeds
        suffix = "" if layer is None else f"#layer{layer}"
        return cls(model, fe, name=f"{type(model).__name__}:{os.path.abspath(path)}{suffix}",
                   layer=layer, device=device)

    def _valid_frames(self, n_frames: int, n_samples: int) -> int:
        # Whisper-style extractors pad every clip to a fixed window (n_samples): keep only the
        # frames that cover real audio, else the mean is mostly padding.
        window = getattr(self.feature_extractor, "n_samples", None)
        if not window:
            return n_frames
        return max(1, min(n_frames, math.ceil(n_frames * n_samples / window)))

    def embed_frames(self, waves, sr) -> list[np.ndarray]:
        """Per clip [T_i, D] frame embeddings (for frame-level FD, as OpenL3 FD pools frames)."""
        torch = _torch()
        frames = []
        for w in self.prepare(waves, sr):
            inputs = self.feature_extractor(w, sampling_rate=self.sample_rate, return_tensors="pt")
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            with torch.no_grad():
                out = self.model(**inputs, output_hidden_states=self.layer is not None)
            hidden = out.last_hidden_state if self.layer is None else out.hidden_states[self.layer]
            hidden = hidden[0].float().cpu().numpy()
            frames.append(hidden[:self._valid_frames(hidden.shape[0], len(w))])
        return frames

    def embed_audio(self, waves, sr):
        return np.stack([f.mean(axis=0) for f in self.embed_frames(waves, sr)]).astype(np.float32)


class HFAudioTagger:
    """A transformers audio classifier giving class logits per clip (PaSST's role in KL).

    Long clips are cut into window_s windows (hop_s apart) and the logits averaged across
    windows before any softmax, following stable-audio-metrics.
    """

    def __init__(self, model, feature_extractor, name: str, window_s: float = 10.0, hop_s: float = 5.0,
                 device: str = "cpu"):
        self.model, self.feature_extractor, self.name = model.eval(), feature_extractor, name
        self.window_s, self.hop_s, self.device = window_s, hop_s, device
        self.sample_rate = int(feature_extractor.sampling_rate)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str = "cpu", **kwargs) -> "HFAudioTagger":
        fe, model = _load_hf(path, "AutoModelForAudioClassification", device)
        return cls(model, fe, name=f"{type(model).__name__}:{os.path.abspath(path)}", device=device, **kwargs)

    def logits(self, waves: Sequence[np.ndarray], sr: int) -> np.ndarray:
        """[N] clips -> [N, C] logits (window-averaged)."""
        torch = _torch()
        rows = []
        for w in waves:
            w = resample(to_mono(w), sr, self.sample_rate)
            windows = split_windows(w, self.sample_rate, self.window_s, self.hop_s)
            inputs = self.feature_extractor(windows, sampling_rate=self.sample_rate, return_tensors="pt")
            with torch.no_grad():
                out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
            rows.append(out.logits.float().mean(dim=0).cpu().numpy())
        return np.stack(rows).astype(np.float32)
