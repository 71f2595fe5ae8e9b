"""The packed batch, declared once: keys, dtypes, shapes as a function of the config.

Every producer (the Grain packer, the synthetic stream, preference batches, the SeqIO converter,
the model's init batch) emits exactly these keys; the train loop, `bench step`, `bench compile`,
held-out eval and DPO build their shardings and abstract inputs from `batch_spec`, never from a
first batch. B rows, L = train.seq_len, K = max(num_codebooks, 1) streams, F =
data.max_clips_per_row clip slots, T = model.audio_encoder.max_mel_frames (one encoder window).

  tokens          [B, L, K] int32   joint-vocabulary ids (stream 0 text/special/audio, 1.. audio)
  loss_weights    [B, L, K] f32     per-position, per-stream loss weight (0 = not a target)
  segment_ids     [B, L]    int32   1.. per packed example, 0 = padding
  positions       [B, L]    int32   position within its example (restarts per segment)
  task_ids        [B, L]    int32   mixture task index, -1 on padding           (LM batches)
  audio_features  [B, F, T, n_mels] f32  log-mel window of each clip slot        (with an encoder)
  audio_mel_mask  [B, F, T] bool    mel frames holding real audio                (with an encoder)
  audio_slots     [B, L]    int32   clip c frame j -> c * frames_per_window + j, -1 elsewhere
  ref_logp        [B]       f32     stored reference log-probs         (DPO, dpo.reference=offline)

Logical axes (for sharding): the leading axis is `batch` (data x fsdp), the rest are replicated.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax
import numpy as np

from ualm_jax.format.layout import AudioLayout

# key -> (dtype, logical axes)
KEYS = {
    "tokens": (np.int32, ("batch", "length", "stream")),
    "loss_weights": (np.float32, ("batch", "length", "stream")),
    "segment_ids": (np.int32, ("batch", "length")),
    "positions": (np.int32, ("batch", "length")),
    "task_ids": (np.int32, ("batch", "length")),
    "audio_features": (np.float32, ("batch", "clip", "mel_frame", "mel")),
    "audio_mel_mask": (np.bool_, ("batch", "clip", "mel_frame")),
    "audio_slots": (np.int32, ("batch", "length")),
    "ref_logp": (np.float32, ("batch",)),
}
TEXT_KEYS = ("tokens", "loss_weights", "segment_ids", "positions")
AUDIO_KEYS = ("audio_features", "audio_mel_mask", "audio_slots")


@runtime_checkable
class BatchIterator(Protocol):
    """What every producer of training batches implements (the Grain packer, the synthetic
    stream, preference batches): numpy batches of the contract and a small JSON-able position
    that resumes the stream exactly. per_host: True when each batch already holds only this
    process's rows (each process packs its own share), False when it holds the global batch and
    the trainer slices this process's rows."""
    per_host: bool

    def __next__(self) -> dict: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...


class BatchContractError(ValueError):
    """A batch that does not match its spec; the message names the key and the expected value."""


def model_batch_spec(model_cfg, rows: int, seq_len: int, clips: int = 0,
                     mel_frames: int | None = None, task_ids: bool = True,
                     ref_logp: bool = False) -> dict:
    """The spec for explicit sizes: audio keys when the model has an encoder and clips > 0;
    mel_frames defaults to the encoder's window (the init batch uses the smallest one)."""
    k = max(model_cfg.num_codebooks, 1)
    shapes = {"tokens": (rows, seq_len, k), "loss_weights": (rows, seq_len, k),
              "segment_ids": (rows, seq_len), "positions": (rows, seq_len)}
    if task_ids:
        shapes["task_ids"] = (rows, seq_len)
    layout = AudioLayout.of_model(model_cfg, clips)
    if layout.enabled:
        t = layout.mel_frames if mel_frames is None else int(mel_frames)
        shapes.update(audio_features=(rows, clips, t, layout.n_mels),
                      audio_mel_mask=(rows, clips, t), audio_slots=(rows, seq_len))
    if ref_logp:
        shapes["ref_logp"] = (rows,)
    return {key: jax.ShapeDtypeStruct(shape, KEYS[key][0]) for key, shape in shapes.items()}


def batch_spec(cfg, rows: int | None = None) -> dict:
    """{key: ShapeDtypeStruct} of a batch of `cfg` (a ualm Config) with `rows` rows (default
    train.batch_size, the global batch). Preference (DPO) batches carry no task ids and no audio
    input; LM batches (mixture, synthetic) carry both."""
    rows = cfg.train.batch_size if rows is None else int(rows)
    if cfg.data.source == "preference":
        return model_batch_spec(cfg.model, rows, cfg.train.seq_len, task_ids=False,
                                ref_logp=cfg.dpo.reference == "offline")
    return model_batch_spec(cfg.model, rows, cfg.train.seq_len, cfg.data.max_clips_per_row)


def host_batch_spec(cfg, process_count: int) -> dict:
    """The spec of one process's rows of the global batch."""
    return batch_spec(cfg, cfg.train.batch_size // process_count)


def check_batch(batch: dict, spec: dict, where: str = "batch") -> None:
    """Raises BatchContractError naming the first key that is missing, unexpected, or of the
    wrong shape or dtype."""
    missing = [k for k in spec if k not in batch]
    extra = [k for k in batch if k not in spec]
    if missing or extra:
        raise BatchContractError(
            f"{where}: keys {sorted(batch)} do not match the batch contract {sorted(spec)}"
            + (f"; missing {missing}" if missing else "") + (f"; unexpected {extra}" if extra else ""))
    for key, want in spec.items():
        got = batch[key]
        shape, dtype = tuple(np.shape(got)), np.dtype(getattr(got, "dtype", np.asarray(got).dtype))
        if shape != tuple(want.shape):
            raise BatchContractError(f"{where}[{key!r}]: shape {shape}, expected {tuple(want.shape)}"
                                     f" (axes {KEYS[key][1]})")
        if dtype != np.dtype(want.dtype):
            raise BatchContractError(f"{where}[{key!r}]: dtype {dtype}, expected "
                                     f"{np.dtype(want.dtype)}")


def zeros(spec: dict) -> dict:
    """A numpy batch of zeros matching `spec`."""
    return {k: np.zeros(s.shape, s.dtype) for k, s in spec.items()}
