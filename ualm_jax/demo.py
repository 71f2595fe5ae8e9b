"""`ualm demo`: the built-in default, end to end: the procedural world -> built datasets -> a tiny
UALM trained on UALM's blend over 8 (CPU) devices -> held-out evaluation, plots, PyTorch export.

    RUN/data/        world, tokenizer, codec, built datasets (reused when already there)
    RUN/checkpoints/ Orbax checkpoints (a rerun resumes; a finished run only re-evaluates)
    RUN/eval/        generated clips and world_eval.json
    RUN/plots/       losses.png, mixture.png, spectrograms.png
    RUN/export/      the PyTorch (safetensors) export of the last checkpoint
    RUN/results.json the numbers of the printed table
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import ualm_jax.storage as storage

DEMO_CONFIG = "configs/demo.yaml"
CFG_SCALES = (1.0, 1.5, 3.0)  # text-to-audio guidance lambdas evaluated (1 = no guidance)


def demo_config(config: str, overrides: Sequence[str], info: dict):
    """The config with the mixture, tokenizer and codec pointed at the prepared data."""
    from ualm_jax.config import load_config

    cfg = load_config(config, list(overrides))
    datasets = info["datasets"]
    for i, entry in enumerate(cfg.data.mixture):
        if entry["name"] not in datasets:
            raise ValueError(f"data.mixture[{i}].name={entry['name']!r}: the demo world builds "
                             f"{', '.join(sorted(datasets))}")
        entry["path"] = datasets[entry["name"]]
    cfg.data.tokenizer, cfg.data.codec = info["tokenizer"], info["codec"]
    return cfg.validate()


def prepare(run_dir: Path, config: str, overrides: Sequence[str], clips: int, problems: int) -> dict:
    from data_pipelines.demo.data import prepare_world_data
    from ualm_jax.config import load_config

    model = load_config(config, list(overrides)).model
    return prepare_world_data(str(run_dir / "data"), n_clips=clips, n_text=problems,
                              n_mels=model.audio_encoder.n_mels,
                              codec_k=model.num_codebooks, codec_c=model.codebook_size,
                              vocab_size=model.text_vocab_size)


def report(cfg, run_dir: Path, info: dict, summary: dict, eval_items: int, export: bool) -> dict:
    """Everything after training: world metrics, plots, export, results.json."""
    from data_pipelines.inspect_mixture import inspect_mixture
    from ualm_jax.eval.demo_world import evaluate_world
    from ualm_jax.infer.tasks import load
    from ualm_jax.report.plots import plot_losses, plot_mixture, plot_spectrograms

    t0 = time.perf_counter()
    # lambda 1.5 is this tiny model's best guidance; UALM's 3 shows what too much does to it.
    world = evaluate_world(load(run_dir), info["world"], str(run_dir / "eval"), max_items=eval_items,
                           cfg_scales=CFG_SCALES)
    eval_s = time.perf_counter() - t0
    plots = run_dir / "plots"
    mixture = inspect_mixture(cfg, batches=20)
    files = [plot_losses(str(run_dir / "metrics.jsonl"), str(plots / "losses.png")),
             plot_mixture({t["name"]: t["target_share"] for t in mixture["tasks"]},
                          {t["name"]: t["realised_share"] for t in mixture["tasks"]},
                          str(plots / "mixture.png")),
             plot_spectrograms(world["samples"][:8], str(plots / "spectrograms.png"))]
    exported = None
    if export:
        from ualm_jax.convert.export import export as export_checkpoint

        exported = str(export_checkpoint(run_dir, run_dir / "export", "pytorch", overwrite=True))
    results = {"step": summary["step"], "eval": summary.get("eval"), "first_loss": summary.get("first_loss"),
               "world": {k: v for k, v in world.items() if k != "samples"},
               "mixture": [{k: t[k] for k in ("name", "target_share", "realised_share")}
                           for t in mixture["tasks"]],
               "packing_efficiency": mixture["packing_efficiency"], "plots": files,
               "export": exported, "world_eval_seconds": round(eval_s, 1)}
    (run_dir / "results.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    return results


def format_results(results: dict) -> str:
    from ualm_jax.eval.demo_world import format_world_table

    ev = results.get("eval") or {}
    first = results.get("first_loss") or {}
    lines = [f"held-out loss and stream-0 token accuracy after {results['step']} steps",
             f"{'task':<10} {'first train loss':>17} {'final eval loss':>16} {'token acc':>10} "
             f"{'realised share':>15}"]
    for m in results["mixture"]:
        n = m["name"]
        a, b, c = first.get(f"loss/{n}"), ev.get(f"eval/loss/{n}"), ev.get(f"eval/accuracy/{n}")
        fmt = lambda x, w, p=4: "-".rjust(w) if x is None else f"{x:>{w}.{p}f}"
        lines.append(f"{n:<10} {fmt(a, 17)} {fmt(b, 16)} {fmt(c, 10, 3)} "
                     f"{100 * m['realised_share']:>14.1f}%")
    lines += ["", "generation on held-out clips and problems (scored by the world's analyser)",
              format_world_table(results["world"]), ""]
    lines += [f"plots: {', '.join(results['plots'])}"]
    if results.get("export"):
        lines.append(f"PyTorch export: {results['export']}")
    return "\n".join(lines)


def run_demo(run_dir: str | Path = "runs/demo", config: str = DEMO_CONFIG,
             overrides: Sequence[str] = (), clips: int = 800, problems: int = 4000,
             eval_items: int = 32,
             export: bool = True) -> dict:
    from ualm_jax.train.loop import train

    if storage.is_url(run_dir):  # its world is generated and built in place, read by Grain
        raise ValueError(f"--run-dir {run_dir}: the demo generates and builds its data inside the "
                         "run dir and reads it with Grain (local files); give a local --run-dir "
                         "(training runs take gs:// run dirs: `ualm train --run-dir gs://...`)")
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    info = prepare(run_dir, config, overrides, clips, problems)
    counts = ", ".join(f"{k} {v.get('train', 0)}" for k, v in info["counts"].items())
    print(f"demo data ready in {time.perf_counter() - t0:.0f} s: {run_dir / 'data'} "
          f"(train records: {counts})", flush=True)
    cfg = demo_config(config, overrides, info)
    summary = train(cfg, run_dir)
    if summary["preempted"]:
        print(f"stopped at step {summary['step']} (checkpoint saved); rerun to resume")
        return {"step": summary["step"], "preempted": True}
    results = report(cfg, run_dir, info, summary, eval_items, export)
    results["total_seconds"] = round(time.perf_counter() - t0, 1)
    print(format_results(results))
    print(f"demo finished in {results['total_seconds'] / 60:.1f} min; results: {run_dir / 'results.json'}")
    return results
