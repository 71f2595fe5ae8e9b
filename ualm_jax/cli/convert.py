"""`ualm import-hf | import-reference | export | inspect`: checkpoints in and out of other formats."""
from __future__ import annotations

from ualm_jax.cli.args import add_checkpoint, add_overrides


def add_parser(sub) -> None:
    i = sub.add_parser("import-hf", help="a local HF Qwen2/Qwen2.5 checkpoint -> UALM params")
    i.add_argument("hf_dir", help="local folder with config.json and *.safetensors")
    i.add_argument("--out", required=True, help="new directory (usable as train.init_from)")
    i.add_argument("--config", default=None, help="UALM config for K, C, encoder, adapter, ...")
    i.add_argument("--whisper", default=None,
                   help="local Whisper / Audio Flamingo 3 checkpoint for the audio encoder")
    add_overrides(i)
    i.set_defaults(func=run)

    r = sub.add_parser("import-reference",
                       help="a checkpoint of the authors' PyTorch UALM -> UALM params")
    r.add_argument("source", help="mp_rank_00_model_states.pt, a DeepSpeed global_stepN/ folder, "
                   "a `--format ualm-reference` or `--format pytorch` export")
    r.add_argument("--config", required=True,
                   help="UALM config of the same model (backbone, K, C, encoder; data.codec)")
    r.add_argument("--out", required=True, help="new directory (usable as train.init_from)")
    add_overrides(r)
    r.set_defaults(func=run)

    e = sub.add_parser("export", help="a checkpoint -> PyTorch safetensors / HF text model / "
                       "the authors' UALM format")
    add_checkpoint(e, "run directory (latest checkpoint) or one step directory")
    e.add_argument("--format", default="pytorch", choices=["pytorch", "hf-text", "ualm-reference"],
                   help="pytorch: our names in safetensors; hf-text: the text Qwen2 only; "
                   "ualm-reference: mp_rank_00_model_states.pt + train.yaml for the authors' code")
    e.add_argument("--out", required=True, help="new export folder (or gs:// URL)")
    e.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="cast tensors (default: as stored)")
    e.add_argument("--torch-bin", action="store_true", help="also write torch.load-able pytorch_model.bin")
    e.add_argument("--overwrite", action="store_true", help="replace an existing export at --out")
    e.set_defaults(func=run)

    n = sub.add_parser("inspect", help="tensor tree of a checkpoint / HF / exported directory")
    add_checkpoint(n, "checkpoint (run or step directory), HF folder or export folder")
    n.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    n.set_defaults(func=run)


def run(args) -> int:
    return {"import-hf": _import_hf, "import-reference": _import_reference, "export": _export,
            "inspect": _inspect}[args.command](args)


def _import_hf(args) -> int:
    from ualm_jax.config import load_config
    from ualm_jax.convert.hf_import import import_hf

    overrides = list(args.overrides)
    # Never invent an encoder: with neither a Whisper checkpoint nor a config that asks for one,
    # the import is a text-only UALM (audio output streams, no audio input).
    asked = args.config or args.whisper or any(o.startswith("model.audio_encoder") for o in overrides)
    if not asked:
        overrides.append("model.audio_encoder.enabled=false")
    cfg = load_config(args.config, overrides)
    report = import_hf(args.hf_dir, args.out, cfg, whisper_dir=args.whisper)
    print(f"imported {report['tensors']} tensors from {args.hf_dir} into {args.out} "
          f"(tied source: {report['tied_source']}; unread: {len(report['unread_tensors'])})")
    enc = cfg.model.audio_encoder
    if not enc.enabled:
        print("audio encoder: none (a text-only UALM with audio output streams); pass --whisper "
              "DIR (a Whisper / Audio Flamingo 3 checkpoint) or --config FILE for audio input")
    elif not args.whisper:
        print(f"audio encoder: randomly initialised ({enc.n_layers} layers x {enc.d_model}, "
              f"{'frozen' if enc.frozen else 'trained'}) because no --whisper DIR was given")
    return 0


def _import_reference(args) -> int:
    from ualm_jax.config import load_config
    from ualm_jax.convert.reference import import_reference

    cfg = load_config(args.config, args.overrides)
    report = import_reference(args.source, args.out, cfg)
    print(f"imported {report['imported']} tensors from {report['source']} into {args.out} "
          f"({report['codec']})")
    return 0


def _export(args) -> int:
    from ualm_jax.convert.export import export

    out = export(args.checkpoint, args.out, args.format, dtype=args.dtype,
                 torch_bin=args.torch_bin, overwrite=args.overwrite)
    print(f"exported {args.checkpoint} as {args.format} to {out}")
    return 0


def _inspect(args) -> int:
    from ualm_jax.convert.inspect_tree import inspect, render, to_json

    info = inspect(args.checkpoint)
    print(to_json(info) if args.json else render(info))
    return 0
