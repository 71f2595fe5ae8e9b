"""`ualm bench step | decode | compile | data | export | import`: benchmarks that print one JSON
line per measurement; each takes only the flags it uses."""
from __future__ import annotations

import sys

from ualm_jax.cli.args import add_overrides
from ualm_jax.infer.generation_config import GenerationConfig

MODELS = "tiny, 0.5b, 1.5b, 7b"


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="benchmarks that print one JSON line per measurement")
    bsub = b.add_subparsers(dest="bench_command", required=True)

    s = bsub.add_parser("step", help="the real train step (ualm train's set-up) on a synthetic "
                        "batch of the batch contract: tokens/s, MFU, FLOPs per token")
    _model(s)
    s.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    s.add_argument("--seq", type=int, default=128, help="sequence length")
    _mesh(s)
    s.add_argument("--steps", type=int, default=5, help="timed steps")
    s.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    s.add_argument("--microbatches", type=int, default=1, help="gradient accumulation steps")
    _text_only(s)
    s.add_argument("--peak-tflops", type=float, default=None,
                   help="peak bf16 TFLOP/s per device for MFU when the device is not known")
    add_overrides(s)

    d = bsub.add_parser("decode", help="text-to-audio decoding of random weights: the on-device "
                        "loop and the host-driven one")
    _model(d)
    d.add_argument("--batch", type=int, default=8, help="prompts per generation")
    d.add_argument("--prompt-len", type=int, default=32, help="text ids per prompt")
    d.add_argument("--max-new", type=int, default=128, help="positions per prompt")
    _mesh(d)
    d.add_argument("--devices", type=int, default=None,
                   help="use only the first N devices (default all)")
    d.add_argument("--cfg", type=float, default=1.0,
                   help="guidance lambda (!= 1: a cond and an uncond row per prompt); 1.0 times "
                        "decoding without guidance, unlike generation's default of "
                        f"{GenerationConfig.cfg_scale:g}")
    d.add_argument("--steps", type=int, default=5, help="timed generations")
    d.add_argument("--no-host-loop", action="store_true",
                   help="skip timing the host-driven reference loop")
    add_overrides(d)

    c = bsub.add_parser("compile", help="compile the train step for --topology and report "
                        "per-chip memory (nothing allocated; TPU slices need libtpu, not a TPU)")
    c.add_argument("--config", default=None,
                   help="the config to compile, resolved with its KEY=VALUE overrides as `ualm "
                        "train` does (model, mesh, train.batch_size/seq_len/microbatches, remat, "
                        "...); the flags below override it")
    c.add_argument("--model", default=None,
                   help=f"model preset (default: tiny): {MODELS}; not with --config (override "
                        "model.preset=... instead)")
    c.add_argument("--topology", default="v5p-128",
                   help="v5p-128, v4-32, v5e-8, v6e-16, a chip grid like v5p:4x4x4, or cpu:N")
    c.add_argument("--batch", type=int, default=None,
                   help="global batch (sequences; default one per data x fsdp device, or with "
                        "--config train.batch_size, which this overrides)")
    c.add_argument("--seq", type=int, default=None,
                   help="sequence length (default 4096, or with --config train.seq_len, which "
                        "this overrides)")
    c.add_argument("--mesh", default=None,
                   help="e.g. data=2,fsdp=2,tensor=2 (default: fsdp over all, or with --config "
                        "mesh.ici, which this overrides)")
    c.add_argument("--microbatches", type=int, default=None,
                   help="gradient accumulation steps (default 1, or with --config "
                        "train.microbatches, which this overrides)")
    _text_only(c)
    add_overrides(c)

    a = bsub.add_parser("data", help="packed tokens/s of the data pipeline")
    a.add_argument("--config", default=None,
                   help="a config whose data.mixture shards to read, with its KEY=VALUE overrides "
                        "(default: in-memory records at the paper's shapes, --batch x --seq)")
    a.add_argument("--seconds", type=float, default=5.0, help="seconds to measure")
    a.add_argument("--batch", type=int, default=8,
                   help="rows per batch of the in-memory records (with --config: train.batch_size)")
    a.add_argument("--seq", type=int, default=4096,
                   help="sequence length of the in-memory records (with --config: train.seq_len)")
    add_overrides(a)

    e = bsub.add_parser("export", help="peak memory of exporting a checkpoint")
    _model(e)
    _workdir(e)
    e.add_argument("--format", default="pytorch", choices=["pytorch", "hf-text"],
                   help="export format")

    i = bsub.add_parser("import", help="peak memory of `ualm import-hf` of a random HF checkpoint")
    _model(i)
    _workdir(i)
    for parser in (s, d, c, a, e, i):
        parser.set_defaults(func=run)


def _model(p) -> None:
    p.add_argument("--model", default="tiny", help=f"model preset: {MODELS}")


def _mesh(p) -> None:
    p.add_argument("--mesh", default=None,
                   help="e.g. data=2,fsdp=2,tensor=2 (default: fsdp over all)")


def _text_only(p) -> None:
    p.add_argument("--text-only", action="store_true",
                   help="plain Qwen2 backbone: no audio streams, no audio ids, no encoder")


def _workdir(p) -> None:
    p.add_argument("--out", "--workdir", dest="out", default="runs/bench-export",
                   help="where checkpoints go")


def run(args) -> int:
    from ualm_jax.tools.bench import print_json

    if args.bench_command == "compile":
        from ualm_jax.tools.bench_compile import bench_compile
        from ualm_jax.train.topology_compile import TpuCompileUnavailable

        try:  # --config and its overrides resolved as `ualm train` does; the flags win
            rec = bench_compile(args.model, args.topology, batch=args.batch, seq=args.seq,
                                mesh=args.mesh, microbatches=args.microbatches,
                                overrides=args.overrides, text_only=args.text_only,
                                config=args.config)
        except TpuCompileUnavailable as e:
            print(f"ualm bench: error: {e}", file=sys.stderr)
            return 2
    else:
        rec = {"step": _step, "decode": _decode, "data": _data, "export": _export,
               "import": _import}[args.bench_command](args)
    print_json(rec)
    return 0


def _step(args) -> dict:
    from ualm_jax.tools.bench import bench_step

    return bench_step(args.model, args.batch, args.seq, args.mesh, args.steps,
                      warmup=args.warmup, text_only=args.text_only,
                      microbatches=args.microbatches, overrides=args.overrides,
                      peak_tflops=args.peak_tflops)


def _decode(args) -> dict:
    from ualm_jax.tools.bench import bench_decode

    return bench_decode(args.model, args.batch, args.prompt_len, args.max_new, args.mesh,
                        args.devices, args.cfg, args.steps, host_loop=not args.no_host_loop,
                        overrides=args.overrides)


def _data(args) -> dict:
    from data_pipelines.bench_data import bench_data, bench_data_from_config

    if args.config:
        from ualm_jax.config import load_config

        return bench_data_from_config(load_config(args.config, args.overrides), args.seconds)
    # in-memory records at the paper's shapes (no build needed)
    return bench_data(batch_size=args.batch, seq_len=args.seq, seconds=args.seconds)


def _export(args) -> dict:
    from ualm_jax.tools.bench import bench_export

    return bench_export(args.model, args.out, args.format)


def _import(args) -> dict:
    from ualm_jax.tools.bench import bench_import

    return bench_import(args.model, args.out)
