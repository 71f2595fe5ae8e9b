"""Everything the built-in demo trains on, from nothing: a procedural world, a tiny BPE, a fitted
SpectralCodec and the built datasets, in one folder.

    info = prepare_world_data("runs/demo/data")
    info["datasets"]   # {"t2a": dir, "caption": dir, "rich_t2a": dir, "audio_qa": dir, ...}

Folder:  world/ (make_world), tokenizer.json, codec/, data/<name>/ (build), ready.json (the stamp).

Datasets, one per mixture entry. The mixture tells tasks apart by ENTRY (each entry is one built
folder and its index is the batch's task id); it never reads a record's `task` field. So a captions
build with task "both" would hold t2a and caption records under one name and one share; the demo
builds the captions manifest twice instead:
  t2a       captions.jsonl, task "t2a":      caption -> audio codes
  caption   captions.jsonl, task "caption":  audio (mel) -> short caption
  rich_t2a  rich_captions.jsonl, task "t2a": rich caption -> audio codes. Not captioning: both
            caption kinds share AUDIO_TO_CAPTION_PROMPT, so training both would teach the model
            two answers to one prompt.
  audio_qa, text_sft, reason               their own kinds.
Validation rows are the world's held-out clips and problems (`"split": "validation"` lines).

Idempotent: ready.json holds the arguments (and the result); a call with the same arguments
returns it without work, other arguments rebuild everything.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import numpy as np

from data_pipelines.codecs.base import Codec

STAMP = "ready.json"
STAMP_VERSION = 2  # bump when the folder's layout or contents change meaning
CODEC_FIT_FRAMES = 6000

# dataset name -> (world manifest, builder kind, builder task)
DATASETS = {
    "t2a": ("captions", "captions", "t2a"),
    "caption": ("captions", "captions", "caption"),
    "rich_t2a": ("rich_captions", "captions", "t2a"),
    "audio_qa": ("audio_qa", "audio-qa", None),
    "text_sft": ("text_sft", "text-sft", None),
    "reason": ("reason", "reason", None),
}


def world_texts(paths: dict) -> list:
    """The train-split text of a world (captions, rich captions, QA, problems, reason prompts)
    plus the template's task prompts: what the tiny BPE is trained on (the same text
    `ualm data tokenizer` takes from one's own manifests; held-out lines stay out of the merges)."""
    from data_pipelines.builders.contents import manifest_texts

    return manifest_texts([paths[name] for name in
                           ("captions", "rich_captions", "audio_qa", "text_sft", "reason")])


def _train_waves(world_dir: str, world: dict) -> list:
    import soundfile as sf

    return [sf.read(os.path.join(world_dir, c["audio"]), dtype="float32")[0]
            for c in world["clips"] if c["split"] == "train"]


# Each clip feeds three text-to-audio-like datasets (t2a, rich_t2a, reason): encode it once.
def _digest(wave: np.ndarray) -> tuple:
    w = np.ascontiguousarray(wave)
    return hashlib.sha1(w.tobytes()).hexdigest(), w.shape, w.dtype.str


class _MemoCodec(Codec):
    """A codec that encodes each distinct waveform once (t2a, rich_t2a and reason share clips)."""

    def __init__(self, codec: Codec):
        self.inner, self._codes = codec, {}
        for name in ("sample_rate", "num_codebooks", "codebook_size", "frame_rate"):
            setattr(self, name, getattr(codec, name))

    def encode(self, wave: np.ndarray, sr: int) -> np.ndarray:
        key = (_digest(wave), int(sr))
        if key not in self._codes:
            self._codes[key] = np.asarray(self.inner.encode(wave, sr))
        return self._codes[key].copy()

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return self.inner.decode(codes)


def _counts(report: dict) -> dict:
    return {split: v["records"] for split, v in report["splits"].items()}


def prepare_world_data(out_dir: str, n_clips: int = 240, seed: int = 0, clip_seconds: float = 2.0,
                       n_text: int | None = None,
                       n_mels: int = 16, codec_k: int = 4, codec_c: int = 32,
                       vocab_size: int = 512) -> dict:
    """Make (or reuse) the demo's world, tokenizer, codec and datasets under out_dir.

    n_mels must equal the model's audio_encoder.n_mels, codec_k / codec_c its num_codebooks /
    codebook_size, and the returned text_vocab_size must not exceed model.text_vocab_size.
    -> {"tokenizer", "codec", "world", "datasets": {name: dir}, "text_vocab_size", "codec_k",
        "codec_c", "counts": {name: {split: records}}, "seconds", "args"}
    """
    args = {"version": STAMP_VERSION, "n_clips": int(n_clips), "seed": int(seed),
            "n_text": int(n_clips if n_text is None else n_text),
            "clip_seconds": float(clip_seconds), "n_mels": int(n_mels), "codec_k": int(codec_k),
            "codec_c": int(codec_c), "vocab_size": int(vocab_size),
            "codec_fit_frames": CODEC_FIT_FRAMES}
    stamp = os.path.join(out_dir, STAMP)
    if os.path.isfile(stamp):
        with open(stamp) as f:
            saved = json.load(f)
        if saved.get("args") == args:
            return _absolute(saved["result"], out_dir)
        os.remove(stamp)  # other arguments: a half-done rebuild must never look ready
    started = time.perf_counter()
    result = _prepare(out_dir, args)
    result["seconds"] = round(time.perf_counter() - started, 2)
    with open(stamp, "w") as f:  # written last: its presence means everything above finished
        json.dump({"args": args, "result": result}, f, indent=1, sort_keys=True)
        f.write("\n")
    return _absolute(result, out_dir)


def _absolute(result: dict, out_dir: str) -> dict:
    """The stamp stores paths relative to out_dir, so the folder can move."""
    out = dict(result)
    for key in ("tokenizer", "codec", "world"):
        out[key] = os.path.join(out_dir, result[key])
    out["datasets"] = {k: os.path.join(out_dir, v) for k, v in result["datasets"].items()}
    return out


def _prepare(out_dir: str, args: dict) -> dict:
    from data_pipelines.build import build
    from data_pipelines.codecs import SpectralCodec
    from data_pipelines.tokenizer import TextTokenizer, train_tiny_bpe
    from data_pipelines.demo.world import load_world, make_world

    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    for stale in ("world", "codec", "data", "tokenizer.json"):  # nothing of an older build stays
        path = os.path.join(out_dir, stale)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    os.makedirs(out_dir, exist_ok=True)
    world_dir = os.path.join(out_dir, "world")
    paths = make_world(world_dir, args["n_clips"], args["seed"], args["clip_seconds"],
                       n_text=args["n_text"])
    world = load_world(paths["world"])

    tok_path = train_tiny_bpe(world_texts(paths), args["vocab_size"], out_dir)
    tokenizer = TextTokenizer(tok_path)
    # A frame subset bounds the k-means time; 6000 frames (60 clips) already give exact
    # analyser round trips on the world's validation clips.
    codec = SpectralCodec.fit(_train_waves(world_dir, world), 16000, K=args["codec_k"],
                              C=args["codec_c"], seed=args["seed"], max_frames=CODEC_FIT_FRAMES)
    codec_dir = codec.save(os.path.join(out_dir, "codec"))

    datasets, counts, memo = {}, {}, _MemoCodec(codec)
    memo.source = codec_dir  # recorded in each build (a run on them needs no --codec)
    for name, (manifest, kind, task) in DATASETS.items():
        rel = os.path.join("data", name)
        report = build(kind, paths[manifest], os.path.join(out_dir, rel), codec=memo,
                       tokenizer=tokenizer, n_mels=args["n_mels"], task=task)
        if report["skipped"]:
            raise RuntimeError(f"demo data {name}: {report['skipped']} line(s) skipped, "
                               f"e.g. {report['skipped_lines'][:2]}")
        datasets[name], counts[name] = rel, _counts(report)
    return {"tokenizer": os.path.relpath(tok_path, out_dir),
            "codec": os.path.relpath(codec_dir, out_dir), "world": "world",
            "datasets": datasets, "counts": counts, "text_vocab_size": tokenizer.vocab_size,
            "codec_k": args["codec_k"], "codec_c": args["codec_c"], "args": args}
