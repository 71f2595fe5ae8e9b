"""Task-level generation from a checkpoint: text -> audio (with guidance), audio -> caption, and
text answers to questions with or without a clip.

Prompts are built with the same template as training (ualm_jax.format.template), so the model
sees at inference exactly the layout it was trained on; the unconditional prompt for guidance is
the conditional one with every id before the target `<assistant>` replaced by pad 0, as the
template's CFG dropout does in training (`uncond="reference"`: the `<assistant>` is pad too and
only the final `<audio>` stays, as the reference's inference builds it). Input audio reaches the
encoder as the builders store it and the trainer's packer windows it (audio_windows), zero-padded
to full windows with the same mel mask as training (padding frames masked out of the encoder's
attention).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ualm_jax.checkpoint import load_params, resolve
from ualm_jax.config import ConfigError, load_config
from ualm_jax.train.rundir import check_same_model
from ualm_jax.infer.decode import GenerationConfig, Generator, audio_codes, generate
from ualm_jax.infer.generation_config import UNCOND
from ualm_jax.format import vocab as V
from ualm_jax.format.layout import AudioLayout
from ualm_jax.format.vocab import JointVocab, vocab_of
from ualm_jax.sharding import batch_shard_count


@dataclass
class Loaded:
    cfg: object
    params: dict
    vocab: JointVocab
    tokenizer: object
    codec: object | None
    generators: dict = field(default_factory=dict, repr=False)
    checkpoint: str | None = None  # where the parameters came from (sidecars name it)
    step: int | None = None
    mesh: object = None  # decoding runs sharded over it (None: one device)
    rules: dict | None = None


LEN_BUCKET = 64


def inference_mesh(cfg):
    """The run's mesh (`mesh.*`, overridable) when the devices present fit it, else FSDP over every
    device: a run trained on a pod still generates on one host. -> (mesh, rules)."""
    from ualm_jax.config import MeshConfig
    from ualm_jax.sharding import make_mesh

    try:
        return make_mesh(cfg.mesh), cfg.mesh.rules
    except ConfigError as e:
        fallback = MeshConfig(rules=cfg.mesh.rules)  # default sizes: fsdp=-1
        print(f"generation: the run's mesh does not fit these devices ({e}); decoding with FSDP "
              "over all of them (set mesh.ici.* to choose)", flush=True)
        return make_mesh(fallback), cfg.mesh.rules


def batch_shards(m: Loaded) -> int:
    """How many ways a decode batch's rows are split over the mesh (data x fsdp)."""
    return 1 if m.mesh is None else batch_shard_count(m.mesh, m.rules)


def generator_for(m: Loaded, rows: int, max_len: int) -> Generator:
    """A decoder for `rows` rows and at least `max_len` positions, reused across calls: the cache
    length is rounded up to LEN_BUCKET so calls of similar lengths share one compile."""
    key = (int(rows), -(-int(max_len) // LEN_BUCKET) * LEN_BUCKET)
    if key not in m.generators:
        m.generators[key] = Generator(m.cfg.model, m.params, *key, mesh=m.mesh, rules=m.rules)
    return m.generators[key]


def in_batches(m: Loaded, items: list, gen_cfg: GenerationConfig, fn, uids=None) -> list:
    """fn(chunk, chunk_uids) -> one output per item, over chunks of gen_cfg.batch items. Every
    chunk has the same number of rows (the last one padded with copies of its last item, whose
    outputs are dropped), a multiple of the mesh's batch shards, so a decoder compiles once and
    a guided cond/uncond pair never straddles two shards. uids key each item's sampling (default
    its index): an output depends on its item, uid and seed, not on the batch it fell in."""
    items = list(items)
    if not items:
        return []
    uids = list(range(len(items))) if uids is None else [int(u) for u in uids]
    shards = batch_shards(m)
    size = -(-min(max(1, gen_cfg.batch), len(items)) // shards) * shards
    out = []
    starts = range(0, len(items), size)
    for start in (tqdm(starts, desc="generating", unit="batch", disable=None, leave=False)
                  if len(starts) > 1 else starts):
        chunk, u = items[start:start + size], uids[start:start + size]
        pad = size - len(chunk)
        out += fn(chunk + [chunk[-1]] * pad, u + [u[-1]] * pad)[:len(chunk)]
    return out


def load(checkpoint: str | Path, tokenizer: str | None = None, codec: str | None = None,
         overrides=()) -> Loaded:
    """A checkpoint's parameters under its run config plus dotted `overrides` (e.g.
    model.attention=xla, or mesh.* to decode under another mesh), loaded straight into their
    shardings; shape-defining model keys may not change."""
    from ualm_jax.model.params import param_shardings
    from ualm_jax.model.ualm import UALM

    config_path, ckpts, step = resolve(checkpoint)  # checks the step's checksums first
    cfg = load_config(config_path, list(overrides))
    if overrides:  # the schema's shape fields may not change (the resume check, reused)
        check_same_model(config_path.parent, cfg,
                         f"{checkpoint} (with overrides {' '.join(overrides)})")
    mesh, rules = inference_mesh(cfg)
    shardings, shapes, _ = param_shardings(UALM(cfg.model), mesh, rules)
    params = load_params(ckpts / str(step), shapes, shardings, verify=False)
    m = from_params(cfg, params, mesh, rules, tokenizer, codec)
    m.checkpoint, m.step = str(checkpoint), int(step)
    return m


def from_params(cfg, params, mesh=None, rules=None, tokenizer: str | None = None,
                codec: str | None = None) -> Loaded:
    """A model ready to generate from a config and parameters (a checkpoint's or live ones),
    decoding over `mesh` when given."""
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
    return Loaded(cfg, params, vocab_of(cfg.model), tok, codec_obj, mesh=mesh, rules=rules)


def set_params(m: Loaded, params) -> None:
    """New weights for a loaded model, keeping its compiled decoders (the train-loop hook)."""
    m.params = params
    for gen in m.generators.values():
        gen.params = params


def _render(segments, m: Loaded):
    """The training template, with the run's data.text_id0_as_pad."""
    from ualm_jax.format.template import render

    return render(segments, m.vocab,
                  text_id0_as_pad=bool(getattr(m.cfg.data, "text_id0_as_pad", False)))


def _header(k: int, *ids) -> np.ndarray:
    rows = np.zeros((len(ids), k), np.int32)
    rows[:, 0] = ids
    return rows


def text_to_audio_prompts(m: Loaded, captions: list[str], uncond: str = "ours"):
    """-> (conditional, unconditional) prompts [L, K] of equal lengths, ending in `<audio>`.
    uncond: ours = pad before `<assistant>`; reference = pad through `<assistant>`."""
    from ualm_jax.format.template import TEXT_TO_AUDIO_PROMPT, Segment

    if uncond not in UNCOND:
        raise ValueError(f"uncond={uncond!r} is not one of {', '.join(UNCOND)}")
    k = max(m.cfg.model.num_codebooks, 1)
    cond, unconds = [], []
    for caption in captions:
        ex = _render([Segment("user", "text", m.tokenizer.encode(
            TEXT_TO_AUDIO_PROMPT.format(caption=caption)))], m)
        p = np.concatenate([ex.tokens, _header(k, V.ASSISTANT, V.AUDIO)])
        u = p.copy()
        u[: len(ex.tokens) + (uncond == "reference")] = V.PAD
        cond.append(p)
        unconds.append(u)
    return cond, unconds


def text_to_audio(m: Loaded, captions: list[str], gen_cfg: GenerationConfig,
                  uids=None) -> list[np.ndarray]:
    """-> codec codes [T, K] per caption (decode with m.codec), in batches (in_batches)."""
    return in_batches(m, captions, gen_cfg, lambda c, u: _text_to_audio(m, c, gen_cfg, u), uids)


def _text_to_audio(m: Loaded, captions: list[str], gen_cfg: GenerationConfig, uids):
    cond, uncond = text_to_audio_prompts(m, captions, gen_cfg.uncond)
    guided = gen_cfg.cfg_scale != 1.0
    rows = len(captions) * (2 if guided else 1)
    max_len = max(len(p) for p in cond) + gen_cfg.max_new
    gen = generator_for(m, rows, max_len)
    out = generate(gen, cond, gen_cfg, start_phase="audio", uncond_prompts=uncond if guided else None,
                   uids=uids)
    return [audio_codes(segs[0], m.vocab) for segs in out]


def _stored_mel(m: Loaded, wave: np.ndarray) -> np.ndarray:
    """One 16 kHz clip -> the mel a builder stores for it: the valid frames of Whisper-padded
    30 s windows, rounded to float16 (as stored), [n, n_mels] float32."""
    from data_pipelines.features import window_log_mels

    mels, mask = window_log_mels(np.asarray(wave, np.float32), m.cfg.model.audio_encoder.n_mels)
    return mels[mask].astype(np.float16).astype(np.float32)


def audio_windows(m: Loaded, wave: np.ndarray) -> list[np.ndarray]:
    """One 16 kHz clip -> the mel windows training feeds the encoder for it, bit for bit: the
    builder's stored mel cut by the one windowing rule (AudioLayout.windows)."""
    return AudioLayout.of_model(m.cfg.model, 1).windows(_stored_mel(m, wave))


def reply_prompts(m: Loaded, texts: list[str], waves: list):
    """reply_inputs without the mel mask (prompts, audio_slots, audio_features)."""
    return reply_inputs(m, texts, waves)[:3]


def reply_inputs(m: Loaded, texts: list[str], waves: list):
    """Prompts for a text reply to one user turn: its text (stripped; left out when empty), then
    its audio when given, then `<assistant><text>`, rendered by the training template (the layout
    of audio-QA, text-SFT and captioning rows). -> (prompts [L_i, K], audio_slots [B, L_max] or
    None, audio_features [B, F, T_mel, n_mels] or None, audio_mel_mask [B, F, T_mel] or None);
    slot c * frames_per_window + j is frame j of window c: each prompt is one row of the trainer's
    packer (BatchBuilder), its clips cut and numbered exactly as in training."""
    from data_pipelines.packing import BatchBuilder
    from data_pipelines.render import Rendered, encoder_clips
    from ualm_jax.format.template import Segment

    if len(texts) != len(waves):
        raise ValueError(f"{len(texts)} texts but {len(waves)} waves")
    enc = m.cfg.model.audio_encoder
    if any(w is not None for w in waves) and not enc.enabled:
        raise ConfigError("this model has no audio encoder (model.audio_encoder.enabled=false)")
    k = max(m.cfg.model.num_codebooks, 1)
    layout = AudioLayout.of_model(m.cfg.model, 1)
    rows = []
    for text, wave in zip(texts, waves):
        segs = [Segment("user", "text", m.tokenizer.encode(text.strip()))] if text.strip() else []
        mels = [] if wave is None else [_stored_mel(m, wave)]
        segs += [Segment("user", "audio", layout.frames_of(len(mel))) for mel in mels]
        if not segs:
            raise ValueError("a reply prompt needs text or audio")
        ex = _render(segs, m)
        p = np.concatenate([ex.tokens, _header(k, V.ASSISTANT, V.TEXT)])
        # A prompt carries no loss: zero weights only fill the packer's row.
        rows.append(Rendered(0, p, np.zeros(p.shape, np.float32),
                             encoder_clips(ex.audio_input_frames, mels, layout)))
    prompts = [e.tokens for e in rows]
    if not any(e.clips for e in rows):
        return prompts, None, None, None
    clip_slots = AudioLayout.of_model(m.cfg.model, max(len(e.clips) for e in rows))
    b = BatchBuilder(len(rows), max(len(e) for e in rows), k, clip_slots)
    for r, e in enumerate(rows):
        placed = b.place(e, row=r)
        assert placed, "an empty row sized to the longest prompt holds every prompt"
    return prompts, b.slots, b.features, b.mel_mask


def _reply(m: Loaded, texts: list[str], waves: list, gen_cfg: GenerationConfig,
           uids=None) -> list[str]:
    """Text replies (see reply_prompts), in batches (in_batches)."""
    return in_batches(m, list(zip(texts, waves)), gen_cfg,
                      lambda c, u: _reply_batch(m, [t for t, _ in c], [w for _, w in c], gen_cfg, u),
                      uids)


def _reply_batch(m: Loaded, texts: list[str], waves: list, gen_cfg: GenerationConfig, uids):
    prompts, slots, feats, mel_mask = reply_inputs(m, texts, waves)
    longest = max(len(p) for p in prompts)
    gen = generator_for(m, len(prompts), longest + gen_cfg.max_new)
    out = generate(gen, prompts, gen_cfg, start_phase="text", audio_features=feats,
                   audio_slots=slots, audio_mel_mask=mel_mask, uids=uids)
    texts = []
    for segs in out:
        ids = [i for s in segs if s.modality == "text" for i in s.ids]
        texts.append(m.tokenizer.decode(m.vocab.joint_to_text(np.asarray(ids, np.int64)).tolist()
                                        if ids else []))
    return texts


def caption(m: Loaded, waves: list[np.ndarray], gen_cfg: GenerationConfig, uids=None) -> list[str]:
    from ualm_jax.format.template import AUDIO_TO_CAPTION_PROMPT

    if not m.cfg.model.audio_encoder.enabled:
        raise ConfigError("this model has no audio encoder (model.audio_encoder.enabled=false)")
    return _reply(m, [AUDIO_TO_CAPTION_PROMPT] * len(waves), list(waves), gen_cfg, uids)


def answer(m: Loaded, questions: list[str], waves: list, gen_cfg: GenerationConfig,
           uids=None) -> list[str]:
    """Text answers to user questions, each with one 16 kHz clip or None (text only), laid out as
    the audio-QA and text-SFT builders lay out their rows: question, then audio."""
    return _reply(m, list(questions), list(waves), gen_cfg, uids)


def reason(m: Loaded, prompts: list[str], gen_cfg: GenerationConfig,
           uids=None) -> list[list[tuple]]:
    """UALM-Reason: each user prompt -> the assistant's whole reply, segment by segment, as the
    reason builder lays it out (a text plan, audio, a caption and critique, revised audio, ...):
    [("text", str) | ("audio", codes [T, K])] per prompt. The model chooses each next segment's
    modality after `<eot>`; `<eos>` ends the reply."""
    return in_batches(m, list(prompts), gen_cfg, lambda c, u: _reason(m, c, gen_cfg, u), uids)


def _reason(m: Loaded, prompts: list[str], gen_cfg: GenerationConfig, uids) -> list[list[tuple]]:
    prompts_, _, _, _ = reply_inputs(m, list(prompts), [None] * len(prompts))
    longest = max(len(p) for p in prompts_)
    gen = generator_for(m, len(prompts_), longest + gen_cfg.max_new)
    out = []
    for segs in generate(gen, prompts_, gen_cfg, start_phase="text", uids=uids):
        row = []
        for seg in segs:
            if seg.modality == "audio":
                row.append(("audio", audio_codes(seg, m.vocab)))
            else:
                ids = m.vocab.joint_to_text(np.asarray(seg.ids, np.int64)).tolist() if seg.ids else []
                row.append(("text", m.tokenizer.decode(ids)))
        out.append(row)
    return out

