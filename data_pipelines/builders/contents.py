"""What manifests hold, whatever their kind: the text the builders encode (to train a tokenizer on)
and the audio files they name (to fit a codec on).

    texts = manifest_texts(["caps.jsonl", "qa.jsonl"])     # prompts + captions + message contents
    files = manifest_audio(["caps.jsonl", "qa.jsonl"])     # [AudioFile(manifest, rel, path)]

A line's kind is told from its keys (`line_kind`), and that kind's converter says which of its
fields are text and which are audio (`Converter.texts` / `audio_refs`), so these lists follow the
builders. Lines marked `"split": "validation"` are left out: held-out text and audio stay out of
the tokenizer's merges and the codec's codebooks (as the demo has it). Lines that are not JSON
objects, or whose kind cannot be told, give nothing; the build reports them.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import ualm_jax.storage as storage

from data_pipelines.builders.manifest import SPLIT_ALIASES, iter_lines


class ManifestError(ValueError):
    """A manifest that cannot be read at all (missing, a folder)."""


@dataclass(frozen=True)
class AudioFile:
    manifest: str  # the manifest naming it (first, when several do)
    rel: str  # the path as the line writes it
    path: str  # resolved against the manifest's folder


def line_kind(data: dict) -> Optional[str]:
    """The builder kind whose keys a parsed line holds, or None. Message lists read as audio-qa,
    whose fields are a superset of text-sft's."""
    if "messages" in data:
        return "audio-qa"
    if "behaviour" in data:
        return "reason"
    if "chosen" in data or "rejected" in data:
        return "preference"
    if "caption" in data or "audio" in data:
        return "captions"
    return None


def manifest_rows(manifest: str, held_out: bool = False) -> Iterator[tuple]:
    """(converter class, parsed line) for each line whose kind can be told; lines marked
    validation only when `held_out`."""
    from data_pipelines.builders import BUILDERS

    manifest = os.fspath(manifest)
    if not storage.is_url(manifest) and not os.path.isfile(manifest):
        raise ManifestError(f"manifest not found: {manifest}")
    with storage.open_file(manifest) as f:
        for _, raw in iter_lines(f):
            try:
                data = json.loads(raw.decode("utf-8")) if isinstance(raw, bytes) else None
            except (UnicodeDecodeError, ValueError, RecursionError):
                continue
            if not isinstance(data, dict):
                continue
            split = data.get("split")
            if not held_out and isinstance(split, str) and \
                    SPLIT_ALIASES.get(split.lower()) == "validation":
                continue
            kind = line_kind(data)
            if kind is not None:
                yield BUILDERS[kind].converter_cls, data


def template_texts() -> list:
    """The fixed prompts the templates put before captions (text-to-audio, captioning)."""
    from ualm_jax.format.template import AUDIO_TO_CAPTION_PROMPT, TEXT_TO_AUDIO_PROMPT

    return [TEXT_TO_AUDIO_PROMPT.format(caption=""), AUDIO_TO_CAPTION_PROMPT]


def manifest_texts(manifests: Sequence[str], held_out: bool = False) -> list:
    """The template prompts, then every text field of every (train) line, duplicates kept (BPE
    merges follow frequencies). Raises ManifestError when the manifests hold no text."""
    texts, found = template_texts(), 0
    for manifest in manifests:
        for conv, data in manifest_rows(manifest, held_out):
            line_texts = conv.texts(data)
            texts += line_texts
            found += len(line_texts)
    if not found:
        raise ManifestError(f"no text in {', '.join(map(os.fspath, manifests))} (captions, "
                            "prompts, message contents of lines not marked validation)")
    return texts


def manifest_audio(manifests: Sequence[str], held_out: bool = False) -> list:
    """Each audio file the (train) lines name, once, in order of first mention; paths resolved
    against each manifest's folder. Raises ManifestError when no line names audio."""
    files, seen = [], set()
    for manifest in manifests:
        manifest = os.fspath(manifest)
        folder = storage.dirname(manifest if storage.is_url(manifest) else os.path.abspath(manifest))
        for conv, data in manifest_rows(manifest, held_out):
            for rel in conv.audio_refs(data):
                path = storage.resolve(rel, folder)
                key = path if storage.is_url(path) else os.path.realpath(path)
                if key not in seen:
                    seen.add(key)
                    files.append(AudioFile(manifest, rel, path))
    if not files:
        raise ManifestError(f"no audio named in {', '.join(map(os.fspath, manifests))} (lines "
                            "not marked validation)")
    return files
