"""Segments -> one multi-stream training example (UALM's sequence template).

    <bos> { <role> <modality> CONTENT (<eos> | <eot>) }*

`<eot>` closes a segment when the next segment has the same role (a turn that continues in another
modality), otherwise `<eos>`. Conventions of every producer of the batch contract
(`ualm_jax/format/batch.py`; every producer renders through `render` below):
  * tokens [L, K] int32: text/special ids in stream 0 (other streams 0); at audio positions stream k
    holds codebook k's joint ids, delayed by k frames (T frames -> T+K-1 positions, ramp = pad ids).
  * loss_weights [L, K] float32 sit ON THE TARGET token (the weight of predicting tokens[t] from t-1):
    assistant text content and its closing <eos>/<eot> 1.0 in stream 0; assistant audio 1/K in every
    stream (ramp pads included; `stream_weights` overrides), so one audio frame weighs as one text
    token; the assistant `<assistant><modality>` header 1.0 in stream 0 only when asked
    (`supervise_headers`, the reference's default); everything else 0.
  * user audio given as a number of encoder frames occupies that many positions of stream-0 PAD; the
    model replaces their embeddings with adapter outputs (`audio_input_frames` says where).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import numpy as np

from ualm_jax.format import vocab as V
from ualm_jax.format.delay import apply_delay, revert_delay
from ualm_jax.format.vocab import JointVocab

ROLES = {"system": V.SYSTEM, "user": V.USER, "assistant": V.ASSISTANT}
MODALITIES = {"text": V.TEXT, "audio": V.AUDIO, "speech": V.SPEECH}

# Task prompts (docs/ualm.md): plain text in the user turn.
TEXT_TO_AUDIO_PROMPT = "<|text to audio|> Generate audio for this caption. {caption}"
AUDIO_TO_CAPTION_PROMPT = "<|audio to caption|> Generate caption for this audio."

Content = Union[Sequence[int], np.ndarray, int]
AudioInput = Union[np.ndarray, int]  # codes [T, K] or a number of encoder frames
Encode = Callable[[str], Sequence[int]]


@dataclass(frozen=True)
class Segment:
    """role: system/user/assistant; modality: text/audio/speech.

    content: text -> unshifted text-tokenizer ids; audio/speech -> codec codes [T, K] in [0, C)
    (any role), or, for system/user input only, an int number of continuous encoder frames.
    """
    role: str
    modality: str
    content: Content

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {sorted(ROLES)}, got {self.role!r}")
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {sorted(MODALITIES)}, got {self.modality!r}")

    @property
    def is_encoder_input(self) -> bool:
        return self.modality != "text" and isinstance(self.content, (int, np.integer))


@dataclass
class Example:
    tokens: np.ndarray  # [L, K] int32
    loss_weights: np.ndarray  # [L, K] float32
    audio_input_frames: list = field(default_factory=list)  # [(start_position, n_frames)]
    cfg_dropped: bool = False  # the conditioning was replaced by pad (classifier-free guidance)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


# Rendering ------------------------------------------------------------------------------------------
def _text_ids(seg: Segment, vocab: JointVocab) -> np.ndarray:
    ids = np.asarray(seg.content, np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab.text_vocab_size):
        raise ValueError(f"text ids must lie in [0, {vocab.text_vocab_size})")
    return vocab.text_to_joint(ids)


def _audio_rows(seg: Segment, vocab: JointVocab) -> np.ndarray:
    codes = np.asarray(seg.content)
    if codes.ndim != 2 or codes.shape[0] == 0:
        raise ValueError(f"{seg.role} {seg.modality} codes must be [T>0, K], got {codes.shape}")
    return apply_delay(vocab.codes_to_joint(codes), vocab.codebook_pads()).astype(np.int32)


def _stream0(ids, weight: float, k: int):
    """Special/text ids in stream 0 (other streams 0) with one loss weight in stream 0."""
    rows = np.zeros((len(ids), k), np.int32)
    rows[:, 0] = ids
    weights = np.zeros((len(ids), k), np.float32)
    weights[:, 0] = weight
    return rows, weights


def _render_segment(seg: Segment, closer: int, vocab: JointVocab, k: int,
                    supervise_header: bool, audio_weights: np.ndarray,
                    text_id0_as_pad: bool = False):
    """-> (rows [n, K], weights [n, K], encoder_slot (offset, n) or None) for one segment."""
    out = seg.role == "assistant"
    header, header_w = _stream0([ROLES[seg.role], MODALITIES[seg.modality]],
                                float(out and supervise_header), k)
    slot = None
    if seg.modality == "text":
        ids = _text_ids(seg, vocab)
        if text_id0_as_pad:  # the reference's rule: text id 0 is pad (zero embedding, no loss)
            ids = np.where(ids == vocab.text_offset, V.PAD, ids)
        body, body_w = _stream0(ids, float(out), k)
        body_w[body[:, 0] == V.PAD] = 0.0
    elif seg.is_encoder_input:
        if out:
            raise ValueError("assistant audio must be codec codes: encoder frames are input only")
        n = int(seg.content)
        if n <= 0:
            raise ValueError(f"an encoder-frame segment needs n_frames > 0, got {n}")
        body, body_w = _stream0([V.PAD] * n, 0.0, k)  # placeholders for adapter outputs
        slot = (len(header), n)
    else:
        body = _audio_rows(seg, vocab)
        body_w = np.broadcast_to(audio_weights if out else np.zeros(k, np.float32),
                                 body.shape).astype(np.float32)
    tail, tail_w = _stream0([closer], float(out), k)
    return (np.concatenate([header, body, tail]), np.concatenate([header_w, body_w, tail_w]), slot)


def _cfg_target(segments: Sequence[Segment]) -> Optional[int]:
    """The segment CFG dropout keeps: the last assistant audio/speech segment."""
    for i in range(len(segments) - 1, -1, -1):
        s = segments[i]
        if s.role == "assistant" and s.modality != "text":
            return i
    return None


def render(segments: Sequence[Segment], vocab: JointVocab, *,
           cfg_dropout_rng: Optional[np.random.Generator] = None, cfg_dropout_prob: float = 0.0,
           supervise_continuation_headers: bool = False, supervise_headers: bool = False,
           stream_weights: Optional[Sequence[float]] = None,
           text_id0_as_pad: bool = False) -> Example:
    """Segments -> Example (tokens [L, K], loss_weights [L, K], encoder slots).

    CFG dropout (UALM-Gen): when `cfg_dropout_rng` is given, exactly one uniform is drawn from it
    (so a per-sample generator stays reproducible whatever the outcome); if it falls below
    `cfg_dropout_prob` and the example has an assistant audio segment, every position outside the
    LAST assistant audio segment (<bos> included; header, codes and closing token kept) becomes pad 0
    with zero loss weight and no encoder slots. Lengths and positions are unchanged, so inference
    builds the unconditional prompt the same way: zero every id before the target `<assistant>`.

    supervise_continuation_headers: also train the `<assistant> <modality>` header of an assistant
    segment that follows another assistant segment (after `<eot>`), so the model learns to switch
    modality inside its own turn (reasoning); off by default, where headers are always forced.
    supervise_headers: train the header of EVERY assistant segment (`<assistant>` and its modality,
    weight 1 in stream 0), as the reference does: the model learns to choose the modality.
    stream_weights: K loss weights of assistant audio positions (default 1/K each).
    text_id0_as_pad: text token id 0 becomes pad 0 with loss weight 0 in every text segment, as
    the reference's preprocessing does (data.text_id0_as_pad); off: it is joint id text_offset.
    """
    if not segments:
        raise ValueError("render needs at least one segment")
    if not 0.0 <= cfg_dropout_prob <= 1.0:
        raise ValueError(f"cfg_dropout_prob must lie in [0, 1], got {cfg_dropout_prob}")
    k = max(vocab.num_codebooks, 1)
    audio_weights = (np.full(k, 1.0 / k, np.float32) if stream_weights is None
                     else np.asarray(stream_weights, np.float32))
    if audio_weights.shape != (k,):
        raise ValueError(f"stream_weights must hold {k} values, got {audio_weights.shape}")
    bos = np.zeros((1, k), np.int32)
    bos[0, 0] = V.BOS
    rows, weights, slots, spans = [bos], [np.zeros((1, k), np.float32)], [], []
    cur = 1
    for i, seg in enumerate(segments):
        nxt = segments[i + 1] if i + 1 < len(segments) else None
        closer = V.EOT if nxt is not None and nxt.role == seg.role else V.EOS
        continues = i > 0 and segments[i - 1].role == seg.role
        header = supervise_headers or (supervise_continuation_headers and continues)
        r, w, slot = _render_segment(seg, closer, vocab, k, header, audio_weights, text_id0_as_pad)
        if slot is not None:
            slots.append((cur + slot[0], slot[1]))
        spans.append((cur, cur + len(r)))
        rows.append(r)
        weights.append(w)
        cur += len(r)
    ex = Example(np.concatenate(rows), np.concatenate(weights), slots)

    if cfg_dropout_rng is not None:
        draw = float(cfg_dropout_rng.random())
        target = _cfg_target(segments)
        if draw < cfg_dropout_prob and target is not None:
            _drop_conditioning(ex, spans[target])
    return ex


def _drop_conditioning(ex: Example, keep: tuple) -> None:
    start, stop = keep
    outside = np.ones(len(ex), bool)
    outside[start:stop] = False
    ex.tokens[outside] = V.PAD
    ex.loss_weights[outside] = 0.0
    ex.audio_input_frames = [(s, n) for s, n in ex.audio_input_frames if start <= s < stop]
    ex.cfg_dropped = True


# Task prompts -----------------------------------------------------------------------------------------
def _user_audio(audio: AudioInput, modality: str) -> Segment:
    content = int(audio) if isinstance(audio, (int, np.integer)) else np.asarray(audio)
    return Segment("user", modality, content)


def _system(encode: Encode, system: Optional[str]) -> list:
    return [Segment("system", "text", list(encode(system)))] if system else []


def text_to_audio_segments(encode: Encode, caption: str, codes: np.ndarray,
                           modality: str = "audio") -> list:
    """user: prompt + caption (text) -> assistant: codec codes [T, K]."""
    prompt = TEXT_TO_AUDIO_PROMPT.format(caption=caption)
    return [Segment("user", "text", list(encode(prompt))),
            Segment("assistant", modality, np.asarray(codes))]


def captioning_segments(encode: Encode, audio: AudioInput, caption: str,
                        modality: str = "audio") -> list:
    """user: prompt (text), then the audio (codes [T, K] or n encoder frames) -> assistant: caption."""
    return [Segment("user", "text", list(encode(AUDIO_TO_CAPTION_PROMPT))),
            _user_audio(audio, modality),
            Segment("assistant", "text", list(encode(caption)))]


def audio_qa_segments(encode: Encode, turns: Sequence[tuple], system: Optional[str] = None,
                      modality: str = "audio") -> list:
    """turns: (question, audio or None, answer) per round; a user turn is [text, audio]."""
    segs = _system(encode, system)
    for question, audio, answer in turns:
        segs.append(Segment("user", "text", list(encode(question))))
        if audio is not None:
            segs.append(_user_audio(audio, modality))
        segs.append(Segment("assistant", "text", list(encode(answer))))
    return segs


def text_only_segments(encode: Encode, turns: Sequence[tuple], system: Optional[str] = None) -> list:
    """turns: (user text, assistant text) per round (reasoning / SFT)."""
    segs = _system(encode, system)
    for user, assistant in turns:
        segs += [Segment("user", "text", list(encode(user))),
                 Segment("assistant", "text", list(encode(assistant)))]
    return segs


# Reading an example back ---------------------------------------------------------------------------
_HEADER_ROLES = {v: k for k, v in ROLES.items()}
_HEADER_MODALITIES = {v: k for k, v in MODALITIES.items()}


def _name(t: int) -> str:
    return V.SPECIAL_NAMES.get(t, f"<special{t}>")


def _run_text(ids: np.ndarray, vocab: JointVocab, detok) -> str:
    text_ids = vocab.joint_to_text(ids)
    if detok is not None:
        return repr(detok([int(i) for i in text_ids]))
    return "text" + str([int(i) for i in text_ids])


def _render_run(s0: np.ndarray, vocab: JointVocab, detok) -> list:
    """Free tokens (outside a segment) -> list of short strings, grouping runs of one kind."""
    out, i = [], 0
    kinds = np.where(s0 == V.PAD, 0, np.where(vocab.is_text(s0), 1, np.where(vocab.is_audio(s0), 2, 3)))
    while i < len(s0):
        j = i
        while j < len(s0) and kinds[j] == kinds[i] and kinds[i] != 3:
            j += 1
        j = max(j, i + 1)
        kind = kinds[i]
        if kind == 0:
            out.append(f"<pad> x{j - i}")
        elif kind == 1:
            out.append(_run_text(s0[i:j], vocab, detok))
        elif kind == 2:
            out.append(f"[audio ids x{j - i}]")
        else:
            out.append(_name(int(s0[i])))
        i = j
    return out


def _content(stream: np.ndarray, s0: np.ndarray, modality: str, vocab: JointVocab, detok) -> str:
    if len(s0) == 0:
        return ""
    if modality == "text" and np.all(vocab.is_text(s0)):
        return _run_text(s0, vocab, detok)
    if modality != "text" and np.all(s0 == V.PAD):
        return f"[encoder frames x{len(s0)}]"
    if modality != "text" and stream.ndim == 2 and np.all(vocab.is_audio(stream)):
        k = stream.shape[1]
        frames = len(s0) - k + 1
        if frames > 0:
            codes = vocab.joint_to_codes(revert_delay(stream))
            head = " ".join(str(int(c)) for c in codes[:4, 0])
            return (f"[codes {frames} frames x {k} codebooks, {len(s0)} positions delayed; "
                    f"codebook 0: {head}{' ...' if frames > 4 else ''}]")
    return " ".join(_render_run(s0, vocab, detok))


def describe(tokens: np.ndarray, vocab: JointVocab, detok: Optional[Callable] = None,
             loss_weights: Optional[np.ndarray] = None) -> str:
    """A packed example ([L, K] or stream 0 [L]) as one line per segment, for humans.

    detok: text-tokenizer decode (unshifted ids -> str); without it text shows as ids.
    loss_weights: if given, each segment line ends with its total loss weight.
    """
    tokens = np.asarray(tokens)
    s0 = tokens[:, 0] if tokens.ndim == 2 else tokens
    lines, free, i, n = [], [], 0, len(s0)

    def flush():
        if free:
            lines.append(" ".join(_render_run(np.asarray(free), vocab, detok)))
            free.clear()

    while i < n:
        t = int(s0[i])
        if t == V.BOS:
            flush()
            lines.append("<bos>")
            i += 1
            continue
        if t in _HEADER_ROLES and i + 1 < n and int(s0[i + 1]) in _HEADER_MODALITIES:
            flush()
            modality = _HEADER_MODALITIES[int(s0[i + 1])]
            start = i + 2
            ends = np.nonzero((s0[start:] == V.EOS) | (s0[start:] == V.EOT))[0]
            stop = start + int(ends[0]) if len(ends) else n
            closer = _name(int(s0[stop])) if stop < n else "(truncated)"
            body = _content(tokens[start:stop], s0[start:stop], modality, vocab, detok)
            line = f"{_name(t)}{_name(int(s0[i + 1]))} {body} {closer}".replace("  ", " ")
            if loss_weights is not None:
                line += f"   [loss weight {float(np.sum(loss_weights[i:stop + 1])):.2f}]"
            lines.append(line)
            i = stop + 1
            continue
        free.append(t)
        i += 1
    flush()
    return "\n".join(lines)
