"""Task-level generation: text -> audio (with guidance) and audio -> caption, from a checkpoint.

Prompts are built with the same template as training (data_pipelines.template), so the model
sees at inference exactly the layout it was trained on; the unconditional prompt for guidance is
the conditional one with every id before the target `<assistant>` replaced by pad 0, as the
template's CFG dropout does in training.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ualm_jax.checkpoint import load_params, resolve
from ualm_jax.config import ConfigError, load_config
from ualm_jax.infer.decode import GenerationConfig, Generator, audio_codes, generate
from ualm_jax.model import vocab as V
from ualm_jax.model.vocab import JointVocab


@dataclass
class Loaded:
    cfg: object
    params: dict
    vocab: JointVocab
    tokenizer: object
    codec: object | None


def load(checkpoint: str | Path, tokenizer: str | None = None, codec: str | None = None) -> Loaded:
    config_path, _, _ = resolve(checkpoint)
    cfg = load_config(config_path)
    tok_path = tokenizer or cfg.data.tokenizer
    if not tok_path:
        raise ConfigError("no tokenizer: pass --tokenizer or set data.tokenizer in the run config")
    from data_pipelines.tokenizer import TextTokenizer

    tok = TextTokenizer(tok_path)
    codec_dir = codec or cfg.data.codec
    codec_obj = None
    if codec_dir:
        from data_pipelines.codecs import load_codec

        codec_obj = load_codec(codec_dir)
    return Loaded(cfg, load_params(checkpoint), JointVocab.from_model_config(cfg.model), tok, codec_obj)


def _render(segments, vocab):
    from data_pipelines.template import render

    return render(segments, vocab)


def _header(k: int, *ids) -> np.ndarray:
    rows = np.zeros((len(ids), k), np.int32)
    rows[:, 0] = ids
    return rows


def text_to_audio_prompts(m: Loaded, captions: list[str]):
    from data_pipelines.template import TEXT_TO_AUDIO_PROMPT, Segment

    k = max(m.cfg.model.num_codebooks, 1)
    cond, uncond = [], []
    for caption in captions:
        ex = _render([Segment("user", "text", m.tokenizer.encode(
            TEXT_TO_AUDIO_PROMPT.format(caption=caption)))], m.vocab)
        p = np.concatenate([ex.tokens, _header(k, V.ASSISTANT, V.AUDIO)])
        u = p.copy()
        u[: len(ex.tokens)] = V.PAD
        cond.append(p)
        uncond.append(u)
    return cond, uncond


def text_to_audio(m: Loaded, captions: list[str], gen_cfg: GenerationConfig) -> list[np.ndarray]:
    """-> codec codes [T, K] per caption (decode with m.codec)."""
    cond, uncond = text_to_audio_prompts(m, captions)
    guided = gen_cfg.cfg_scale != 1.0
    rows = len(captions) * (2 if guided else 1)
    max_len = max(len(p) for p in cond) + gen_cfg.max_new
    gen = Generator(m.cfg.model, m.params, rows, max_len)
    out = generate(gen, cond, gen_cfg, start_phase="audio", uncond_prompts=uncond if guided else None)
    return [audio_codes(segs[0], m.vocab) for segs in out]


def caption_features(m: Loaded, waves: list[np.ndarray]):
    """Log-mel windows cropped/padded to the encoder's window: [B, 1, T_mel, n_mels]."""
    from data_pipelines.features import log_mel

    enc = m.cfg.model.audio_encoder
    feats = np.zeros((len(waves), 1, enc.max_mel_frames, enc.n_mels), np.float32)
    frames = []
    for i, w in enumerate(waves):
        mel = log_mel(np.asarray(w, np.float32), enc.n_mels)[: enc.max_mel_frames]
        feats[i, 0, : len(mel)] = mel
        frames.append(max(1, ((len(mel) + 1) // 2) // enc.pool))
    return feats, frames


def caption(m: Loaded, waves: list[np.ndarray], gen_cfg: GenerationConfig) -> list[str]:
    from data_pipelines.template import AUDIO_TO_CAPTION_PROMPT, Segment

    if not m.cfg.model.audio_encoder.enabled:
        raise ConfigError("this model has no audio encoder (model.audio_encoder.enabled=false)")
    k = max(m.cfg.model.num_codebooks, 1)
    feats, frames = caption_features(m, waves)
    prompts, slots = [], []
    for n in frames:
        ex = _render([Segment("user", "text", m.tokenizer.encode(AUDIO_TO_CAPTION_PROMPT)),
                      Segment("user", "audio", int(n))], m.vocab)
        p = np.concatenate([ex.tokens, _header(k, V.ASSISTANT, V.TEXT)])
        s = np.full(len(p), -1, np.int32)
        start, count = ex.audio_input_frames[0]
        s[start:start + count] = np.arange(count)
        prompts.append(p)
        slots.append(s)
    longest = max(len(p) for p in prompts)
    slot_arr = np.full((len(prompts), longest), -1, np.int32)
    for i, s in enumerate(slots):
        slot_arr[i, : len(s)] = s
    gen = Generator(m.cfg.model, m.params, len(prompts), longest + gen_cfg.max_new)
    out = generate(gen, prompts, gen_cfg, start_phase="text", audio_features=feats,
                   audio_slots=slot_arr)
    texts = []
    for segs in out:
        ids = [i for s in segs if s.modality == "text" for i in s.ids]
        texts.append(m.tokenizer.decode(m.vocab.joint_to_text(np.asarray(ids, np.int64)).tolist()
                                        if ids else []))
    return texts
