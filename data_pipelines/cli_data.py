"""`ualm data build KIND --manifest M --out DIR ...`: manifests -> stored records.

Hooked into the main CLI by `add_data_parser(subparsers)`; `main(argv)` runs it alone
(`python -m data_pipelines.cli_data data build ...`). Exit codes: 0 when the build ran (skipped
lines included: see the report), 2 for usage errors (missing manifest, tokenizer or codec).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

KINDS = ("captions", "audio-qa", "text-sft", "preference", "reason")
# What each kind reads (one JSON object per manifest line; audio paths relative to the manifest's
# folder; "split": "validation" on any line puts it in the validation split). Full details: the
# docstring of data_pipelines/builders/<kind>.py.
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


def _build(args) -> int:
    from data_pipelines.build import REPORT_FILE, BuildError, build

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
                       task=args.task, beam_options=args.beam,
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
    splits = ", ".join(f"{k} {v['lines']} lines / {v['records']} records"
                       for k, v in report["splits"].items()) or "nothing"
    reasons = ", ".join(f"{k} {n}" for k, n in report["skipped_by_code"].items())
    print(f"{args.kind}: {report['lines']} lines -> {report['written']} written ({splits}), "
          f"{report['skipped']} skipped{f' ({reasons})' if reasons else ''}")
    print(f"report: {os.path.join(args.out, REPORT_FILE)}")
    return 0


def add_data_parser(subparsers) -> argparse.ArgumentParser:
    """Adds `data build` to an argparse subparsers object; returns the `data` parser."""
    data = subparsers.add_parser("data", help="build training records from manifests")
    sub = data.add_subparsers(dest="data_command", required=True)
    kinds = "\n".join(f"  {k:<11} {v}" for k, v in KIND_HELP.items())
    b = sub.add_parser("build", help="manifest (JSON lines) -> TFDS ArrayRecord/TFRecord records",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Bad lines are skipped and listed in OUT/build_report.json; "
                                   "OUT/stats.json holds records and tokens per split and task.\n\n"
                                   f"Kinds (one JSON object per manifest line):\n{kinds}")
    b.add_argument("kind", choices=KINDS, help="what the manifest holds (see the list above)")
    b.add_argument("--manifest", required=True, help="JSON lines; audio paths relative to its folder")
    b.add_argument("--out", required=True, help="output folder (replaced build of the same kind) or a "
                   "gs:// URL (built locally, then uploaded with the report last)")
    b.add_argument("--codec", default=None,
                   help="codec folder (X-codec or saved SpectralCodec) or 'spectral:DIR'; needed "
                        "for captions (t2a) and preference")
    b.add_argument("--tokenizer", required=True, help="tokenizer.json (or its folder)")
    b.add_argument("--n-mels", type=int, default=128, help="log-mel bins of the encoder input")
    b.add_argument("--format", choices=("array_record", "tfrecord"), default="array_record",
                   help="array_record for Grain (random access), tfrecord for tf.data / SeqIO")
    b.add_argument("--eval-fraction", type=float, default=0.0,
                   help="share of lines (by a hash of the line) for the validation split")
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
    b.set_defaults(func=_build)
    return data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ualm")
    add_data_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
