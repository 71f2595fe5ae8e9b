"""`ualm data ...`: one's own files -> a tokenizer, a codec, stored records.

  ualm data tokenizer --manifest M [M ...] --vocab-size N --out DIR    BPE on the manifests' text
  ualm data codec     --manifest M [M ...] --codebooks K --codes C --out DIR   SpectralCodec fit
  ualm data build KIND --manifest M --out DIR ...                      manifest -> records

Exit codes: 0 when the command did its work (a build with skipped lines included: see the
report), 2 for usage errors (missing manifest, tokenizer or codec; no text or no readable audio)
and for a build that wrote no line (its report is still written).
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile

from ualm_jax.cli.args import RawDescriptionHelpFormatter

KINDS = ("captions", "audio-qa", "text-sft", "preference", "reason")
# What each kind reads (one JSON object per manifest line; audio paths relative to the manifest's
# folder; "split": "validation" on any line puts it in the validation split, and "id" is accepted
# everywhere; any other key is a skipped line). Full details: the docstring of
# data_pipelines/builders/<kind>.py.
KIND_HELP = {
    "captions": '{"audio": "a.wav", "caption": "a dog barks"} -> text-to-audio records (needs '
                '--codec) and captioning records (--task both | t2a | caption)',
    "audio-qa": '{"messages": [{"role": "user", "content": "What is it?", "audio": "a.wav"}, '
                '{"role": "assistant", "content": "A dog."}]} -> understanding records',
    "text-sft": '{"messages": [{"role": "user"|"assistant"|"system", "content": "..."}]} '
                '-> text records',
    "preference": '{"prompt": "...", "chosen": "win.wav", "rejected": "lose.wav", '
                  '"ref_logp_chosen"?: x, "ref_logp_rejected"?: y} -> DPO pairs (needs --codec)',
    "reason": '{"behaviour": "enrichment"|"dialogue"|"self_reflection", ...} -> UALM-Reason '
              'multi-segment records (needs --codec)',
}


def add_parser(sub) -> None:
    data = sub.add_parser("data", help="make a tokenizer and a codec for one's own data; "
                          "build training records from manifests")
    dsub = data.add_subparsers(dest="data_command", required=True)
    manifests = ("JSON-lines manifests of any kind (the build's); lines marked validation are "
                 "left out")
    t = dsub.add_parser("tokenizer", help="train a byte-level BPE (Qwen2-shaped) on the text of "
                        "manifests: captions, prompts, message contents, the template's prompts")
    t.add_argument("--manifest", nargs="+", required=True, help=manifests)
    t.add_argument("--vocab-size", type=int, required=True,
                   help="entries wanted (at least 257; fewer when the text allows no more merges)")
    t.add_argument("--out", required=True, help="folder for tokenizer.json")
    t.set_defaults(func=run)
    c = dsub.add_parser("codec", help="fit a SpectralCodec (residual VQ of STFT frames, 50 "
                        "frames/s) on the audio manifests name (paths relative to each manifest)")
    c.add_argument("--manifest", nargs="+", required=True, help=manifests)
    c.add_argument("--codebooks", type=int, required=True,
                   help="K, residual codebooks (model.num_codebooks)")
    c.add_argument("--codes", type=int, required=True,
                   help="C, codes per codebook (model.codebook_size)")
    c.add_argument("--seed", type=int, default=0, help="k-means seed (same seed, same codec)")
    c.add_argument("--max-frames", type=int, default=50_000,
                   help="fit on at most this many STFT frames (a seeded subset; 50 per second)")
    c.add_argument("--out", required=True, help="folder for the codec (config.json, codebooks.npz)")
    c.set_defaults(func=run)
    kinds = "\n".join(f"  {k:<11} {v}" for k, v in KIND_HELP.items())
    b = dsub.add_parser("build", help="manifest (JSON lines) -> TFDS ArrayRecord/TFRecord records",
                        formatter_class=RawDescriptionHelpFormatter,
                        description="Bad lines are skipped and listed in OUT/build_report.json; "
                                    "OUT/stats.json holds records and tokens per split and task.\n\n"
                                    f"Kinds (one JSON object per manifest line):\n{kinds}")
    b.add_argument("kind", choices=KINDS, help="what the manifest holds (see the list above)")
    b.add_argument("--manifest", required=True, help="JSON lines; audio paths relative to its folder")
    b.add_argument("--out", required=True, help="output folder (replaced build of the same kind) or a "
                   "gs:// URL (built locally, then uploaded with the report last)")
    b.add_argument("--codec", default=None,
                   help="codec folder (an X-codec: the report names its path; a saved "
                        "SpectralCodec, e.g. from `ualm data codec`: copied into OUT/codec) or "
                        "'spectral:DIR'; needed for captions (t2a), preference and reason")
    b.add_argument("--tokenizer", required=True, help="tokenizer.json (or its folder)")
    b.add_argument("--n-mels", type=int, default=128, help="log-mel bins of the encoder input")
    b.add_argument("--format", choices=("array_record", "tfrecord"), default="array_record",
                   help="array_record for Grain (random access), tfrecord for tf.data / SeqIO")
    b.add_argument("--eval-fraction", type=float, default=0.0,
                   help="share held out for the validation split, by a hash of each line's "
                        "audio paths or content (--split-by); a line's \"split\" wins")
    b.add_argument("--split-by", choices=("audio", "line"), default=None,
                   help="audio: a clip held out in one kind is held out in all (default for "
                        "kinds naming audio); line: the parsed line (default for text-sft)")
    b.add_argument("--min-seconds", type=float, default=0.1, help="shorter audio is skipped")
    b.add_argument("--max-seconds", type=float, default=600.0, help="longer audio is skipped")
    b.add_argument("--task", default=None,
                   help="captions: both | t2a | caption (default both); other kinds: the task "
                        "name stored in the records")
    b.add_argument("--max-line-bytes", type=int, default=None,
                   help="longer manifest lines are skipped (line_too_long; default 16 MiB)")
    b.add_argument("--max-json-depth", type=int, default=None,
                   help="more deeply nested lines are skipped (too_deep; default 64)")
    b.add_argument("--beam", default=None, metavar="FLAGS",
                   help="run with Apache Beam, e.g. --beam='--runner=DirectRunner' "
                        "(see data_pipelines/build.py for Dataflow flags)")
    b.set_defaults(func=run)


def run(args) -> int:
    return {"build": _build, "tokenizer": _tokenizer, "codec": _codec}[args.data_command](args)


def _build(args) -> int:
    from data_pipelines.build import BuildError, build
    from data_pipelines.sources import REPORT_FILE

    import tensorflow_datasets as tfds

    import ualm_jax.storage as storage

    tfds.disable_progress_bar()  # one summary line instead of TFDS's per-shard bars
    remote = storage.is_url(args.out)
    # Object storage: build on local disk, then upload with the report last (data_pipelines.staging).
    local_out = tempfile.mkdtemp(prefix="ualm-build-") if remote else args.out
    try:
        if remote:
            from data_pipelines.staging import check_new_remote

            check_new_remote(args.out)  # before the build, not after it
        report = build(args.kind, args.manifest, os.path.join(local_out, "build") if remote else local_out,
                       codec=args.codec, tokenizer=args.tokenizer,
                       n_mels=args.n_mels, file_format=args.format, min_seconds=args.min_seconds,
                       max_seconds=args.max_seconds, eval_fraction=args.eval_fraction,
                       split_by=args.split_by, task=args.task, beam_options=args.beam,
                       max_line_bytes=args.max_line_bytes, max_json_depth=args.max_json_depth)
        if remote:
            from data_pipelines.staging import upload_build

            upload_build(os.path.join(local_out, "build"), args.out)
    except (BuildError, FileExistsError) as e:
        print(f"ualm data build: {e}", file=sys.stderr)
        return 2
    finally:
        if remote:
            shutil.rmtree(local_out, ignore_errors=True)
    report_path = os.path.join(args.out, REPORT_FILE)
    if not report["written"]:  # training on it would only fail later ("no split 'train'")
        reasons = ", ".join(f"{k} x {n}" for k, n in report["skipped_by_code"].items())
        print(f"ualm data build: no line of {args.manifest} was written ({report['skipped']} "
              f"skipped: {reasons}); see {report_path}", file=sys.stderr)
        return 2
    splits = ", ".join(f"{k} {v['lines']} lines / {v['records']} records"
                       for k, v in report["splits"].items()) or "nothing"
    reasons = ", ".join(f"{k} {n}" for k, n in report["skipped_by_code"].items())
    print(f"{args.kind}: {report['lines']} lines -> {report['written']} written ({splits}), "
          f"{report['skipped']} skipped{f' ({reasons})' if reasons else ''}")
    print(f"report: {report_path}")
    if "train" not in report["splits"]:
        print(f"ualm data build: warning: every written line of {args.manifest} is in validation "
              f"and the train split is empty, so training on {args.out} fails; check the lines' "
              "\"split\" fields and --eval-fraction", file=sys.stderr)
    return 0


def _fail(command: str, e: BaseException) -> int:
    print(f"ualm data {command}: {e}", file=sys.stderr)
    return 2


def _tokenizer(args) -> int:
    from data_pipelines.builders.contents import ManifestError, manifest_texts
    from data_pipelines.tokenizer import MIN_VOCAB_SIZE, TextTokenizer, train_tiny_bpe

    if args.vocab_size < MIN_VOCAB_SIZE:
        return _fail("tokenizer", f"--vocab-size must be at least {MIN_VOCAB_SIZE} (256 byte "
                                  f"tokens and <|endoftext|>), got {args.vocab_size}")
    try:
        texts = manifest_texts(args.manifest)
    except ManifestError as e:
        return _fail("tokenizer", e)
    path = train_tiny_bpe(texts, args.vocab_size, args.out)
    n = TextTokenizer(path).vocab_size
    fewer = f" of {args.vocab_size} asked: the text allows no more merges" \
        if n < args.vocab_size else ""
    print(f"wrote {path} (vocab {n}{fewer}; {len(texts)} texts from {len(args.manifest)} "
          f"manifest(s); model.text_vocab_size must be at least {n})")
    return 0


def _codec(args) -> int:
    from data_pipelines.builders.contents import ManifestError, manifest_audio
    from data_pipelines.codecs import SpectralCodec
    from data_pipelines.codecs.spectral import NoReadableAudio

    if args.codebooks < 1 or args.codes < 2:
        return _fail("codec", f"need --codebooks >= 1 and --codes >= 2, got {args.codebooks}, "
                              f"{args.codes}")
    try:
        files = manifest_audio(args.manifest)
        codec, unreadable = SpectralCodec.fit_files([f.path for f in files], args.codebooks,
                                                    args.codes, seed=args.seed,
                                                    max_frames=args.max_frames)
    except ManifestError as e:
        return _fail("codec", e)
    except NoReadableAudio as e:
        return _fail("codec", f"no readable audio in {', '.join(args.manifest)}: {e}")
    codec.save(args.out)
    left = f"; {len(unreadable)} unreadable left out, e.g. {unreadable[0][1]}" if unreadable else ""
    print(f"wrote {args.out} (SpectralCodec: {codec.num_codebooks} codebooks of "
          f"{codec.codebook_size} codes, {codec.frame_rate:g} frames/s; fitted on "
          f"{len(files) - len(unreadable)} audio file(s){left}; build with --codec {args.out})")
    return 0
