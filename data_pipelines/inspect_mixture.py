"""`ualm mixture inspect`: what a config's mixture will feed the model, measured, before a run.

Per task: examples and tokens available (train split), held-out examples, target token share,
the share realised over N packed batches, sampling weight and the epochs over its data that the
configured run (train.steps x batch x seq_len, times the measured packing efficiency) will make.
Then one packed row, rendered as readable segments.
"""
from __future__ import annotations

import json
from typing import Optional

import numpy as np

from data_pipelines import mixture as mix
from data_pipelines.grain_pipeline import make_config_iterator, realised_shares
from data_pipelines.staging import local_build_dir


def _held_out_examples(path: str) -> Optional[int]:
    from data_pipelines.build import open_source

    try:
        return len(open_source(path, "validation"))
    except (KeyError, FileNotFoundError, ValueError):
        return None


def _detokenizer(cfg):
    if not cfg.data.tokenizer:
        return None
    from data_pipelines.tokenizer import TextTokenizer

    return TextTokenizer(cfg.data.tokenizer).decode


def render_row(batch: dict, row: int, task_names, vocab, detok=None) -> str:
    """One packed row: a header per example (task, positions, loss weight) and its segments."""
    from ualm_jax.format.template import describe

    seg, tasks = batch["segment_ids"][row], batch["task_ids"][row]
    out = []
    for s in [int(x) for x in np.unique(seg) if x > 0]:
        where = np.nonzero(seg == s)[0]
        a, b = int(where[0]), int(where[-1]) + 1
        task = int(tasks[a])
        name = task_names[task] if 0 <= task < len(task_names) else f"task {task}"
        weights = batch["loss_weights"][row, a:b]
        out.append(f"--- example {s}: task {name}, positions {a}-{b - 1}, "
                   f"loss weight {float(weights.sum()):.2f}")
        out.append(describe(batch["tokens"][row, a:b], vocab, detok))
    pad = int((seg == 0).sum())
    out.append(f"--- padding: {pad} of {len(seg)} positions")
    return "\n".join(out)


def inspect_mixture(cfg, batches: int = 20, row: int = 0) -> dict:
    """Measure the mixture of `cfg.data.mixture` (train split, the whole data as one process)."""
    from ualm_jax.format.vocab import JointVocab

    if cfg.data.source != "mixture":
        raise ValueError(f"data.source={cfg.data.source!r}: `mixture inspect` needs "
                         "data.source=mixture with data.mixture entries")
    if batches < 1:
        raise ValueError(f"--batches must be at least 1, got {batches}")
    it = make_config_iterator(cfg, "train", process_index=0, process_count=1)
    names = list(it.task_names)
    taken = [next(it) for _ in range(batches)]
    realised = realised_shares(iter(taken), batches, names)
    t = cfg.train
    run_tokens = mix.run_tokens(t.steps, t.batch_size, t.seq_len)
    used = run_tokens * realised["packing_efficiency"]
    tasks = []
    for r in it.report:
        share = realised["shares"].get(r["name"], 0.0)
        avail = r["tokens_available"]
        tasks.append({**r, "validation_examples": _held_out_examples(
            local_build_dir(r["path"], cfg.data.stage_dir)),
                      "realised_share": share,
                      "epochs": used * share / avail if avail else float("inf")})
    vocab = JointVocab.from_model_config(cfg.model)
    return {"batches": batches, "batch_size": t.batch_size, "seq_len": t.seq_len,
            "steps": t.steps, "run_tokens": run_tokens,
            "packing_efficiency": realised["packing_efficiency"],
            "counts": it.stats(), "tasks": tasks,
            "example": render_row(taken[0], row, names, vocab, _detokenizer(cfg))}


def format_inspect(result: dict) -> str:
    head = ("task", "examples", "held-out", "mean tok", "tokens", "target", "realised", "epochs")
    lines = [head]
    for r in result["tasks"]:
        held = r["validation_examples"]
        lines.append((r["name"], f"{r['examples']:,}", "-" if held is None else f"{held:,}",
                      f"{r['mean_tokens']:.1f}", f"{r['tokens_available']:,}",
                      f"{100 * r['target_share']:.1f}%", f"{100 * r['realised_share']:.1f}%",
                      f"{r['epochs']:.3g}"))
    widths = [max(len(str(line[c])) for line in lines) for c in range(len(head))]
    table = "\n".join("  ".join(str(v).rjust(w) if c else str(v).ljust(w)
                                for c, (v, w) in enumerate(zip(line, widths))) for line in lines)
    c = result["counts"]
    return "\n".join([
        f"mixture over {result['batches']} batches of {result['batch_size']} x {result['seq_len']}; "
        f"epochs at train.steps={result['steps']} ({result['run_tokens']:,} positions)",
        table,
        f"packing efficiency {100 * result['packing_efficiency']:.1f}% | skipped: "
        f"{c.get('skipped_too_long', 0)} too long, {c.get('skipped_too_many_clips', 0)} too many clips",
        "", "one packed row:", result["example"]])


def to_json(result: dict) -> str:
    return json.dumps(result, indent=1, default=float)
