"""KV-cache decoding: prefill a prompt, then one position per step, every stream at once.

The host keeps a small state machine per row (which segment is being written, where the delay
ramp is) and turns it into per-stream modes; masks, guidance and sampling run on device.
- After `<assistant>` the model chooses the modality token, then writes that segment under its
  mask; `<eot>` continues the turn (another `<assistant>` header follows), `<eos>` ends it.
- Audio: stream k emits its codebook pad during its first k steps (the delay ramp) and after its
  last frame; these pads are forced, not sampled. Stream 0 ends the clip by emitting codebook 0's
  pad; after the K-1 ramp positions the model writes the closing `<eos>`/`<eot>`.
- Classifier-free guidance: rows [cond; uncond] in one forward, logits mixed, one shared sample.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from ualm_jax.infer import sampling as S
from ualm_jax.format import vocab as V
from ualm_jax.format.delay import revert_delay
from ualm_jax.model.params import example_batch
from ualm_jax.model.ualm import UALM
from ualm_jax.format.vocab import JointVocab, vocab_of


PREFILL_BUCKET = 32


@dataclass
class GenerationConfig:
    max_new: int = 256  # positions per row
    max_audio_frames: int = 500  # a clip is ended (ramp forced) after this many frames
    text_temperature: float = 0.0  # greedy text
    audio_temperature: float = 0.8
    top_k: int = 20  # audio; text uses top_k only when sampled
    cfg_scale: float = 1.0  # UALM form: lambda*cond + (1-lambda)*uncond; 1 = no guidance
    # The unconditional prompt (infer/tasks.py): ours = pad before `<assistant>`, header kept, as
    # CFG dropout trains; reference = pad through `<assistant>`, only `<audio>` kept.
    uncond: str = "ours"
    seed: int = 0


@dataclass
class DecodedSegment:
    """One generated segment of a reply (not format.template.Segment, the prompt/record one)."""

    modality: str  # text | audio | speech
    ids: list = field(default_factory=list)  # stream-0 ids (text) or [K] rows (audio, delayed)


@dataclass
class RowState:
    phase: str = "modality"  # modality | text | audio | closer | role | done
    t: int = 0  # position within the current audio clip
    end: int | None = None  # frames T of the clip once stream 0 ended it
    segments: list = field(default_factory=list)


class Generator:
    def __init__(self, model_cfg, params, batch_size: int, max_len: int):
        self.cfg = model_cfg
        self.vocab = vocab_of(model_cfg)
        self.k = max(model_cfg.num_codebooks, 1)
        self.model = UALM(model_cfg, decode=True)
        self.params = params
        self.batch_size, self.max_len = batch_size, max_len
        shapes = jax.eval_shape(lambda: self.model.init(
            jax.random.key(0), example_batch(model_cfg, batch_size, max_len)))["cache"]
        self._cache_shapes = shapes
        self._forward = jax.jit(self._forward_impl)

    def new_cache(self):
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self._cache_shapes)

    def _forward_impl(self, params, cache, batch):
        (h, head, emb), mutated = self.model.apply(
            {"params": params, "cache": cache}, batch, method=UALM.hidden_and_output,
            mutable=["cache"])
        x = h[:, -1, None, :] + emb[None].astype(h.dtype)  # [B, K, d]
        logits = jnp.einsum("bkd,vd->bkv", x, head.astype(h.dtype),
                            preferred_element_type=jnp.float32)
        return logits, mutated["cache"]

    def forward(self, cache, batch):
        """Any number of new positions; returns stream logits of the last one and the cache."""
        return self._forward(self.params, cache, batch)


def _modes(state: RowState, vocab: JointVocab, k: int, gen: GenerationConfig):
    modes = np.full(k, S.FORCED, np.int32)
    forced = np.zeros(k, np.int32)
    temp = np.zeros(k, np.float32)
    if state.phase == "modality":
        modes[0] = S.MODALITY
    elif state.phase == "text":
        modes[0], temp[0] = S.TEXT, gen.text_temperature
    elif state.phase == "closer":
        modes[0] = S.CLOSER
    elif state.phase == "role":
        forced[0] = V.ASSISTANT
    elif state.phase == "audio":
        t, end = state.t, state.end
        if end is None and t >= gen.max_audio_frames:
            end = state.end = t  # too long: end the clip here
        for j in range(k):
            if t < j or (end is not None and t >= end + j):
                forced[j] = vocab.codebook_pad(j)
            else:
                modes[j], temp[j] = S.CODES, gen.audio_temperature
    # phase done: forced pad 0
    return modes, forced, temp


def _advance(state: RowState, row: np.ndarray, vocab: JointVocab, k: int) -> None:
    x0 = int(row[0])
    if state.phase == "modality":
        name = {V.TEXT: "text", V.AUDIO: "audio", V.SPEECH: "speech"}[x0]
        state.segments.append(DecodedSegment(name))
        state.phase, state.t, state.end = ("text" if name == "text" else "audio"), 0, None
    elif state.phase == "text":
        if x0 in (V.EOS, V.EOT):
            state.phase = "done" if x0 == V.EOS else "role"
        else:
            state.segments[-1].ids.append(x0)
    elif state.phase == "audio":
        state.segments[-1].ids.append(row.copy())
        if state.end is None and x0 == vocab.codebook_pad(0):
            state.end = state.t
        state.t += 1
        if state.end is not None and state.t >= state.end + k - 1:
            state.phase = "closer"
    elif state.phase == "closer":
        state.phase = "done" if x0 == V.EOS else "role"
    elif state.phase == "role":
        state.phase = "modality"


def generate(gen: Generator, prompts: list[np.ndarray], cfg: GenerationConfig,
             start_phase: str = "modality", uncond_prompts: list[np.ndarray] | None = None,
             audio_features=None, audio_slots=None,
             audio_mel_mask=None) -> list[list[DecodedSegment]]:
    """prompts: per row [L_i, K] joint ids ending right before what the model writes (after
    `<assistant>` for start_phase='modality', after `<assistant><audio>` for 'audio').
    uncond_prompts (same lengths) switch on guidance with cfg.cfg_scale. audio_mel_mask
    [B, F, T_mel] marks real mel frames, as the trainer's batches do (pass it: without it the
    encoder attends to the zero padding training masked out)."""
    vocab, k = gen.vocab, gen.k
    guided = uncond_prompts is not None and cfg.cfg_scale != 1.0
    rows = list(prompts) + (list(uncond_prompts) if guided else [])
    n = len(prompts)
    b = len(rows)
    if b != gen.batch_size:
        raise ValueError(f"the generator was built for {gen.batch_size} rows, got {b}")
    longest = max(len(p) for p in rows)
    if longest + cfg.max_new > gen.max_len:
        raise ValueError(f"prompt ({longest}) + max_new ({cfg.max_new}) exceeds max_len {gen.max_len}")
    # Round the prefill length up (more left pad) so prompts of similar lengths share one compile.
    longest = min(-(-longest // PREFILL_BUCKET) * PREFILL_BUCKET, gen.max_len - cfg.max_new)
    # Left-pad so every row's next position is the same cache slot; pads are invalid (segment 0).
    tokens = np.zeros((b, longest, k), np.int32)
    seg = np.zeros((b, longest), np.int32)
    pos = np.zeros((b, longest), np.int32)
    for i, p in enumerate(rows):
        L = len(p)
        tokens[i, longest - L:] = p
        seg[i, longest - L:] = 1
        pos[i, longest - L:] = np.arange(L)
    batch = {"tokens": tokens, "segment_ids": seg, "positions": pos}
    if audio_features is not None:
        shift = np.asarray(audio_slots)
        slots = np.full((b, longest), -1, np.int32)
        for i, p in enumerate(rows):
            L = len(p)
            slots[i, longest - L:] = shift[i % n, :L]
        batch["audio_features"] = np.concatenate([audio_features] * (b // n), axis=0)
        batch["audio_slots"] = slots
        if audio_mel_mask is not None:
            batch["audio_mel_mask"] = np.concatenate([audio_mel_mask] * (b // n), axis=0)
    cache = gen.new_cache()
    logits, cache = gen.forward(cache, batch)
    next_pos = pos[:, -1] + 1

    states = [RowState(phase=start_phase) for _ in range(n)]
    if start_phase in ("audio", "text"):  # the prompt already holds the modality header
        for s in states:
            s.segments.append(DecodedSegment(start_phase))
    key = jax.random.key(cfg.seed)
    sample_fn = _sampler(vocab, cfg.top_k, guided, cfg.cfg_scale)
    for _ in range(cfg.max_new):
        if all(s.phase == "done" for s in states):
            break
        modes, forced, temps = zip(*(_modes(s, vocab, k, cfg) for s in states))
        key, sub = jax.random.split(key)
        ids = np.asarray(sample_fn(sub, logits, np.stack(modes), np.stack(forced), np.stack(temps)))
        for s, row in zip(states, ids):
            if s.phase != "done":
                _advance(s, row, vocab, k)
        step_tokens = np.concatenate([ids] * (b // n), axis=0)[:, None, :]
        valid = np.array([s.phase != "done" for s in states] * (b // n), np.int32)[:, None]
        logits, cache = gen.forward(cache, {"tokens": step_tokens, "segment_ids": valid,
                                            "positions": next_pos[:, None].astype(np.int32)})
        next_pos = next_pos + 1
    return [s.segments for s in states]


@functools.lru_cache(maxsize=64)  # one compiled sampler per setting, not one per generate()
def _sampler(vocab, top_k, guided, scale):
    @jax.jit
    def fn(key, logits, modes, forced, temps):
        if guided:
            logits = S.cfg_mix(logits, scale)
        allowed = S.allowed_ids(modes, forced, vocab, logits.shape[-1])
        return S.sample(key, logits, allowed, temps, top_k)
    return fn


def audio_codes(segment: DecodedSegment, vocab: JointVocab) -> np.ndarray:
    """Delayed joint-id rows of an audio segment -> codec codes [T, K] (pads dropped)."""
    rows = np.asarray(segment.ids, np.int64).reshape(-1, vocab.num_codebooks)
    if len(rows) < vocab.num_codebooks:
        return np.zeros((0, vocab.num_codebooks), np.int32)
    codes = vocab.joint_to_codes(revert_delay(rows))
    return np.clip(codes, 0, vocab.codebook_size - 1)
