"""Host-side data feeding: the configured checkpointable iterator, this process's share of each
global batch, and a background thread that keeps batches ready on the devices."""
from __future__ import annotations

import queue
import threading

import jax

import ualm_jax.storage as storage
from data_pipelines.synthetic import TASKS, stream_for_model
from ualm_jax.distributed import allgather_json
from ualm_jax.format.batch import BatchIterator, check_batch
from ualm_jax.sharding import batch_sharding


def make_train_iterator(cfg):
    """A checkpointable iterator (`get_state`/`set_state`) of numpy batches: host-global ones
    (synthetic, preference: each process slices its rows) or this process's rows already
    (mixture, seqio: `per_host`, each process packs its own rows)."""
    return _make_iterator(cfg, "train")


def make_eval_iterator(cfg):
    """Held-out batches: the mixture's validation splits, or the synthetic stream on another seed."""
    return _make_iterator(cfg, "validation")


def _make_iterator(cfg, split: str):
    t = cfg.train
    if cfg.data.source == "preference":
        return _preference_iterator(cfg, "train")  # eval: shapes only (DPO has no eval yet)
    if cfg.data.source == "mixture":
        from data_pipelines.grain_pipeline import make_config_iterator

        return make_config_iterator(cfg, split)
    if cfg.data.source == "seqio":
        from data_pipelines.seqio_pipeline import make_seqio_iterator

        return make_seqio_iterator(cfg, split)
    weights = [cfg.data.task_weights.get(name, 0.0) for name in TASKS]
    return stream_for_model(cfg.model, t.batch_size, t.seq_len,
                            seed=cfg.seed if split == "train" else cfg.data.eval_seed,
                            tasks=TASKS, weights=weights, **_template_args(cfg))


def _preference_iterator(cfg, split):
    from data_pipelines.sources import check_build_matches_model, open_source
    from data_pipelines.preference_batches import PreferenceBatches
    from data_pipelines.staging import local_build_dir
    from ualm_jax.format.vocab import JointVocab

    if cfg.train.batch_size % 2:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} must be even for DPO "
                         "(half chosen, half rejected rows)")
    path = local_build_dir(cfg.data.preference_path, cfg.data.stage_dir, "data.preference_path")
    check_build_matches_model(path, cfg.model, "data.preference_path")
    return PreferenceBatches(open_source(path, split),
                             JointVocab.from_model_config(cfg.model), cfg.train.batch_size // 2,
                             cfg.train.seq_len, seed=cfg.seed,
                             offline_reference=cfg.dpo.reference == "offline",
                             text_id0_as_pad=cfg.data.text_id0_as_pad)


def _template_args(cfg) -> dict:
    """The loss weights and clip slots the config asks of the synthetic stream (it has no
    reasoning rows)."""
    return {"max_clips": cfg.data.max_clips_per_row, "supervise_headers": cfg.data.supervise_headers == "assistant",
            "text_id0_as_pad": cfg.data.text_id0_as_pad,
            "stream_weights": cfg.model.audio_stream_weights()}


def adopt_build_artefacts(cfg) -> list[str]:
    """Sets data.tokenizer / data.codec, when unset, from the builds the run reads (each build
    keeps a copy of its tokenizer and names its codec, data_pipelines/build.py), so the run's
    config.yaml records them and `ualm generate/eval/dpo make-pairs` on the run need neither
    --tokenizer nor --codec. Builds made with different tokenizers or codecs are refused.
    Returns one note per key set."""
    from data_pipelines.sources import build_artefacts
    from data_pipelines.mixture import parse_mixture
    from data_pipelines.staging import local_build_dir

    d = cfg.data
    if d.source == "mixture" or (d.source == "seqio" and d.mixture):
        places = [(f"data.mixture[{i}]", local_build_dir(e.path, d.stage_dir, f"data.mixture[{i}].path"))
                  for i, e in enumerate(parse_mixture(d.mixture))]
    elif d.source == "preference":
        places = [("data.preference_path",
                   local_build_dir(d.preference_path, d.stage_dir, "data.preference_path"))]
    else:
        return []
    found = [(where, build_artefacts(path)) for where, path in places]
    notes = []
    for key in ("tokenizer", "codec"):
        if getattr(d, key):
            continue
        given = [(where, a[key]) for where, a in found if a[key]]
        if not given:
            continue
        # Tokenizers and small codecs are copies inside each build: compare contents, not paths.
        from data_pipelines.codecs import codec_identity

        ident = storage.sha256 if key == "tokenizer" else codec_identity
        first_where, first = given[0]
        for where, value in given[1:]:
            if ident(value) != ident(first):
                raise ValueError(f"{where} was built with another {key} than {first_where} "
                                 f"({value} vs {first}): set data.{key} to the one to use")
        setattr(d, key, first)
        notes.append(f"data.{key}={first} (from the build of {first_where})")
    return notes


def reads_encoder_audio(cfg) -> bool:
    """Whether the run's data feeds clips to the audio encoder (a build of captioning, audio QA
    or reasoning records; the synthetic stream's captioning task). Remote builds count as yes."""
    from data_pipelines.mixture import parse_mixture
    from data_pipelines.sources import build_settings, holds_encoder_audio

    d = cfg.data
    if d.source == "synthetic":
        return d.task_weights.get("caption", 0) > 0
    if d.source == "preference":
        return False
    if not d.mixture:
        return True  # a user's SeqIO mixture: unknown, assume it does
    for e in parse_mixture(d.mixture):
        if storage.is_url(e.path):
            return True
        s = build_settings(e.path)
        if not s or holds_encoder_audio(s):
            return True
    return False


def task_names(cfg) -> tuple[str, ...]:
    """Names of the task ids in batches' `task_ids` (per-task loss is reported under them)."""
    if cfg.data.source == "mixture":
        from data_pipelines.mixture import parse_mixture

        return tuple(e.name for e in parse_mixture(cfg.data.mixture))
    if cfg.data.source == "seqio":
        from data_pipelines.seqio_pipeline import task_names as seqio_task_names

        return seqio_task_names(cfg)
    return () if cfg.data.source == "preference" else TASKS


def task_mix(batch: dict, names) -> dict:
    ids = batch.get("task_ids")
    if ids is None:
        return {}
    return {n: int((ids == i).sum()) for i, n in enumerate(names) if (ids == i).any()}


def process_rows(batch: dict, per_host: bool = False) -> dict:
    """This process's contiguous share of the global batch rows (`per_host` batches already are)."""
    n, i = jax.process_count(), jax.process_index()
    if n == 1 or per_host:
        return batch
    rows = next(iter(batch.values())).shape[0] // n
    return {k: v[i * rows:(i + 1) * rows] for k, v in batch.items()}


def to_global_arrays(host_batch: dict, mesh, rules) -> dict:
    out = {}
    n = jax.process_count()
    for k, v in host_batch.items():
        global_shape = (v.shape[0] * n,) + v.shape[1:]
        sharding = batch_sharding(mesh, rules, v.ndim, global_shape)
        out[k] = jax.make_array_from_process_local_data(sharding, v, global_shape)
    return out


class Prefetcher:
    """Runs the iterator in a thread, `depth` batches ahead. Each item is
    (device batch, data state after this batch, task mix, model FLOPs of the step) so a checkpoint at step n records
    exactly the iterator position after batch n, whatever was prefetched beyond it."""

    def __init__(self, iterator: BatchIterator, mesh, rules, names, host_spec: dict | None = None,
                 flops=None, depth: int = 2):
        """host_spec: the contract of this process's rows (format/batch.py), checked on the first
        batch so a producer that breaks it fails naming the key; flops: host batch -> dict with
        the step's model FLOPs on these rows ("total"; model/flops.py)."""
        self.iterator, self.mesh, self.rules, self.names = iterator, mesh, rules, names
        self.host_spec, self.flops = host_spec, flops
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            first = True
            while not self._stop.is_set():
                batch = next(self.iterator)
                state = self.iterator.get_state()
                mix = task_mix(batch, self.names)
                local = process_rows(batch, self.iterator.per_host)
                if first and self.host_spec is not None:
                    check_batch(local, self.host_spec, f"{type(self.iterator).__name__} batch")
                first = False
                flops = 0.0 if self.flops is None else self.flops(local)["total"] * jax.process_count()
                item = (to_global_arrays(local, self.mesh, self.rules), state, mix, flops)
                while not self._stop.is_set():
                    try:
                        self.queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # surfaced in the training thread
            self.error = e
            self.queue.put(None)

    def __next__(self):
        item = self.queue.get()
        if item is None:
            raise RuntimeError(f"data pipeline failed: {self.error!r}") from self.error
        return item

    def close(self):
        self._stop.set()
        self.thread.join(timeout=5)


# The iterator position in checkpoints: one state per process (each packs its own rows).
def gather_data_state(state: dict) -> dict:
    """Every process's iterator state, for the checkpoint (a collective: call on all processes)."""
    n = jax.process_count()
    if n == 1:
        return state
    return {"process_count": n, "processes": allgather_json(state)}


def merge_row_states(states: list) -> dict:
    """The Grain mixture's per-row packer states of every process as one state: each process of
    a resumed run, however many there are now, takes its rows from it (elastic resume)."""
    merged = dict(states[0])
    merged["packers"] = {k: v for s in states for k, v in s["packers"].items()}
    return merged


def local_data_state(saved: dict) -> dict:
    """This process's iterator state from a checkpoint's (see gather_data_state). The Grain
    mixture's state (one packer per global row) resumes on any process count; the others need
    the count that saved them."""
    if "processes" not in saved:  # saved by one process
        return saved
    if all("packers" in s for s in saved["processes"]):
        return merge_row_states(saved["processes"])
    n = int(saved["process_count"])
    if n != jax.process_count():
        raise ValueError(f"the checkpoint's data-iterator states were saved by {n} processes but "
                         f"this run has {jax.process_count()}: resuming would not continue the "
                         "same streams (restart the data with a fresh run dir or the same count)")
    return saved["processes"][jax.process_index()]


