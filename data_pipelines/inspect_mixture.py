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
    from data_pipelines.sources import open_source

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


def examples_per_task(batches, n_tasks: int) -> list[int]:
    """Packed examples of each task id over host batches (one per segment of a row)."""
    out = [0] * n_tasks
    for b in batches:
        seg, tasks = np.asarray(b["segment_ids"]), np.asarray(b["task_ids"])
        first = (seg > 0) & np.concatenate([np.ones_like(seg[:, :1], bool),
                                           seg[:, 1:] != seg[:, :-1]], axis=1)
        for t in tasks[first]:
            if 0 <= t < n_tasks:
                out[int(t)] += 1
    return out


def _seqio_rows(cfg, it, taken, realised) -> list[dict]:
    """Report rows for data.source=seqio: examples from the sources (when they say), mean tokens
    as packed, target shares for our builds' Mixture (a user's Mixture has example rates)."""
    targets = (mix.target_shares(mix.parse_mixture(cfg.data.mixture))
               if cfg.data.mixture and not cfg.data.seqio.mixture else {})
    names = list(it.task_names)
    packed = examples_per_task(taken, len(names))
    report = {r["name"]: r for r in it.report}  # a share-0 entry is not in the Mixture
    rows = []
    for i, name in enumerate(names):
        r = report.get(name, {})
        examples = r.get("examples")
        mean = realised["tokens"].get(name, 0) / packed[i] if packed[i] else float("nan")
        rows.append({"name": name, "path": "", "examples": examples,
                     "validation_examples": r.get("validation_examples"), "mean_tokens": mean,
                     "tokens_available": (int(round(examples * mean)) if examples and packed[i]
                                          else None),
                     "target_share": targets.get(name),
                     "sampling_weight": r.get("sampling_weight", 0.0)})
    return rows


def resume_position(it, state: dict, step: int) -> dict:
    """Where a run stands in its Grain mixture (from its checkpoint's data state, restored into
    `it`): examples consumed per task (placed in trained batches), epochs over each task's train
    split, and the examples waiting in the rows' packers."""
    names = list(it.task_names)
    consumed = [0] * len(names)
    for p in state["packers"].values():
        for t, n in enumerate(p["tasks"][:len(names)]):
            consumed[t] += int(n)
    waiting = [0] * len(names)
    for p in it.packers.values():
        for e in p.pending:
            waiting[e.task] += 1
    examples = {r["name"]: r["examples"] for r in it.report}
    return {"step": step, "batches": int(state.get("batches", 0)), "tasks": [
        {"name": n, "consumed": consumed[i], "waiting": waiting[i],
         "epochs": consumed[i] / examples[n] if examples.get(n) else None}
        for i, n in enumerate(names)]}


def inspect_mixture(cfg, batches: int = 20, row: int = 0, resume: Optional[tuple] = None) -> dict:
    """Measure the mixture of `cfg.data.mixture` (Grain) or of the SeqIO source (train split, the
    whole data as one process). resume: (step, data state with every row) of a Grain mixture run
    whose position to report; the measured batches are then the ones it trains on next."""
    from ualm_jax.format.vocab import JointVocab

    if cfg.data.source not in ("mixture", "seqio"):
        raise ValueError(f"data.source={cfg.data.source!r}: `mixture inspect` needs "
                         "data.source=mixture (or seqio) with data.mixture entries or "
                         "data.seqio.mixture")
    if batches < 1:
        raise ValueError(f"--batches must be at least 1, got {batches}")
    if cfg.data.source == "seqio":
        from data_pipelines.seqio_pipeline import make_seqio_iterator

        it = make_seqio_iterator(cfg, "train", process_index=0, process_count=1)
    else:
        it = make_config_iterator(cfg, "train", process_index=0, process_count=1)
    position = _restore_position(it, cfg, resume) if resume else None
    names = list(it.task_names)
    taken = [next(it) for _ in range(batches)]
    realised = realised_shares(iter(taken), batches, names)
    t = cfg.train
    run_tokens = mix.run_tokens(t.steps, t.batch_size, t.seq_len)
    used = run_tokens * realised["packing_efficiency"]
    if cfg.data.source == "seqio":
        rows = _seqio_rows(cfg, it, taken, realised)
    else:
        rows = [{**r, "validation_examples": _held_out_examples(
            local_build_dir(r["path"], cfg.data.stage_dir))} for r in it.report]
    tasks = []
    for r in rows:
        share = realised["shares"].get(r["name"], 0.0)
        avail = r["tokens_available"]
        tasks.append({**r, "realised_share": share,
                      "epochs": (used * share / avail if avail else float("inf"))
                      if avail is not None else None})
    vocab = JointVocab.from_model_config(cfg.model)
    return {"source": cfg.data.source, "position": position, "batches": batches, "batch_size": t.batch_size,
            "seq_len": t.seq_len, "steps": t.steps, "run_tokens": run_tokens,
            "packing_efficiency": realised["packing_efficiency"],
            "counts": it.stats(), "tasks": tasks,
            "example": render_row(taken[0], row, names, vocab, _detokenizer(cfg))}


def _restore_position(it, cfg, resume: tuple) -> dict:
    step, state = resume
    if cfg.data.source != "mixture":
        raise ValueError(f"--resume-from reads a Grain mixture run's position (data.source="
                         f"mixture); this config has data.source={cfg.data.source}")
    it.set_state(state)  # every row's packer (the merged state), whatever the process count
    return resume_position(it, state, step)


def format_position(position: dict) -> str:
    lines = [f"run position at step {position['step']} ({position['batches']} batches): "
             "examples consumed per task"]
    for t in position["tasks"]:
        epochs = "-" if t["epochs"] is None else f"{t['epochs']:.3g}"
        lines.append(f"  {t['name']:<14} {t['consumed']:>10,} consumed  {epochs:>8} epochs  "
                     f"{t['waiting']:>4} waiting in the packers")
    return "\n".join(lines + ["the batches measured below are the next ones this run trains on", ""])


def format_inspect(result: dict) -> str:
    head = ("task", "examples", "held-out", "mean tok", "tokens", "target", "realised", "epochs")
    lines = [head]

    def num(v, fmt="{:,}"):
        return "-" if v is None or v != v else fmt.format(v)

    for r in result["tasks"]:
        target = r["target_share"]
        lines.append((r["name"], num(r["examples"]), num(r["validation_examples"]),
                      num(r["mean_tokens"], "{:.1f}"), num(r["tokens_available"]),
                      num(None if target is None else 100 * target, "{:.1f}%"),
                      f"{100 * r['realised_share']:.1f}%", num(r["epochs"], "{:.3g}")))
    widths = [max(len(str(line[c])) for line in lines) for c in range(len(head))]
    table = "\n".join("  ".join(str(v).rjust(w) if c else str(v).ljust(w)
                                for c, (v, w) in enumerate(zip(line, widths))) for line in lines)
    c = result["counts"]
    rates = ""
    if any(r["target_share"] is None for r in result["tasks"]):
        rates = "example rates (the SeqIO Mixture's own): " + ", ".join(
            f"{r['name']} {r['sampling_weight']:.4f}" for r in result["tasks"])
    head_lines = [format_position(result["position"])] if result.get("position") else []
    return "\n".join(head_lines + ([rates] if rates else []) + [
        f"{'SeqIO ' if result.get('source') == 'seqio' else ''}mixture over {result['batches']} "
        f"batches of {result['batch_size']} x {result['seq_len']}; "
        f"epochs at train.steps={result['steps']} ({result['run_tokens']:,} positions)",
        table,
        f"packing efficiency {100 * result['packing_efficiency']:.1f}% | skipped: "
        f"{c.get('skipped_too_long', 0)} too long, {c.get('skipped_too_many_clips', 0)} too many clips",
        "", "one packed row:", result["example"]])


def to_json(result: dict) -> str:
    return json.dumps(result, indent=1, default=float)
