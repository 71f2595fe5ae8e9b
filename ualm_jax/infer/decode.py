"""KV-cache decoding: prefill a prompt, then one position per step, every stream at once.

A small state machine per row says which segment is being written and where the delay ramp is,
and turns into per-stream modes; masks, guidance, sampling and the state machine itself run on
device, inside one compiled loop (`lax.while_loop`): the host dispatches a whole generation once
and reads the ids back at the end (`on_device=False` keeps the former host-driven loop, the
reference the tests compare with and `ualm bench decode` measures against).
- After `<assistant>` the model chooses the modality token, then writes that segment under its
  mask; `<eot>` continues the turn (another `<assistant>` header follows), `<eos>` ends it.
- Audio: stream k emits its codebook pad during its first k steps (the delay ramp) and after its
  last frame; these pads are forced, not sampled. Stream 0 ends the clip by emitting codebook 0's
  pad; after the K-1 ramp positions the model writes the closing `<eos>`/`<eot>`.
- Classifier-free guidance: each prompt's cond and uncond rows sit next to each other
  ([c0, u0, c1, u1, ...]), so a batch sharded over devices keeps each pair on one shard; logits
  are mixed per pair and one sample feeds both rows.
- Sampling is keyed per row by (seed, step, the row's uid), so an output depends on its prompt and
  seed only, not on its batch, its position in it or the number of processes.
- Under a mesh (`Generator(..., mesh, rules)`), parameters are sharded by the training rules and
  the KV cache over batch (data, fsdp) and KV heads (tensor), with one compile per shape.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ualm_jax.format import vocab as V
from ualm_jax.format.delay import revert_delay
from ualm_jax.format.vocab import JointVocab, vocab_of
from ualm_jax.infer import sampling as S
from ualm_jax.infer.generation_config import GenerationConfig
from ualm_jax.model.params import example_batch, param_shardings
from ualm_jax.model.ualm import UALM
from ualm_jax.sharding import activation_sharding, batch_sharding, logical_to_spec

PREFILL_BUCKET = 32
# Row phases (the device state machine's integers; RowState.phase names them on the host).
MODALITY, TEXT, AUDIO, CLOSER, ROLE, DONE = range(6)
PHASES = ("modality", "text", "audio", "closer", "role", "done")


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


def _cache_spec(path, shape, mesh, rules):
    """KV cache leaves [..., B, S, H, D] (key/value) and [..., B, S] (valid) shard over batch and
    KV heads; the index is replicated."""
    name = str(path[-1].key) if hasattr(path[-1], "key") else str(path[-1])
    lead = {"key": 4, "value": 4, "valid": 2}.get(name)
    if lead is None or len(shape) < lead:
        return NamedSharding(mesh, logical_to_spec((None,) * len(shape), rules, mesh, shape))
    tail = ("act_batch", None, "act_kv_heads", None)[:lead] if lead == 4 else ("act_batch", None)
    names = (None,) * (len(shape) - lead) + tail
    return NamedSharding(mesh, logical_to_spec(names, rules, mesh, shape))


class Generator:
    """A compiled decoder for `batch_size` rows (cond and uncond rows together) of at most
    `max_len` positions; with `mesh` (and the config's logical `rules`) everything is sharded."""

    def __init__(self, model_cfg, params, batch_size: int, max_len: int, mesh=None, rules=None):
        self.cfg = model_cfg
        self.vocab = vocab_of(model_cfg)
        self.k = max(model_cfg.num_codebooks, 1)
        self.model = UALM(model_cfg, decode=True)
        self.batch_size, self.max_len = batch_size, max_len
        self.mesh, self.rules = mesh, rules
        shapes = jax.eval_shape(lambda: self.model.init(
            jax.random.key(0), example_batch(model_cfg, batch_size, max_len)))["cache"]
        self._cache_shapes = shapes
        self._cache_shardings = None
        if mesh is not None:
            p_shard, _, _ = param_shardings(UALM(model_cfg), mesh, rules)
            params = jax.tree.map(_to_global, params, p_shard)
            self._cache_shardings = jax.tree_util.tree_map_with_path(
                lambda p, s: _cache_spec(p, s.shape, mesh, rules), shapes)
        self.params = params
        self._forward = jax.jit(self._in_mesh(self._forward_impl))
        self._zeros = jax.jit(lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
                              out_shardings=self._cache_shardings)
        self._loops: dict = {}

    def _in_mesh(self, fn):
        if self.mesh is None:
            return fn

        def wrapped(*args):
            with activation_sharding(self.mesh, self.rules):
                return fn(*args)
        return wrapped

    def new_cache(self):
        return self._zeros()

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
        return self._forward(self.params, cache, self._place(batch))

    def _place(self, batch):
        """Host arrays onto the mesh, rows over the batch axes (every process passes the whole
        batch: multi-host generation runs the same batches on every process)."""
        if self.mesh is None:
            return batch
        return {k: _to_global(v, batch_sharding(self.mesh, self.rules, np.ndim(v), np.shape(v)))
                for k, v in batch.items()}

    def loop(self, gen: GenerationConfig, guided: bool):
        key = (gen.max_new, gen.max_audio_frames, float(gen.text_temperature),
               float(gen.audio_temperature), int(gen.top_k), guided, float(gen.cfg_scale))
        if key not in self._loops:
            fn = functools.partial(_decode_loop, self._forward_impl, self.vocab, self.k, gen, guided)
            # Outputs replicated: every process reads every row's ids (multi-host included).
            out = None if self.mesh is None else (NamedSharding(self.mesh, P()),) * 2
            self._loops[key] = jax.jit(self._in_mesh(fn), out_shardings=out)
        return self._loops[key]


def _to_global(x, sharding):
    """A host array, or a jax.Array of another layout, in `sharding` (which may span processes:
    every process holds the same whole value)."""
    if isinstance(x, jax.Array):
        return x if x.sharding.is_equivalent_to(sharding, x.ndim) else jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


# The state machine, on the host (the reference; also turns the recorded ids into segments) ------
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


# The state machine, on device ---------------------------------------------------------------
def device_modes(phase, t, end, vocab: JointVocab, k: int, gen: GenerationConfig):
    """_modes for every row at once: phase/t/end [n] -> (modes, forced, temps [n, K], end)."""
    end = jnp.where((phase == AUDIO) & (end < 0) & (t >= gen.max_audio_frames), t, end)
    j = jnp.arange(k)[None, :]
    mode0 = jnp.select([phase == MODALITY, phase == TEXT, phase == CLOSER],
                       [S.MODALITY, S.TEXT, S.CLOSER], S.FORCED)
    forced0 = jnp.where(phase == ROLE, V.ASSISTANT, 0)
    temp0 = jnp.where(phase == TEXT, gen.text_temperature, 0.0)
    first = j == 0
    modes = jnp.where(first, mode0[:, None], S.FORCED)
    forced = jnp.where(first, forced0[:, None], 0)
    temps = jnp.where(first, temp0[:, None], 0.0).astype(jnp.float32)
    pads = vocab.audio_offset + j * vocab.codebook_stride
    ramp = (t[:, None] < j) | ((end[:, None] >= 0) & (t[:, None] >= end[:, None] + j))
    audio = (phase == AUDIO)[:, None]
    modes = jnp.where(audio, jnp.where(ramp, S.FORCED, S.CODES), modes).astype(jnp.int32)
    forced = jnp.where(audio, jnp.where(ramp, pads, 0), forced).astype(jnp.int32)
    temps = jnp.where(audio & ~ramp, gen.audio_temperature, temps)
    return modes, forced, temps, end


def device_advance(phase, t, end, ids, vocab: JointVocab, k: int):
    """_advance for every row at once (rows already done stay done)."""
    x0 = ids[:, 0]
    end_a = jnp.where((end < 0) & (x0 == vocab.codebook_pad(0)), t, end)
    t_a = t + 1
    after_audio = jnp.where((end_a >= 0) & (t_a >= end_a + k - 1), CLOSER, AUDIO)
    new = jnp.select(
        [phase == MODALITY, phase == TEXT, phase == AUDIO, phase == CLOSER, phase == ROLE],
        [jnp.where(x0 == V.TEXT, TEXT, AUDIO),
         jnp.where(x0 == V.EOS, DONE, jnp.where(x0 == V.EOT, ROLE, TEXT)),
         after_audio, jnp.where(x0 == V.EOS, DONE, ROLE), MODALITY], DONE)
    t = jnp.where(phase == MODALITY, 0, jnp.where(phase == AUDIO, t_a, t))
    end = jnp.where(phase == MODALITY, -1, jnp.where(phase == AUDIO, end_a, end))
    return new.astype(jnp.int32), t, end


def sample_rows(step_key, uids, logits, modes, forced, temps, vocab: JointVocab, top_k: int,
                guided: bool, scale: float):
    """One id per (row, stream): guidance mixed per cond/uncond pair, masks by mode, each row
    sampled with its own key (step key folded with the row's uid)."""
    if guided:
        logits = S.cfg_mix(logits, scale)
    allowed = S.allowed_ids(modes, forced, vocab, logits.shape[-1])
    keys = jax.vmap(lambda u: jax.random.fold_in(step_key, u))(uids)
    return jax.vmap(functools.partial(S.sample, top_k=top_k))(keys, logits, allowed, temps)


def _decode_loop(forward, vocab, k, gen, guided, params, cache, logits, seed, uids, phase, t, end,
                 next_pos):
    """gen.max_new steps at most (fewer once every row is done), all on device.
    -> ids [n, max_new, K] (pad 0 after a row is done), steps taken."""
    n = phase.shape[0]
    key = jax.random.key(seed)
    out = jnp.zeros((n, gen.max_new, k), jnp.int32)

    def cond(c):
        step, phase = c[0], c[3]
        return (step < gen.max_new) & jnp.any(phase != DONE)

    def body(c):
        step, cache, logits, phase, t, end, next_pos, out = c
        modes, forced, temps, end = device_modes(phase, t, end, vocab, k, gen)
        ids = sample_rows(jax.random.fold_in(key, step), uids, logits, modes, forced, temps,
                          vocab, gen.top_k, guided, gen.cfg_scale)
        done = phase == DONE
        ids = jnp.where(done[:, None], 0, ids)
        out = jax.lax.dynamic_update_slice(out, ids[:, None, :], (0, step, 0))
        new_phase, new_t, new_end = device_advance(phase, t, end, ids, vocab, k)
        phase = jnp.where(done, phase, new_phase)
        t, end = jnp.where(done, t, new_t), jnp.where(done, end, new_end)
        rows = _pairs(ids, guided)
        valid = _pairs((phase != DONE).astype(jnp.int32), guided)[:, None]
        logits, cache = forward(params, cache, {"tokens": rows[:, None, :], "segment_ids": valid,
                                                "positions": next_pos[:, None]})
        return step + 1, cache, logits, phase, t, end, next_pos + 1, out

    c = (jnp.int32(0), cache, logits, phase, t, end, next_pos, out)
    c = jax.lax.while_loop(cond, body, c)
    return c[7], c[0]


def _pairs(x, guided: bool):
    """Per-prompt values (numpy or jax) -> per-row values ([c0, u0, c1, u1, ...] with guidance)."""
    return x.repeat(2, axis=0) if guided else x


def generate(gen: Generator, prompts: list[np.ndarray], cfg: GenerationConfig,
             start_phase: str = "modality", uncond_prompts: list[np.ndarray] | None = None,
             audio_features=None, audio_slots=None, audio_mel_mask=None, uids=None,
             on_device: bool = True) -> list[list[DecodedSegment]]:
    """prompts: per row [L_i, K] joint ids ending right before what the model writes (after
    `<assistant>` for start_phase='modality', after `<assistant><audio>` for 'audio').
    uncond_prompts (same lengths) switch on guidance with cfg.cfg_scale. audio_mel_mask
    [B, F, T_mel] marks real mel frames, as the trainer's batches do (pass it: without it the
    encoder attends to the zero padding training masked out). uids: one int per prompt keying its
    sampling (default 0..n-1): the same uid and seed give the same output in any batch."""
    vocab, k = gen.vocab, gen.k
    guided = uncond_prompts is not None and cfg.cfg_scale != 1.0
    n = len(prompts)
    rows = [r for i in range(n) for r in ((prompts[i], uncond_prompts[i]) if guided
                                          else (prompts[i],))]
    b = len(rows)
    if b != gen.batch_size:
        raise ValueError(f"the generator was built for {gen.batch_size} rows, got {b}")
    uids = np.arange(n, dtype=np.int32) if uids is None else np.asarray(uids, np.int32)
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
        shift = _pairs(np.asarray(audio_slots), guided)
        slots = np.full((b, longest), -1, np.int32)
        for i, p in enumerate(rows):
            L = len(p)
            slots[i, longest - L:] = shift[i, :L]
        batch["audio_features"] = _pairs(np.asarray(audio_features), guided)
        batch["audio_slots"] = slots
        if audio_mel_mask is not None:
            batch["audio_mel_mask"] = _pairs(np.asarray(audio_mel_mask), guided)
    cache = gen.new_cache()
    logits, cache = gen.forward(cache, batch)
    next_pos = (pos[:, -1] + 1).astype(np.int32)
    states = [RowState(phase=start_phase) for _ in range(n)]
    if start_phase in ("audio", "text"):  # the prompt already holds the modality header
        for s in states:
            s.segments.append(DecodedSegment(start_phase))
    if on_device:
        phase = np.full(n, PHASES.index(start_phase), np.int32)
        out, steps = gen.loop(cfg, guided)(
            gen.params, cache, logits, *_place_rows(
                gen, np.int32(cfg.seed), uids, phase, np.zeros(n, np.int32),
                np.full(n, -1, np.int32), next_pos))
        out = np.asarray(jax.device_get(out))[:, :int(steps)]
        for s, ids in zip(states, out):  # replay on the host: the segments, nothing sampled
            for row in ids:
                if s.phase == "done":
                    break
                _modes(s, vocab, k, cfg)  # sets the end of a clip cut at max_audio_frames
                _advance(s, row, vocab, k)
        return [s.segments for s in states]
    key = jax.random.key(cfg.seed)
    sample_fn = _sampler(vocab, cfg.top_k, guided, cfg.cfg_scale)
    for step in range(cfg.max_new):
        if all(s.phase == "done" for s in states):
            break
        modes, forced, temps = zip(*(_modes(s, vocab, k, cfg) for s in states))
        ids = np.asarray(sample_fn(jax.random.fold_in(key, step), uids, logits, np.stack(modes),
                                   np.stack(forced), np.stack(temps)))
        for s, row in zip(states, ids):
            if s.phase != "done":
                _advance(s, row, vocab, k)
        step_tokens = _pairs(ids, guided)[:, None, :]
        valid = _pairs(np.array([s.phase != "done" for s in states], np.int32), guided)[:, None]
        logits, cache = gen.forward(cache, {"tokens": step_tokens, "segment_ids": valid,
                                            "positions": next_pos[:, None]})
        next_pos = next_pos + 1
    return [s.segments for s in states]


def _place_rows(gen: Generator, *arrays):
    """Per-prompt state vectors onto the mesh (replicated: they are tiny)."""
    if gen.mesh is None:
        return arrays
    rep = NamedSharding(gen.mesh, P())
    return tuple(_to_global(a, rep) for a in arrays)


@functools.lru_cache(maxsize=64)  # one compiled sampler per setting, not one per generate()
def _sampler(vocab, top_k, guided, scale):
    return jax.jit(functools.partial(sample_rows, vocab=vocab, top_k=top_k, guided=guided,
                                     scale=scale))


def audio_codes(segment: DecodedSegment, vocab: JointVocab) -> np.ndarray:
    """Delayed joint-id rows of an audio segment -> codec codes [T, K] (pads dropped)."""
    rows = np.asarray(segment.ids, np.int64).reshape(-1, vocab.num_codebooks)
    if len(rows) < vocab.num_codebooks:
        return np.zeros((0, vocab.num_codebooks), np.int32)
    codes = vocab.joint_to_codes(revert_delay(rows))
    return np.clip(codes, 0, vocab.codebook_size - 1)
