"""One config system: typed dataclasses, loaded from YAML, overridden by dotted `key=value`.

Sections with a `preset` key (only `model` today) start from the named preset and apply the
user's keys on top. Unknown keys fail with the list of valid ones; invalid values fail with the
dotted name of the field.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

import ualm_jax.storage as storage


class ConfigError(ValueError):
    """A config value is missing, unknown or inconsistent; the message names the dotted key."""


# Shortest train.seq_len accepted: below it no packed row holds a whole sample of any task.
MIN_SEQ_LEN = 8


# Schema rules (checked generically, no per-field code):
# - a closed set of strings is a `Literal[...]` annotation: loading refuses any other value,
#   naming the dotted key, the value and the choices (`check_choices` re-checks a built object);
# - `_shape(default)` marks a model field that defines the checkpoint's parameters (`shape_keys`);
# - one merge rule for presets, `base:` files and overrides (`merge`).


def _shape(default):
    """A field whose change makes the checkpoint another model's (see shape_keys)."""
    return field(default=default, metadata={"shape": True})


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class AudioEncoderConfig:
    """Whisper-style encoder (AF-Whisper: Whisper-large-v3 + avg-pool 2 -> 25 frames/s)."""

    # Every field but `frozen` defines the checkpoint (resuming refuses a change, train/rundir.py).
    enabled: bool = _shape(True)
    n_mels: int = _shape(128)
    d_model: int = _shape(1280)
    n_layers: int = _shape(32)
    n_heads: int = _shape(20)
    d_ff: int = _shape(5120)
    max_mel_frames: int = _shape(3000)  # one 30 s window at a 10 ms hop
    pool: int = _shape(2)  # average pooling after the encoder (AF-Whisper); 1 disables it
    layer_norm_eps: float = _shape(1e-5)
    frozen: bool = True  # frozen in every UALM stage: no gradient flows into it


@dataclass
class ModelConfig:
    """A Qwen2.5 backbone plus UALM's multi-stream input/output and audio adapter."""

    preset: str = "tiny"
    # Backbone (Qwen2.5 names in comments: hidden_size, num_hidden_layers, ...).
    # `_shape(...)` marks a field that defines the checkpoint's parameters: resuming a run dir
    # whose config.yaml differs in one fails naming it (shape_keys, train/rundir.py).
    text_vocab_size: int = _shape(151936)
    d_model: int = _shape(1536)
    n_layers: int = _shape(28)
    n_heads: int = _shape(12)
    n_kv_heads: int = _shape(2)
    head_dim: int = _shape(128)
    d_ff: int = _shape(8960)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    qkv_bias: bool = True
    tie_embeddings: bool = _shape(False)  # UALM unties the head; True gives a plain tied Qwen2 model
    # Joint vocabulary: [specials | text shifted | K codebooks of C+1 ids].
    num_special: int = _shape(256)
    num_codebooks: int = _shape(8)
    codebook_size: int = _shape(1024)
    vocab_pad_multiple: int = _shape(128)  # joint vocab rounded up so it shards evenly
    # Audio input.
    audio_encoder: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)
    # UALM: one linear layer; "mlp": Audio Flamingo 3's 2-layer GELU MLP.
    adapter: Literal["linear", "mlp"] = _shape("linear")
    # Numerics and memory.
    dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"  # compute dtype
    param_dtype: Literal["bfloat16", "float32"] = _shape("float32")  # master weights
    scan_layers: bool = _shape(True)
    remat: Literal["none", "full", "dots", "dots_no_batch", "qkv_proj"] = "full"
    attention: Literal["auto", "xla", "cudnn"] = "auto"
    # Loss (see model/loss.py).
    loss_objective: Literal["reference", "modality", "consistent"] = "reference"
    loss_chunk_size: int = 1024  # sequence chunk for the head + CE; 0 = whole sequence
    # Streams 1..K-1 (reference/modality objectives): the audio softmax runs per interval of
    # whole codebooks, split as the reference splits it (one interval for 8 x 1025 ids).
    max_loss_interval: int = 13192
    # Loss weight of each stream at assistant audio positions; empty = 1/K each (reference).
    stream_weights: list = field(default_factory=list)

    def audio_stream_weights(self) -> list:
        """Per-stream loss weights of assistant audio: stream_weights, or 1/K each."""
        k = max(self.num_codebooks, 1)
        return [float(w) for w in self.stream_weights] if self.stream_weights else [1.0 / k] * k

    def validate(self, prefix: str = "model") -> None:
        p = prefix
        for name in ("text_vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                     "head_dim", "d_ff", "num_codebooks", "codebook_size", "vocab_pad_multiple"):
            if name == "num_codebooks" and self.num_codebooks == 0:
                continue  # text-only backbone
            if getattr(self, name) <= 0:
                raise ConfigError(f"{p}.{name}={getattr(self, name)} must be positive")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"{p}.n_heads={self.n_heads} must be a multiple of {p}.n_kv_heads={self.n_kv_heads}")
        if self.num_special < 9:
            raise ConfigError(f"{p}.num_special={self.num_special} must be >= 9 (UALM's specials)")
        check_choices(self, p)
        if self.loss_chunk_size < 0:
            raise ConfigError(f"{p}.loss_chunk_size={self.loss_chunk_size} must be >= 0")
        if self.max_loss_interval <= 0:
            raise ConfigError(f"{p}.max_loss_interval={self.max_loss_interval} must be positive")
        if self.stream_weights:
            k = max(self.num_codebooks, 1)
            if len(self.stream_weights) != k:
                raise ConfigError(f"{p}.stream_weights has {len(self.stream_weights)} entries; "
                                  f"expected one per stream ({k})")
            if any(not isinstance(w, (int, float)) or isinstance(w, bool) or w <= 0
                   for w in self.stream_weights):
                raise ConfigError(f"{p}.stream_weights={self.stream_weights} must be positive numbers")
        enc = self.audio_encoder
        if enc.enabled:
            if enc.d_model % enc.n_heads:
                raise ConfigError(f"{p}.audio_encoder.d_model={enc.d_model} must be divisible by "
                                  f"{p}.audio_encoder.n_heads={enc.n_heads}")
            if enc.max_mel_frames % (2 * enc.pool):
                raise ConfigError(f"{p}.audio_encoder.max_mel_frames={enc.max_mel_frames} must be "
                                  f"divisible by 2*pool={2 * enc.pool}")


@dataclass
class AxisSizes:
    """Sizes of the three mesh axes; at most one (over ICI and DCN together) may be -1."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1


def _default_rules() -> dict[str, Any]:
    # Logical axis -> mesh axes (MaxText style). FSDP vs TP vs DP is a change of mesh sizes only:
    # an axis of size 1 shards nothing.
    return {
        "batch": ["data", "fsdp"],
        "length": None,
        "embed": "fsdp",
        "heads": "tensor",
        "kv_heads": "tensor",
        "head_dim": None,
        "mlp": "tensor",
        "vocab": "tensor",
        "stream": None,
        "layers": None,
        "enc_embed": "fsdp",
        "enc_heads": "tensor",
        "enc_mlp": "tensor",
        "mels": None,
        "conv_window": None,
        # Activations.
        "act_batch": ["data", "fsdp"],
        "act_length": None,
        "act_embed": None,
        "act_heads": "tensor",
        "act_kv_heads": "tensor",
        "act_mlp": "tensor",
        "act_vocab": "tensor",
    }


MESH_AXES = ("data", "fsdp", "tensor")


@dataclass
class MeshConfig:
    ici: AxisSizes = field(default_factory=lambda: AxisSizes(data=1, fsdp=-1, tensor=1))
    dcn: AxisSizes = field(default_factory=AxisSizes)
    rules: dict = field(default_factory=_default_rules)

    def axis_sizes(self, num_devices: int, present: str = "") -> tuple[tuple, tuple]:
        """(ici, dcn) sizes over `num_devices` with the one -1 filled in. The one mesh rule
        (sharding.make_mesh and the launchers' preflight): the six sizes multiply to the device
        count. Errors name the value; `present` says where the devices are ("v5p-8 has 4 chips
        (4 devices)"; default: "N devices are present")."""
        names = [f"mesh.ici.{a}" for a in MESH_AXES] + [f"mesh.dcn.{a}" for a in MESH_AXES]
        sizes = [getattr(self.ici, a) for a in MESH_AXES] + [getattr(self.dcn, a) for a in MESH_AXES]
        for n, s in zip(names, sizes):
            if s == 0 or s < -1:
                raise ConfigError(f"{n}={s} must be a positive size or -1 (auto)")
        auto = [i for i, s in enumerate(sizes) if s == -1]
        if len(auto) > 1:
            raise ConfigError(f"only one mesh size may be -1, got "
                              f"{', '.join(names[i] for i in auto)}")
        known = math.prod(s for s in sizes if s != -1)
        present = present or f"{num_devices} devices are present"
        if auto:
            if num_devices % known:
                raise ConfigError(f"{names[auto[0]]}=-1 cannot be filled: the other mesh sizes "
                                  f"multiply to {known}, which does not divide the {num_devices} devices: {present}")
            sizes[auto[0]] = num_devices // known
        if math.prod(sizes) != num_devices:
            desc = ", ".join(f"{n}={s}" for n, s in zip(names, sizes) if s != 1) or "all 1"
            raise ConfigError(f"mesh sizes ({desc}) multiply to {math.prod(sizes)} but {present}")
        return tuple(sizes[:3]), tuple(sizes[3:])


@dataclass
class OptimConfig:
    learning_rate: float = 1e-4
    end_learning_rate_ratio: float = 0.1  # cosine decays to lr * this
    warmup_steps: int = 2000
    schedule: Literal["cosine", "constant"] = "cosine"
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0

    def validate(self, prefix: str = "optim") -> None:
        check_choices(self, prefix)
        # Each of these out of range turns every update into NaN/inf (or silently off): eps=0
        # divides 0 by 0 for a zero gradient, b2=1 divides by 1-b2^t=0, lr=nan poisons all.
        _in_range(f"{prefix}.learning_rate", self.learning_rate, lo=0.0)
        _in_range(f"{prefix}.end_learning_rate_ratio", self.end_learning_rate_ratio, lo=0.0, hi=1.0)
        _in_range(f"{prefix}.b1", self.b1, lo=0.0, hi=1.0, hi_open=True)
        _in_range(f"{prefix}.b2", self.b2, lo=0.0, hi=1.0, hi_open=True)
        _in_range(f"{prefix}.eps", self.eps, lo=0.0, lo_open=True)
        _in_range(f"{prefix}.weight_decay", self.weight_decay, lo=0.0)
        # clip_norm 0 switches clipping off (train/optim.py); a negative value is a typo.
        _in_range(f"{prefix}.clip_norm", self.clip_norm, lo=0.0, note="0 disables clipping")
        if self.warmup_steps < 0:
            raise ConfigError(f"{prefix}.warmup_steps={self.warmup_steps} must be >= 0")


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 8  # global, in packed sequences
    seq_len: int = 256
    microbatches: int = 1  # gradient accumulation: batch_size / microbatches per pass
    # What the run optimises: lm = weighted next-token CE (the loss of model.loss_objective) |
    # dpo = preference pairs (dpo.*; implies data.source=preference). The one key for "this is a
    # DPO run"; `train.objective` is accepted as its former name.
    mode: Literal["lm", "dpo"] = "lm"
    stage: Literal["full", "align", "custom"] = "full"  # what is trained, see train/freeze.py
    init_from: str = ""  # params of this checkpoint (e.g. `ualm import-hf` output) start a new run
    freeze: list = field(default_factory=list)  # extra globs of parameter names to freeze
    log_every: int = 10
    eval_every: int = 0  # 0: no periodic eval (still one at the end if eval_batches > 0)
    eval_batches: int = 2
    checkpoint_every: int = 50
    keep_last: int = 3  # newest checkpoints kept
    keep_every: int = 0  # also keep every step divisible by this forever; 0: none
    async_checkpoint: bool = True
    # skip: drop the update and count it | stop: raise naming the step
    nan_policy: Literal["skip", "stop"] = "skip"
    tensorboard: bool = True
    # Extra metric sinks beside metrics.jsonl (always) and TensorBoard (train.tensorboard):
    # "wandb" logs to Weights & Biases (WANDB_MODE=offline writes a local run, no network).
    trackers: list = field(default_factory=list)
    # [first, last]: a jax.profiler trace of steps first..last (1-based, inclusive) into
    # RUN/profile/ (view with TensorBoard's profile plugin or Perfetto); [] = no trace.
    profile_steps: list = field(default_factory=list)
    min_free_disk_factor: float = 2.0  # refuse to start with less free disk than this x one checkpoint
    probe_timeout_s: float = 60.0  # the run dir's probe write (gs:// clients retry for minutes)

    def validate(self, prefix: str = "train") -> None:
        for name in ("steps", "batch_size", "seq_len", "microbatches", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{prefix}.{name}={getattr(self, name)} must be positive")
        for name in ("eval_every", "eval_batches", "checkpoint_every", "keep_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{prefix}.{name}={getattr(self, name)} must be >= 0")
        if self.keep_last < 1:
            raise ConfigError(f"{prefix}.keep_last={self.keep_last} must be >= 1")
        if self.batch_size % self.microbatches:
            raise ConfigError(f"{prefix}.batch_size={self.batch_size} must be divisible by "
                              f"{prefix}.microbatches={self.microbatches}")
        check_choices(self, prefix)
        if self.seq_len < MIN_SEQ_LEN:
            raise ConfigError(f"{prefix}.seq_len={self.seq_len} must be >= {MIN_SEQ_LEN} (a packed "
                              "row holds at least one <bos> <user> <modality> ... <eos> sample)")
        _in_range(f"{prefix}.min_free_disk_factor", self.min_free_disk_factor, lo=0.0,
                  note="0 skips the free-disk check")
        _in_range(f"{prefix}.probe_timeout_s", self.probe_timeout_s, lo=0.0, lo_open=True)
        unknown = [x for x in self.trackers if x not in TRACKERS]
        if unknown:
            raise ConfigError(f"{prefix}.trackers has {unknown[0]!r}; known: {', '.join(TRACKERS)}")
        p = self.profile_steps
        if p and not (len(p) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in p)
                      and 1 <= p[0] <= p[1]):
            raise ConfigError(f"{prefix}.profile_steps={p!r} must be [first, last] with "
                              "1 <= first <= last (steps to trace), or [] for none")


TRACKERS = ("wandb",)

# The built-in synthetic stream's tasks (train/synthetic.py renders them): data.task_weights keys.
SYNTHETIC_TASKS = ("text", "caption", "t2a")


@dataclass(frozen=True)
class MixtureEntry:
    """One `data.mixture` entry (data_pipelines/mixture.py turns them into sampling weights)."""

    name: str
    path: str = ""  # a built dataset directory; empty when the caller hands sources in directly
    share: float = 1.0  # target share of TOKENS (any scale: shares are renormalised)
    upsample: float = 1.0  # multiplies the share (UALM upsamples generation data 2x)

    @property
    def weighted_share(self) -> float:
        return self.share * self.upsample


_MIXTURE_FIELDS = tuple(f.name for f in dataclasses.fields(MixtureEntry))


def _mixture_number(value, where: str, minimum: float, strict: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (strict and value == minimum):
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise ConfigError(f"{where}={value!r}: expected a number {bound}")
    return float(value)


def parse_mixture(entries, prefix: str = "data.mixture") -> list[MixtureEntry]:
    """Validate `data.mixture` (a list of mappings or MixtureEntry) -> list of MixtureEntry.

    The one parser of mixture entries: Config validation runs it at load (data.source=mixture)
    and data_pipelines/mixture.py re-exports it. Errors are ConfigError (a ValueError) naming the
    field, e.g. `data.mixture[1].share=-2: expected a number >= 0`.
    """
    fields = ", ".join(_MIXTURE_FIELDS)
    if isinstance(entries, (str, bytes, Mapping)) or not isinstance(entries, Sequence):
        raise ConfigError(f"{prefix} must be a list of {{{fields}}} entries, "
                          f"got {type(entries).__name__}")
    if not entries:
        raise ConfigError(f"{prefix} is empty: give at least one {{name, path, share}} entry")
    out, seen = [], {}
    for i, raw in enumerate(entries):
        where = f"{prefix}[{i}]"
        if isinstance(raw, MixtureEntry):
            raw = dataclasses.asdict(raw)
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where} must be a mapping with keys {fields}, "
                              f"got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(_MIXTURE_FIELDS), key=str)
        if unknown:
            raise ConfigError(f"{where} has unknown key(s) {', '.join(map(str, unknown))}; "
                              f"expected {fields}")
        name = raw.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{where}.name={name!r}: expected a non-empty task name")
        if name in seen:
            raise ConfigError(f"{where}.name={name!r}: already used by {prefix}[{seen[name]}]")
        seen[name] = i
        path = raw.get("path", "")
        if path is None:
            path = ""
        if not isinstance(path, str):
            raise ConfigError(f"{where}.path={path!r}: expected a directory path string")
        share = _mixture_number(raw.get("share", 1.0), f"{where}.share", 0.0, strict=False)
        upsample = _mixture_number(raw.get("upsample", 1.0), f"{where}.upsample", 0.0, strict=True)
        out.append(MixtureEntry(name, path, share, upsample))
    if sum(e.weighted_share for e in out) <= 0:
        raise ConfigError(f"{prefix}: every share is 0; at least one task needs share > 0")
    return out


@dataclass
class SeqioConfig:
    """`data.source=seqio`: a registered seqio Mixture or Task (data_pipelines/seqio_pipeline.py).
    Empty `mixture`: the `data.mixture` entries, registered as Tasks under their entry names and
    mixed by the token-share weights (the Grain path's weights and interleave)."""

    mixture: str = ""  # a registered seqio.Mixture or Task name (its own rates are kept)
    # Python modules imported first to register the user's Tasks/Mixtures (as T5X's gin imports
    # do); imported AFTER the data.mixture builds are registered, so their Mixtures may name them.
    modules: list = field(default_factory=list)
    # Each task's shuffle buffer (records) for the data.mixture tasks: the tf.data state in every
    # checkpoint holds these buffers, so their size is the checkpoint's data cost.
    shuffle_buffer: int = 256
    # The tf.data iterator is serialised every N batches (a checkpoint replays at most ~N batches
    # of examples from the newest snapshot); 1 = every batch, the most serialisation work.
    snapshot_every: int = 4

    def validate(self, prefix: str = "data.seqio") -> None:
        for i, m in enumerate(self.modules):
            if not isinstance(m, str) or not m.strip():
                raise ConfigError(f"{prefix}.modules[{i}]={m!r}: expected a Python module name")
        for key in ("shuffle_buffer", "snapshot_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{prefix}.{key}={getattr(self, key)} must be at least 1")


@dataclass
class DataConfig:
    # synthetic: built-in stream | mixture: built shards through Grain | seqio: a SeqIO Mixture or
    # the data.mixture builds through tf.data | preference
    source: Literal["synthetic", "mixture", "seqio", "preference"] = "synthetic"
    seqio: SeqioConfig = field(default_factory=SeqioConfig)
    preference_path: str = ""  # preference: a `ualm data build preference` output directory
    # synthetic only: relative example weights per task.
    task_weights: dict = field(default_factory=lambda: {"text": 1.0, "caption": 1.0, "t2a": 1.0})
    # mixture only: one MixtureEntry mapping per task (checked at load), e.g.
    #   {name: t2a, path: data/audiocaps, share: 0.331, upsample: 2.0}
    # `share` is a target share of TOKENS; `upsample` multiplies it (then shares are renormalised).
    mixture: list = field(default_factory=list)
    cfg_dropout: float = 0.05  # classifier-free guidance: drop all conditioning of t2a samples
    tokenizer: str = ""  # tokenizer.json of the text vocabulary (generation, builders)
    codec: str = ""  # codec directory (X-codec or a saved SpectralCodec) to decode generated audio
    max_clips_per_row: int = 4  # encoder-input clips (30 s windows) one packed row can hold
    # Loss on the `<assistant><modality>` header: assistant = every assistant segment's two
    # header tokens, weight 1 in stream 0 (the reference: the model learns to choose the
    # modality); reasoning = only headers continuing an assistant turn in reasoning records;
    # none = headers are always forced.
    supervise_headers: Literal["assistant", "reasoning", "none"] = "assistant"
    # true: text token id 0 (Qwen's "!") renders as pad 0 with no loss, as the reference's
    # preprocessing does; false (ours): it stays joint id text_offset like any other text id.
    text_id0_as_pad: bool = False
    read_threads: int = 0  # unused since rows read by random access (kept so older configs load)
    # Examples each row's packer may hold back waiting for room (Grain mixture): more packs
    # tighter (demo rows: 4 -> 95.8%, 8 -> 97.1% filled) and holds more rendered examples in memory.
    row_lookahead: int = 8
    prefetch: int = 2  # batches prepared ahead of the step (on the devices, by a host thread)
    eval_seed: int = 1234  # held-out batches come from a disjoint seed
    # false: every task reads its records in stored order (no shuffle), e.g. to compare the Grain
    # and SeqIO paths batch for batch or to debug one record.
    shuffle: bool = True
    # gs:// builds are copied here at start (Grain reads ArrayRecord with local file I/O); empty:
    # gs:// build paths are refused at load (or mount the bucket with gcsfuse). See staging.py.
    stage_dir: str = ""

    def validate(self, prefix: str = "data") -> None:
        check_choices(self, prefix)
        if self.codec.startswith(CODEC_PREFIX):  # an override's `spectral:DIR`: the folder
            self.codec = self.codec[len(CODEC_PREFIX):]
        if self.source == "preference" and not self.preference_path:
            raise ConfigError(f"{prefix}.source=preference needs {prefix}.preference_path")
        if not 0.0 <= self.cfg_dropout <= 1.0:
            raise ConfigError(f"{prefix}.cfg_dropout={self.cfg_dropout} must lie in [0, 1]")
        if self.source == "mixture" and not self.mixture:
            raise ConfigError(f"{prefix}.source=mixture needs {prefix}.mixture entries")
        self.seqio.validate(f"{prefix}.seqio")
        if self.prefetch < 1:
            raise ConfigError(f"{prefix}.prefetch={self.prefetch} must be at least 1")
        if self.row_lookahead < 1:
            raise ConfigError(f"{prefix}.row_lookahead={self.row_lookahead} must be at least 1")
        if self.source == "seqio" and not (self.mixture or self.seqio.mixture):
            raise ConfigError(f"{prefix}.source=seqio needs {prefix}.seqio.mixture (a registered "
                              f"seqio Mixture or Task) or {prefix}.mixture entries (built data)")
        # Each entry must parse as a MixtureEntry (the data pipeline parses them the same way);
        # config.yaml keeps them as the plain mappings the user wrote.
        built = self.source == "mixture" or (self.source == "seqio" and self.mixture)
        entries = parse_mixture(self.mixture, f"{prefix}.mixture") if built else []
        remote = [(f"{prefix}.mixture[{i}].path", e.path) for i, e in enumerate(entries)]
        remote += [(f"{prefix}.preference_path", self.preference_path)] if self.source == "preference" else []
        for key, path in remote:
            if isinstance(path, str) and storage.is_url(path) and not self.stage_dir:
                raise ConfigError(storage.local_io_route(path, key))
        if self.source == "synthetic":
            for name, w in self.task_weights.items():
                if name not in SYNTHETIC_TASKS:
                    raise ConfigError(f"{prefix}.task_weights has unknown task {name!r}; "
                                      f"tasks: {', '.join(SYNTHETIC_TASKS)}")
                if not isinstance(w, (int, float)) or w < 0:
                    raise ConfigError(f"{prefix}.task_weights.{name}={w!r} must be a number >= 0")


@dataclass
class DPOConfig:
    beta: float = 0.1  # (?)
    ce_weight: float = 1.0  # CE on the chosen sample keeps the policy from drifting (docs/ualm.md)
    # online: frozen train.init_from params | offline: pairs' ref_logp
    reference: Literal["online", "offline"] = "online"

    def validate(self, prefix: str = "dpo") -> None:
        check_choices(self, prefix)
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ConfigError(f"{prefix}.beta={self.beta} must be a finite number > 0")
        if not (math.isfinite(self.ce_weight) and self.ce_weight >= 0):
            raise ConfigError(f"{prefix}.ce_weight={self.ce_weight} must be a finite number >= 0")


@dataclass
class EvalConfig:
    """Generation metrics at every train.eval_every (`ualm eval` computes the same offline)."""
    prompts: str = ""  # JSON lines {prompt, reference?, events?}; empty: no generation metrics
    max_prompts: int = 16
    cfg_scale: float = 3.0  # UALM guidance lambda (1 = off)
    clap: str = ""  # a local transformers CLAP directory -> gen/clap
    fd_model: str = ""  # a local HF audio model directory or "mel-stats" -> gen/fd (needs references)

    def validate(self, prefix: str = "eval") -> None:
        if self.max_prompts < 1:
            raise ConfigError(f"{prefix}.max_prompts={self.max_prompts} must be at least 1")
        if not (math.isfinite(self.cfg_scale) and self.cfg_scale > 0):
            raise ConfigError(f"{prefix}.cfg_scale={self.cfg_scale} must be a finite number > 0")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0

    def validate(self) -> "Config":
        self.model.validate()
        self.optim.validate()
        self.train.validate()
        self.data.validate()
        self.dpo.validate()
        self.eval.validate()
        if self.eval.prompts and not (self.data.tokenizer and self.data.codec):
            raise ConfigError("eval.prompts generates audio during training: set data.tokenizer "
                              "and data.codec")
        if self.train.mode == "dpo":
            if self.data.source != "preference":
                raise ConfigError(f"train.mode=dpo reads preference pairs, not "
                                  f"data.source={self.data.source}: leave data.source unset (it "
                                  "becomes preference) and set data.preference_path")
            if self.dpo.reference == "online" and not self.train.init_from:
                raise ConfigError("dpo.reference=online freezes the starting model as the "
                                  "reference: set train.init_from (or use dpo.reference=offline)")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self, relative_to=None) -> str:
        """YAML of the config; with `relative_to` (the folder the file is written into), local
        paths are written relative to that folder (see `relative_paths`)."""
        raw = self.to_dict()
        if relative_to is not None:
            raw = relative_paths(raw, relative_to)
        return yaml.safe_dump(raw, sort_keys=False)


def _in_range(name: str, value: float, lo: float | None = None, hi: float | None = None,
              lo_open: bool = False, hi_open: bool = False, note: str = "") -> None:
    """Refuses NaN, +-inf and values outside [lo, hi] (open ends where asked), naming the key."""
    ok = math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if ok:
        return
    if lo is not None and hi is not None:
        allowed = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        rule = f"must be a finite number in {allowed}"
    elif lo is not None:
        rule = f"must be a finite number {'>' if lo_open else '>='} {lo:g}"
    else:
        rule = f"must be a finite number {'<' if hi_open else '<='} {hi:g}"
    raise ConfigError(f"{name}={value!r} {rule}" + (f" ({note})" if note else ""))


def _check_literal(name: str, value, options: tuple) -> None:
    if value not in options:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(str, options))}")


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def check_choices(obj, prefix: str) -> None:
    """Every `Literal[...]` field of dataclass `obj` holds one of its choices (loading already
    refuses others; this catches objects built or replaced in code)."""
    for f in dataclasses.fields(obj):
        tp = _hints(type(obj))[f.name]
        if typing.get_origin(tp) is Literal:
            _check_literal(f"{prefix}.{f.name}", getattr(obj, f.name), typing.get_args(tp))


def shape_keys(cls=None, prefix: str = "") -> tuple[str, ...]:
    """Dotted names of the fields marked `_shape` (metadata shape=True) in ModelConfig and its
    nested sections: the fields a checkpoint's parameter shapes and dtypes depend on."""
    cls = ModelConfig if cls is None else cls
    out: list[str] = []
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out += shape_keys(tp, f"{prefix}{f.name}.")
        elif f.metadata.get("shape"):
            out.append(prefix + f.name)
    return tuple(out)


# --------------------------------------------------------------------------------------------
# Loading: YAML -> raw dict -> dotted overrides -> presets -> dataclasses
# --------------------------------------------------------------------------------------------


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like dotted.key=value")
    key, raw = item.split("=", 1)
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Each `a.b.c=value` merges {a: {b: {c: value}}} over raw (`merge`: a mapping value such as
    `mesh.rules={embed: null}` changes only the keys it names)."""
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for k in keys[:-1]:
            node = node.get(k)
            if node is None:
                break
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k!r} is a value, not a section")
        for k in reversed(keys):
            value = {k: value}
        raw = merge(raw, value)
    return raw


def _expand_presets(raw: dict) -> dict:
    """`model` starts from its preset: the named one, else ModelConfig's default (a config without
    `model:` gets the default preset's shapes, not the dataclass field defaults)."""
    model = raw.get("model")
    if model is None:
        model = raw["model"] = {}
    if isinstance(model, dict):
        raw["model"] = merge(preset_dict(model.get("preset", ModelConfig.preset)), model)
    return raw


def merge(base: dict, top: dict) -> dict:
    """`top` over `base` -> a new dict. The one merge rule of config layers (model preset <-
    `base:` files in order <- the file <- dotted overrides): mappings merge key by key, at every
    depth (so `mesh.rules` in a file or an override changes only the rules it names); lists
    (data.mixture, train.freeze, ...) and scalars are replaced whole. A section absent from every
    layer takes its dataclass default (for `mesh.rules`: the whole default table)."""
    out = dict(base)
    for k, v in top.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def from_dict(cls, data: Any, prefix: str = ""):
    """Builds dataclass `cls` from a plain dict, checking keys and types; errors name the key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(unknown_keys_message(unknown, fields, prefix or "config"))
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}.{name}" if prefix else name)
    return cls(**kwargs)


def unknown_keys_message(unknown, valid, where: str, source: str = "") -> str:
    """`unknown key 'learning_rat' in optim (did you mean 'learning_rate'?); valid keys: ...`,
    prefixed by the file or override that holds it when known."""
    import difflib

    parts = []
    for u in unknown:
        close = difflib.get_close_matches(str(u), [str(v) for v in valid], n=1, cutoff=0.6)
        dotted = f"{where}.{u}" if where != "config" else str(u)
        parts.append(repr(dotted) + (f" (did you mean {where + '.' if where != 'config' else ''}"
                                     f"{close[0]}?)" if close else ""))
    head = f"{source}: " if source else ""
    return (f"{head}unknown key{'s' if len(parts) > 1 else ''} {', '.join(parts)}; valid keys in "
            f"{where}: {', '.join(sorted(map(str, valid)))}")


# Former names still accepted under a section (translated before the config is built).
_ALIASES = {"train": ("objective",)}


def check_keys(raw: dict, source: str, cls=None, prefix: str = "") -> None:
    """Every key of a raw config mapping (one file's, or one override's) exists in the schema;
    the error names `source` (the file or the override) and the closest valid key."""
    cls = cls or Config
    if not isinstance(raw, dict):
        return
    fields = {f.name: f for f in dataclasses.fields(cls)}
    allowed = set(fields) | set(_ALIASES.get(prefix, ()))
    if cls is Config:
        allowed.add("base")
    unknown = sorted(k for k in raw if k not in allowed)
    if unknown:
        raise ConfigError(unknown_keys_message(unknown, fields, prefix or "config", source))
    hints = _hints(cls)
    for name, value in raw.items():
        tp = hints.get(name)
        args = [a for a in typing.get_args(tp) if a is not type(None)] if tp is not None else []
        tp = args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) and args else tp
        if tp is not None and dataclasses.is_dataclass(tp) and isinstance(value, dict):
            check_keys(value, source, tp, f"{prefix}.{name}" if prefix else name)


def _coerce(tp, value, name: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, name)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, name)
    if origin is Literal:
        _check_literal(name, value, typing.get_args(tp))
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{name}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}={value!r} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} must be a string")
        return str(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping")
        return dict(value)
    if tp is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}={value!r} must be a list")
        return list(value)
    return value


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    """A config file with its `base:` files (paths relative to it; a list merges in order)
    underneath: e.g. `base: mixtures/paper_blend.yaml` brings in a data mixture preset."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist"
                          + (f" (named by `base:` in {seen[-1]})" if seen else ""))
    me = path if storage.is_url(path) else path.resolve()
    if me in seen:
        raise ConfigError(f"config file {path} includes itself through `base:`")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    check_keys(raw, str(path))
    _anchor_paths(raw, path.parent)
    bases = raw.pop("base", None) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: base={bases!r}: expected a file path or a list of them")
    merged: dict = {}
    for b in bases:
        merged = merge(merged, _read_yaml(path.parent / b, seen + (me,)))
    return merge(merged, raw)


# Keys holding file or folder paths. In a YAML file, a value starting with ./ or ../ is relative to
# that file's folder (so a config works from any directory); any other relative path is relative
# to the current directory, as on the command line.
PATH_KEYS = (("data", "preference_path"), ("data", "tokenizer"), ("data", "codec"),
             ("data", "stage_dir"), ("eval", "prompts"), ("eval", "clap"), ("eval", "fd_model"),
             ("train", "init_from"))


CODEC_PREFIX = "spectral:"  # the builders' codec spec; a codec folder names its class itself


def map_paths(raw: dict, fn) -> dict:
    """Applies fn to every path value of a raw config (PATH_KEYS and data.mixture[i].path), in
    place; returns raw. A `spectral:DIR` codec becomes DIR (its config.json says spectral)."""
    def apply(value):
        if isinstance(value, str) and value:
            return fn(value)
        return value

    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("codec"), str) \
            and data["codec"].startswith(CODEC_PREFIX):
        data["codec"] = data["codec"][len(CODEC_PREFIX):]
    for section, key in PATH_KEYS:
        node = raw.get(section)
        if isinstance(node, dict) and key in node:
            node[key] = apply(node[key])
    if isinstance(data, dict) and isinstance(data.get("mixture"), list):
        data["mixture"] = [dict(e, path=apply(e["path"])) if isinstance(e, dict) and "path" in e
                           else e for e in data["mixture"]]
    return raw


def _anchor_paths(raw: dict, folder) -> None:
    def anchored(value):
        if value.startswith(("./", "../")):
            joined = str(folder / value)
            return joined if storage.is_url(joined) else os.path.normpath(joined)
        return value

    map_paths(raw, anchored)


def relative_paths(raw: dict, folder) -> dict:
    """Local paths of a raw config rewritten relative to `folder` as ./ or ../ paths, which a
    config file in `folder` resolves from itself (`_anchor_paths`): a run dir's config.yaml keeps
    working from any directory and after the run dir and its data move together. URLs, and
    every path when `folder` is a URL, stay as they are."""
    if storage.is_url(folder):
        return raw
    here = os.path.abspath(os.fspath(folder))

    def relative(value):
        if storage.is_url(value):
            return value
        rel = os.path.relpath(os.path.abspath(value), here).replace(os.sep, "/")
        return rel if rel == ".." or rel.startswith("../") else "./" + rel

    return map_paths(raw, relative)


def _one_key_for_dpo(raw: dict) -> dict:
    """`train.objective` (the former name) -> `train.mode`; a DPO run needs one key: train.mode=dpo
    implies data.source=preference and data.source=preference implies train.mode=dpo."""
    train, data = raw.get("train"), raw.get("data")
    if isinstance(train, dict) and "objective" in train:
        train = raw["train"] = dict(train)
        old = train.pop("objective")
        if train.setdefault("mode", old) != old:
            raise ConfigError(f"train.objective={old} and train.mode={train['mode']} disagree: "
                              "set train.mode only (train.objective is its former name)")
    mode = train.get("mode") if isinstance(train, dict) else None
    source = data.get("source") if isinstance(data, dict) else None
    if mode == "dpo" and source is None:
        raw["data"] = dict(data or {}, source="preference")
    elif source == "preference" and mode is None:
        raw["train"] = dict(train or {}, mode="dpo")
    return raw


def config_path(path: str | Path):
    """A config file as given, else a preset of the same name shipped with the package
    (`configs/demo.yaml`, `demo.yaml` and `demo` all name configs/demo.yaml from any directory)."""
    given = storage.as_path(path)
    if storage.is_url(path) or given.is_file():
        return given
    import importlib.resources

    name = str(path).replace("\\", "/")
    name = name[len("configs/"):] if name.startswith("configs/") else name
    name = name if name.endswith((".yaml", ".yml")) else name + ".yaml"
    try:
        shipped = Path(str(importlib.resources.files("ualm_jax.configs").joinpath(name)))
    except ModuleNotFoundError:  # an install without the presets
        return given
    return shipped if shipped.is_file() else given


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
                cls=Config):
    raw: dict = {} if path is None else _read_yaml(config_path(path))
    if cls is Config:
        for item in overrides or []:
            keys, value = parse_override(item)
            for k in reversed(keys):
                value = {k: value}
            check_keys(value, f"override {item!r}")
    raw = apply_overrides(raw, list(overrides or []))
    if any(f.name == "model" for f in dataclasses.fields(cls)):
        raw = _expand_presets(raw)
    if cls is Config:
        raw = _one_key_for_dpo(raw)
    cfg = from_dict(cls, raw)
    return cfg.validate()


def _models_folder() -> Path:
    """configs/models/, shipped as the package data `ualm_jax.configs.models`."""
    import importlib.resources

    try:
        return Path(str(importlib.resources.files("ualm_jax.configs.models")))
    except ModuleNotFoundError:  # running from a checkout that was not installed
        return Path(__file__).resolve().parent.parent / "configs" / "models"


@functools.lru_cache(maxsize=None)
def _presets() -> dict[str, dict]:
    """Model presets by name: configs/models/NAME.yaml (the real Qwen2.5 shapes and `tiny`),
    tiny first, then by size."""
    files = sorted(_models_folder().glob("*.yaml"),
                   key=lambda f: (f.stem != "tiny", float(f.stem.rstrip("bB") or 0)
                                  if f.stem.rstrip("bB").replace(".", "").isdigit() else 0))
    return {f.stem: yaml.safe_load(f.read_text()) or {} for f in files}


def preset_names() -> tuple[str, ...]:
    return tuple(_presets())


def preset_dict(name: str) -> dict:
    """A model preset's fields (a fresh copy) with `preset` set to its name."""
    presets = _presets()
    if name not in presets:
        raise ConfigError(f"model.preset={name!r} is unknown; known presets: {', '.join(presets)}")
    d = copy.deepcopy(presets[name])
    d["preset"] = name
    return d


def preset_config(name: str, **overrides) -> ModelConfig:
    """A validated ModelConfig of a preset, with field overrides on top."""
    cfg = from_dict(ModelConfig, merge(preset_dict(name), overrides), "model")
    cfg.validate()
    return cfg
