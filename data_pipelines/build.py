"""Build stored records from a manifest, and open them again.

    report = build("captions", "data/caps.jsonl", "out/caps", codec="spectral:codec_dir",
                   tokenizer="tok/tokenizer.json", eval_fraction=0.05)   # split_by="audio"
    src = open_source("out/caps", "train")      # random access, records as numpy dicts
    task, segments, mels = from_record(src[0], frames_of=encoder_frames_of_mel)

Kinds: "captions" (t2a + caption records; `task` = both | t2a | caption), "audio-qa", "text-sft",
"preference" (see data_pipelines/builders/). Output folder:
  OUT/build_report.json   lines, written, skipped (written + skipped = lines), per-split line and
                          record counts, skipped_by_code, skipped_lines [{line, code, reason}],
                          the TFDS dataset folder (relative) and the settings (vocab, codec, mels),
                          split_by and validation_lines (the held-out line numbers)
  OUT/stats.json          {split: {lines, records, tokens, tasks: {task: {records, tokens,
                          mean_tokens}}}}; tokens = rendered sequence length (template.render with
                          the JointVocab of the tokenizer's vocab size and the codec's K, C; user
                          audio counts its encoder frames). The mixture turns token-share targets
                          into sampling weights with it.
  OUT/ualm_<kind>/[config/]1.0.0/   the TFDS dataset (ArrayRecord or TFRecord shards)
  OUT/tokenizer.json      a copy of the tokenizer
  OUT/codec/              a copy of a small codec (a SpectralCodec); the report names it relative
                          to OUT (as the tokenizer), so a moved build keeps both. A neural codec
                          (an X-codec folder) is large: the report names its absolute path or URL.
                          `build_artefacts(OUT)` gives both as paths that resolve where OUT is.
Splits: "train", and "validation" when lines say `"split": "validation"` or `eval_fraction` > 0.
A line without a "split" is held out by a hash of its content, never of its position (reordering
a manifest moves nothing), per `split_by` (builders.manifest.Splitter):
  "audio" (default for kinds whose lines name audio: captions, audio-qa, preference, reason):
          each audio path as written (normalised, relative to the manifest's folder) is hashed,
          and a line is held out when ANY of its clips is: a held-out clip is validation in every
          build of the same clips with the same fraction, whatever the kind, never trained.
  "line"  (text-sft): the parsed JSON, canonically serialised, so re-serialising keeps a split.
Each line is isolated: whatever one line holds (malformed or non-UTF-8 text, JSON nested deeper
than `max_json_depth`, a line longer than `max_line_bytes`, a number too long to convert, a file
that breaks a decoder) makes that line a skipped entry with a code and a reason, never stops the
build. Lines end at \n, \r\n or a lone \r. An empty manifest is a usage error (BuildError).

Builds are transactional: a local build is written into a sibling folder OUT.tmp-XXXXXXXX (marked
by an `_INCOMPLETE` file while it is written) and swapped in only when complete: the old build's
report, dataset, stats and Beam log are renamed away (the report first), the new ones renamed in
(the report last), the old ones deleted; other files in OUT stay. A build that fails or is
interrupted leaves the previous OUT as it was; a temporary folder left by a killed build is
removed by the next build into the same OUT. A remote OUT (gs://, no folder renames) is still
replaced in place.

Scale with Apache Beam (install `tensorflow-datasets[beam]`, i.e. apache-beam; a local build never
needs it). Pass `beam_options` (a list of pipeline flags or a `PipelineOptions`) and the same
builders run their per-line work on Beam workers: the manifest is cut into chunks of 1000 lines
(byte offsets), each chunk is converted on a worker, examples go to TFDS's Beam writer and each
line's log entry to OUT/_build_log/, which `build` merges into the report afterwards.
  * Locally, all cores:
      ["--runner=DirectRunner", "--direct_running_mode=multi_processing",
       "--direct_num_workers=0"]
  * Dataflow (manifest, audio and OUT on GCS, e.g. OUT=gs://BUCKET/ualm/caps):
      ["--runner=DataflowRunner", "--project=PROJECT", "--region=REGION",
       "--temp_location=gs://BUCKET/tmp", "--staging_location=gs://BUCKET/staging",
       "--setup_file=./setup.py",            # ships data_pipelines + ualm_jax to the workers
       "--machine_type=n2-highmem-8", "--max_num_workers=256",
       "--experiments=use_runner_v2"]
    plus "--sdk_container_image=IMAGE" when the workers need torch/transformers (X-codec); an
    X-codec given as a folder is loaded from that folder ON EACH WORKER (bake it into the image),
    while a SpectralCodec and the tokenizer are pickled from this process.
  The CLI takes the same flags as one string: `ualm data build ... --beam "--runner=DirectRunner"`.
  TFDS turns them into `DownloadConfig(beam_options=PipelineOptions(flags))`.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from typing import Optional, Sequence, Union

import ualm_jax.storage as storage
from data_pipelines.sources import CODEC_DIR, REPORT_FILE, STATS_FILE, TOKENIZER_FILE, read_report

FORMATS = ("array_record", "tfrecord")
INCOMPLETE_FILE = "_INCOMPLETE"  # in a build's temporary folder until it is complete


class BuildError(ValueError):
    """The build could not start (a usage error): missing manifest, tokenizer, codec, bad option."""


# Transactions ------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove_dead_siblings(out_dir: str) -> None:
    """Temporary folders of earlier builds into out_dir whose process (on this host) is gone."""
    parent, base = os.path.split(os.path.abspath(out_dir))
    if not os.path.isdir(parent):
        return
    for name in os.listdir(parent):
        if not name.startswith(base + ".tmp-"):
            continue
        marker = os.path.join(parent, name, INCOMPLETE_FILE)
        try:
            with open(marker) as f:
                owner = json.load(f)
            dead = owner.get("host") == socket.gethostname() and not _pid_alive(int(owner["pid"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not ours, or not readable: leave it
        if dead:
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _begin(out_dir: str) -> str:
    """A new, empty sibling folder of out_dir to build into, marked incomplete."""
    parent, base = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    _remove_dead_siblings(out_dir)
    tmp = tempfile.mkdtemp(prefix=base + ".tmp-", dir=parent)
    with open(os.path.join(tmp, INCOMPLETE_FILE), "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                   "note": f"an unfinished build into {base}; safe to delete"}, f)
    return tmp


def _commit(tmp: str, out_dir: str, build_entries: Sequence[str]) -> None:
    """Swap the complete build in tmp in for the one in out_dir. A new out_dir is one rename;
    otherwise the old build's entries are renamed away (its report first), the new ones renamed
    in (the report last), and the old ones deleted with tmp. What else out_dir holds stays."""
    os.remove(os.path.join(tmp, INCOMPLETE_FILE))
    if not os.path.lexists(out_dir):
        os.rename(tmp, out_dir)
        return
    replaced = os.path.join(tmp, ".replaced")
    os.mkdir(replaced)
    old = [REPORT_FILE] + [n for n in build_entries if n != REPORT_FILE]
    new = [n for n in os.listdir(tmp) if n not in (REPORT_FILE, ".replaced")] + [REPORT_FILE]
    moves = [(os.path.join(out_dir, n), os.path.join(replaced, n)) for n in old
             if os.path.lexists(os.path.join(out_dir, n))]
    moves += [(os.path.join(tmp, n), os.path.join(out_dir, n)) for n in new]
    done = []
    try:
        for src, dst in moves:
            os.rename(src, dst)
            done.append((src, dst))
    except BaseException:  # put back what moved: the old build stays, the new one in tmp
        for src, dst in reversed(done):
            try:
                os.rename(dst, src)
            except OSError:
                pass
        raise
    shutil.rmtree(tmp, ignore_errors=True)


def _beam_options(beam_options):
    if beam_options is None or not isinstance(beam_options, (list, tuple, str)):
        return beam_options
    import shlex

    from apache_beam.options.pipeline_options import PipelineOptions

    flags = shlex.split(beam_options) if isinstance(beam_options, str) else list(beam_options)
    return PipelineOptions(flags)


def make_converter(kind: str, manifest: str, *, codec=None, tokenizer=None, n_mels: int = 128,
                   min_seconds: float = 0.1, max_seconds: float = 600.0, task: Optional[str] = None):
    """The per-line converter of `kind` (raises BuildError on usage errors)."""
    from data_pipelines.builders import BUILDERS
    from data_pipelines.builders.converter import resolve_codec, resolve_tokenizer

    if kind not in BUILDERS:
        raise BuildError(f"unknown kind {kind!r}: one of {', '.join(BUILDERS)}")
    if tokenizer is None:
        raise BuildError("a text tokenizer is needed (tokenizer.json)")
    try:
        tokenizer = resolve_tokenizer(tokenizer)
        codec = resolve_codec(codec)
    except (OSError, ValueError) as e:
        raise BuildError(str(e)) from e
    manifest_dir = storage.dirname(manifest if storage.is_url(manifest) else os.path.abspath(manifest))
    try:
        return BUILDERS[kind].converter_cls(
            manifest_dir=manifest_dir, tokenizer=tokenizer, codec=codec, n_mels=n_mels,
            min_seconds=min_seconds, max_seconds=max_seconds, task=task)
    except ValueError as e:
        raise BuildError(str(e)) from e


def build(kind: str, manifest: str, out_dir: str, *, codec=None, tokenizer=None, n_mels: int = 128,
          file_format: str = "array_record", min_seconds: float = 0.1, max_seconds: float = 600.0,
          eval_fraction: float = 0.0, split_by: Optional[str] = None, task: Optional[str] = None,
          beam_options: Union[None, str, Sequence[str], object] = None,
          beam_runner=None, max_line_bytes: Optional[int] = None,
          max_json_depth: Optional[int] = None) -> dict:
    """Build `kind` records from `manifest` into `out_dir`; -> the report (also written to
    out_dir/build_report.json). Bad lines are skipped and listed, never fatal; usage errors
    (an empty manifest included) raise BuildError before anything is written. A local out_dir is
    replaced only once the new build is complete: on any failure the previous build stays as it
    was.

    max_line_bytes / max_json_depth: per-line limits (default MAX_LINE_BYTES, MAX_JSON_DEPTH of
    data_pipelines.builders.manifest); a line over one is skipped (line_too_long, too_deep).

    codec: a Codec, a codec folder (`load_codec`) or "spectral:DIR"; tokenizer: a TextTokenizer or
    a tokenizer.json path; task: captions -> both | t2a | caption, other kinds -> the task name
    stored in the records (default audio_qa / text_sft / preference); split_by: what
    eval_fraction hashes, "audio" or "line" (default: "audio" where the kind's lines name audio).
    """
    from data_pipelines.builders import BUILDERS
    from data_pipelines.builders.manifest import (Limits, MAX_JSON_DEPTH, MAX_LINE_BYTES, SPLIT_BY,
                                                  Splitter, scan_manifest)
    from data_pipelines.builders.report import LOG_DIR

    manifest, out_dir = os.fspath(manifest), os.fspath(out_dir)
    if not storage.exists(manifest) or os.path.isdir(manifest):
        raise BuildError(f"manifest not found: {manifest}")
    if file_format not in FORMATS:
        raise BuildError(f"file_format must be one of {FORMATS}, got {file_format!r}")
    if not 0.0 <= eval_fraction < 1.0:
        raise BuildError(f"eval_fraction must lie in [0, 1), got {eval_fraction}")
    try:
        limits = Limits(MAX_LINE_BYTES if max_line_bytes is None else int(max_line_bytes),
                        MAX_JSON_DEPTH if max_json_depth is None else int(max_json_depth))
    except ValueError as e:
        raise BuildError(str(e)) from e
    converter = make_converter(kind, manifest, codec=codec, tokenizer=tokenizer, n_mels=n_mels,
                               min_seconds=min_seconds, max_seconds=max_seconds, task=task)
    cls = BUILDERS[kind]
    conv_cls = cls.converter_cls
    split_by = split_by or ("audio" if conv_cls.names_audio else "line")
    if split_by not in SPLIT_BY:
        raise BuildError(f"split_by must be one of {', '.join(SPLIT_BY)}, got {split_by!r}")
    if split_by == "audio" and not conv_cls.names_audio:
        raise BuildError(f"{kind} lines name no audio: split them by line (--split-by line)")
    splitter = Splitter(float(eval_fraction), split_by, conv_cls.audio_refs)
    scan = scan_manifest(manifest, splitter, limits=limits)
    if scan.lines == 0:
        raise BuildError(f"manifest is empty: {manifest} (no lines, nothing to build)")
    origin = _origin(tokenizer, codec)
    entries = [cls.name, REPORT_FILE, STATS_FILE, LOG_DIR, TOKENIZER_FILE]
    if storage.is_url(out_dir):  # no folder renames on object stores: replace in place
        origin["codec_plan"] = _codec_plan(converter.codec, origin["codec"], None)
        for stale in entries + [CODEC_DIR]:
            storage.remove(storage.join(out_dir, stale))
        return _write_build(kind, cls, converter, manifest, scan, out_dir, file_format=file_format,
                            splitter=splitter, beam_options=beam_options,
                            beam_runner=beam_runner, origin=origin)
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise BuildError(f"output folder {out_dir} exists and is not a folder")
    target = os.path.realpath(out_dir)  # through a link: the build lands where it points
    plan = origin["codec_plan"] = _codec_plan(converter.codec, origin["codec"], target)
    if _holds_codec_copy(target) and plan[:2] != ("inside", CODEC_DIR):
        entries.append(CODEC_DIR)  # the old build's copy goes with the old build
    elif plan[0] == "copy" and os.path.lexists(os.path.join(target, CODEC_DIR)):
        raise BuildError(f"{os.path.join(out_dir, CODEC_DIR)} exists and is no build's codec copy: "
                         "move it, or build into another folder (the build copies its codec there)")
    tmp = _begin(target)
    try:
        report = _write_build(kind, cls, converter, manifest, scan, tmp, file_format=file_format,
                              splitter=splitter, beam_options=beam_options,
                              beam_runner=beam_runner, origin=origin)
        _commit(tmp, target, entries)
    except BaseException:
        replaced = os.path.join(tmp, ".replaced")
        if not (os.path.isdir(replaced) and os.listdir(replaced)):  # else it holds the old build
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _origin(tokenizer, codec) -> dict:
    """Where the build's tokenizer and codec came from: paths as given, a TextTokenizer's file, a
    codec object's `source` folder (absolute; a URL as it is; "spectral:" dropped); None when
    unknown."""
    from data_pipelines.codecs import codec_dir

    tok = tokenizer if isinstance(tokenizer, (str, os.PathLike)) else getattr(tokenizer, "path", None)
    if tok is not None:
        tok = os.fspath(tok)
        tok = os.path.join(tok, TOKENIZER_FILE) if os.path.isdir(tok) else tok
    # A codec object may say where it was saved (`source`: a folder load_codec reads).
    spec = codec if isinstance(codec, (str, os.PathLike)) else getattr(codec, "source", None)
    spec = None if spec is None else codec_dir(spec)
    if spec and not storage.is_url(spec):
        spec = os.path.abspath(spec)
    return {"tokenizer": tok, "codec": spec}


def _codec_plan(codec, source: Optional[str], target: Optional[str]) -> tuple:
    """What the report says of the codec:
      ("copy", SpectralCodec): small, so the build carries a copy in OUT/codec;
      ("inside", relative path): the codec's folder already lies inside the build folder;
      ("ref", absolute path or URL): a neural codec stays where it is (large);
      ("none", None): no codec, or one that says nowhere where it lives."""
    from data_pipelines.codecs import SpectralCodec, codec_kind

    local = source is not None and not storage.is_url(source)
    if local and target is not None:
        real = os.path.realpath(source)
        if real.startswith(os.path.join(target, "")):
            return "inside", os.path.relpath(real, target)
    if isinstance(codec, SpectralCodec):
        return "copy", codec
    if local and codec_kind(source) == "spectral":  # e.g. a wrapper whose `source` is a folder
        return "copy", SpectralCodec.load(source)
    return ("ref", source) if source else ("none", None)


def _holds_codec_copy(out_dir: str) -> bool:
    """Whether the build now in out_dir carries a codec copy (its report says so)."""
    try:
        return (read_report(out_dir) or {}).get("codec") == CODEC_DIR
    except (OSError, ValueError):
        return False


def _save_codec_copy(codec, out_dir: str) -> str:
    """Save a SpectralCodec into out_dir/codec (a local folder, or a bucket through a local
    temporary folder); -> the path recorded in the report (relative to out_dir)."""
    if not storage.is_url(out_dir):
        codec.save(os.path.join(out_dir, CODEC_DIR))
        return CODEC_DIR
    with tempfile.TemporaryDirectory() as local:
        codec.save(local)
        storage.upload_tree(local, storage.join(out_dir, CODEC_DIR))
    return CODEC_DIR


def _write_build(kind: str, cls, converter, manifest: str, scan, out_dir: str, *, file_format: str,
                 splitter, beam_options, beam_runner, origin: dict) -> dict:
    """Write the dataset, stats and report of one build into out_dir (the report last)."""
    import tensorflow_datasets as tfds

    from data_pipelines.builders.report import LOG_DIR, chunk_outcomes, read_beam_logs, summarize

    from data_pipelines.builders.tfds_builder import BuildPlan

    use_beam = beam_options is not None or beam_runner is not None
    log_dir = storage.join(out_dir, LOG_DIR)
    plan = BuildPlan(converter, manifest, scan, splitter, log_dir if use_beam else None)
    dataset_dir, built = None, []
    if scan.splits:
        builder = cls(plan=plan, data_dir=out_dir, config=converter.config_name)
        with tempfile.TemporaryDirectory() as downloads:  # nothing is downloaded; keep OUT clean
            builder.download_and_prepare(
                download_dir=downloads, file_format=file_format,
                download_config=tfds.download.DownloadConfig(
                    try_download_gcs=False, beam_runner=beam_runner,
                    beam_options=_beam_options(beam_options)))
        entries = read_beam_logs(log_dir) if use_beam else builder.log
        dataset_dir = os.path.relpath(str(builder.data_dir), out_dir) if not storage.is_url(out_dir) \
            else str(builder.data_dir)[len(out_dir.rstrip("/")) + 1:]
        built = list(builder.info.splits.keys())
    else:  # no line parsed: no dataset, but every line still gets its entry
        entries = [entry for chunk in scan.chunks
                   for _, entry in chunk_outcomes(converter, manifest, chunk, "train",
                                                  splitter, True, scan.limits)]

    report, stats = summarize(kind, entries, scan.lines, built)
    # The build carries its tokenizer and a small codec (copies, named relative to the build
    # folder) and names a neural codec where it lies, so a run trained on it can generate with
    # no --tokenizer / --codec, and a moved build still finds both.
    tokenizer_copy = None
    if origin["tokenizer"] and not storage.is_url(origin["tokenizer"]):
        storage.copy_file(origin["tokenizer"], storage.join(out_dir, TOKENIZER_FILE))
        tokenizer_copy = TOKENIZER_FILE
    how, what = origin.get("codec_plan") or ("none", None)
    codec_record = _save_codec_copy(what, out_dir) if how == "copy" else what
    report.update({"tokenizer": tokenizer_copy, "codec": codec_record, "task": converter.task,
                   "manifest": manifest, "file_format": file_format,
                   "dataset_dir": dataset_dir, "settings": converter.metadata(),
                   "eval_fraction": splitter.eval_fraction, "split_by": splitter.by,
                   "limits": {"max_line_bytes": scan.limits.max_line_bytes,
                              "max_json_depth": scan.limits.max_json_depth}})
    storage.write_json(storage.join(out_dir, STATS_FILE), stats)
    storage.write_json(storage.join(out_dir, REPORT_FILE), report)
    return report
