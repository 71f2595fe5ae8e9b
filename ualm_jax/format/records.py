"""The stored example record: one conversation as flat numpy fields (what builders write into
ArrayRecord/TFRecord shards and what the Grain/SeqIO pipelines read back).

Text is stored as tokenizer ids, output audio as codec codes (the codec runs once, at build time),
input audio as log-mel frames for the frozen encoder. The template (special tokens, delay pattern,
loss weights, CFG dropout) is applied when reading, so one build serves every objective.

Fields:
  task        str
  roles       int32 [S]    0 system, 1 user, 2 assistant
  modalities  int32 [S]    0 text, 1 audio, 2 speech
  kinds       int32 [S]    0 text ids, 1 codec codes, 2 encoder input (log-mel)
  lengths     int32 [S]    ids / code frames / mel frames of each segment
  text        int32 [N]    all text ids, concatenated
  codes       int32 [M, K] all code frames, concatenated (K = 0 columns when there is no audio out)
  mel         float16 [F, n_mels] all mel frames, concatenated
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from ualm_jax.format.template import Segment

ROLE_IDS = {"system": 0, "user": 1, "assistant": 2}
MODALITY_IDS = {"text": 0, "audio": 1, "speech": 2}
TEXT, CODES, ENCODER = 0, 1, 2
REASON_TASK_PREFIX = "reason_"  # reasoning records: tasks reason_enrichment, reason_dialogue, ...


def is_reason_task(task: str) -> bool:
    """Reasoning records switch modality inside the assistant turn (supervised headers)."""
    return task.startswith(REASON_TASK_PREFIX)
_ROLES = {v: k for k, v in ROLE_IDS.items()}
_MODALITIES = {v: k for k, v in MODALITY_IDS.items()}


def to_record(task: str, segments: Sequence[Segment], mels: Sequence[np.ndarray] = (),
              num_codebooks: int = 0, n_mels: int = 0) -> dict:
    """segments whose content is an int (encoder input) take their mel from `mels`, in order."""
    mels = list(mels)
    roles, mods, kinds, lengths = [], [], [], []
    text, codes, mel = [], [], []
    for seg in segments:
        roles.append(ROLE_IDS[seg.role])
        mods.append(MODALITY_IDS[seg.modality])
        if seg.modality == "text":
            ids = np.asarray(seg.content, np.int32).reshape(-1)
            kinds.append(TEXT), lengths.append(ids.size), text.append(ids)
        elif seg.is_encoder_input:
            if not mels:
                raise ValueError("an encoder-input segment has no mel frames")
            m = np.asarray(mels.pop(0), np.float16)
            kinds.append(ENCODER), lengths.append(m.shape[0]), mel.append(m)
            n_mels = m.shape[1]
        else:
            c = np.asarray(seg.content, np.int32)
            kinds.append(CODES), lengths.append(c.shape[0]), codes.append(c)
            num_codebooks = c.shape[1]
    if mels:
        raise ValueError(f"{len(mels)} mel array(s) left over: more mels than encoder segments")
    return {
        "task": task,
        "roles": np.asarray(roles, np.int32),
        "modalities": np.asarray(mods, np.int32),
        "kinds": np.asarray(kinds, np.int32),
        "lengths": np.asarray(lengths, np.int32),
        "text": np.concatenate(text) if text else np.zeros((0,), np.int32),
        "codes": np.concatenate(codes) if codes else np.zeros((0, num_codebooks), np.int32),
        "mel": np.concatenate(mel) if mel else np.zeros((0, n_mels), np.float16),
    }


def from_record(rec: dict, frames_of=None) -> tuple[str, list[Segment], list[np.ndarray]]:
    """-> (task, segments, mels). `frames_of(n_mel_frames)` gives the encoder-frame count an
    encoder segment occupies in the sequence (e.g. features.encoder_frames for 16 kHz audio)."""
    task = rec["task"]
    task = task.decode() if isinstance(task, bytes) else str(task)
    text, codes, mel = np.asarray(rec["text"]), np.asarray(rec["codes"]), np.asarray(rec["mel"])
    ti = ci = mi = 0
    segments, mels = [], []
    for role, mod, kind, n in zip(rec["roles"], rec["modalities"], rec["kinds"], rec["lengths"]):
        role, mod, n = _ROLES[int(role)], _MODALITIES[int(mod)], int(n)
        if kind == TEXT:
            segments.append(Segment(role, mod, text[ti:ti + n].tolist()))
            ti += n
        elif kind == CODES:
            segments.append(Segment(role, mod, codes[ci:ci + n]))
            ci += n
        else:
            m = mel[mi:mi + n]
            mi += n
            mels.append(m)
            segments.append(Segment(role, mod, int(frames_of(n) if frames_of else n)))
    return task, segments, mels


def _side(rec: dict, side: str) -> dict:
    if side in rec:
        return rec[side]
    prefix = side + "/"
    return {k[len(prefix):]: v for k, v in rec.items() if k.startswith(prefix)}


def from_preference_record(rec: dict, frames_of=None) -> tuple:
    """-> (chosen, rejected, ref_logps): each side `from_record`'s (task, segments, mels);
    ref_logps = (chosen, rejected) floats, or None when the pair was stored without them.
    Takes the nested record `open_source` gives or a flat one with `chosen/...` keys."""
    chosen = from_record(_side(rec, "chosen"), frames_of)
    rejected = from_record(_side(rec, "rejected"), frames_of)
    logps: Optional[tuple] = None
    c, r = rec.get("ref_logp_chosen"), rec.get("ref_logp_rejected")
    if c is not None and r is not None and not (math.isnan(float(c)) or math.isnan(float(r))):
        logps = (float(c), float(r))
    return chosen, rejected, logps
