"""The task mixture: `data.mixture` entries, token-share targets -> example sampling weights.

UALM blends by TOKENS (understanding 27.7%, generation 33.1% after a 2x upsample, text 39.2%),
but a sampler picks EXAMPLES. Task i's expected token share is
w_i * mean_tokens_i / sum_j w_j * mean_tokens_j, so hitting the target
t_i = share_i * upsample_i / sum_j share_j * upsample_j needs

    w_i  proportional to  share_i * upsample_i / mean_tokens_i.

Without the division a task of 600-token examples would get ~20x the tokens of one of 30-token examples
at equal example weight. Mean tokens come from the builder's stats or from rendering a sample.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import numpy as np

# The entry type and its one parser live in the config schema: `data.mixture` is validated at
# load_config with the same rules and the same ConfigError (a ValueError) naming
# data.mixture[i].<field>; parse_mixture is re-exported here for the pipelines.
from ualm_jax.config import MixtureEntry, parse_mixture  # noqa: F401


def target_shares(entries: Sequence[MixtureEntry]) -> dict[str, float]:
    """Token share each task should get: share * upsample, renormalised."""
    total = sum(e.weighted_share for e in entries)
    return {e.name: e.weighted_share / total for e in entries}


def sampling_weights(entries: Sequence[MixtureEntry],
                     mean_tokens: Mapping[str, float]) -> dict[str, float]:
    """Example sampling probabilities (sum 1) that realise the token targets."""
    raw = {}
    for i, e in enumerate(entries):
        m = mean_tokens.get(e.name)
        if m is None or not np.isfinite(m) or m <= 0:
            raise ValueError(f"mixture task {e.name!r} (data.mixture[{i}]) has no usable mean "
                             f"token count ({m!r}): is its source empty, or does none of its "
                             f"sampled records fit train.seq_len / data.max_clips_per_row?")
        raw[e.name] = e.weighted_share / float(m)
    total = sum(raw.values())
    return {k: v / total for k, v in raw.items()}


def sample_indices(n_records: int, n: int) -> np.ndarray:
    """Up to n evenly spaced record indices: deterministic, spread over the whole source."""
    if n_records <= 0:
        return np.zeros((0,), np.int64)
    n = min(n, n_records)
    return np.unique(np.linspace(0, n_records - 1, n).round().astype(np.int64))


def estimate_mean_tokens(source, length_of: Callable[[dict], int], n: int = 512) -> float:
    """Mean rendered length over a deterministic sample of up to n records of `source`."""
    idx = sample_indices(len(source), n)
    if idx.size == 0:
        raise ValueError("cannot estimate mean tokens of an empty source")
    return float(np.mean([length_of(source[int(i)]) for i in idx]))


def stats_mean_tokens(stats: Mapping, split: str, task: Optional[str] = None) -> Optional[float]:
    """Mean rendered tokens per record from a build's stats.json
    ({split: {records, tokens, tasks: {task: {records, tokens, mean_tokens}}}}): the task's when
    the build holds only that task, else the whole split's (the source mixes its tasks); None
    when the stats do not say. Unlike the estimate, it counts records too long to pack."""
    s = stats.get(split) or {}
    tasks = s.get("tasks") or {}
    if task is not None and set(tasks) == {task}:
        return float(tasks[task]["mean_tokens"])
    if s.get("records"):
        return float(s["tokens"]) / float(s["records"])
    return None


def run_tokens(steps: int, batch_size: int, seq_len: int) -> int:
    """Packed positions a run consumes (global batch)."""
    return int(steps) * int(batch_size) * int(seq_len)


def mixture_report(entries: Sequence[MixtureEntry], examples: Mapping[str, int],
                   mean_tokens: Mapping[str, float], total_tokens: int = 0,
                   packing_efficiency: float = 1.0) -> list[dict]:
    """Per task: examples, tokens available, target share, sampling weight and the epochs a run
    of `total_tokens` packed positions (see run_tokens) makes over the task's data."""
    shares = target_shares(entries)
    weights = sampling_weights(entries, mean_tokens)
    used = float(total_tokens) * float(packing_efficiency)
    rows = []
    for e in entries:
        avail = float(examples[e.name]) * float(mean_tokens[e.name])
        rows.append({
            "name": e.name,
            "path": e.path,
            "examples": int(examples[e.name]),
            "mean_tokens": float(mean_tokens[e.name]),
            "tokens_available": int(round(avail)),
            "share": e.share,
            "upsample": e.upsample,
            "target_share": shares[e.name],
            "sampling_weight": weights[e.name],
            "epochs": used * shares[e.name] / avail if avail > 0 else float("inf"),
        })
    return rows


def format_report(rows: Sequence[dict]) -> str:
    """The report as an aligned text table (for `ualm mixture inspect`)."""
    head = ("task", "examples", "mean tok", "tokens", "target", "weight", "epochs")
    lines = [head]
    for r in rows:
        lines.append((r["name"], f"{r['examples']:,}", f"{r['mean_tokens']:.1f}",
                      f"{r['tokens_available']:,}", f"{100 * r['target_share']:.1f}%",
                      f"{r['sampling_weight']:.4f}", f"{r['epochs']:.3g}"))
    widths = [max(len(str(line[c])) for line in lines) for c in range(len(head))]
    return "\n".join("  ".join(str(v).rjust(w) if c else str(v).ljust(w)
                               for c, (v, w) in enumerate(zip(line, widths))) for line in lines)


def resolve_mean_tokens(entries: Sequence[MixtureEntry], sources: Mapping[str, object],
                        length_of, known: Optional[Mapping[str, float]] = None,
                        n: int = 512) -> dict:
    """Mean tokens per task: `known` (e.g. from the builder's stats) where given, else estimated.
    length_of: record -> rendered length, or a mapping task name -> such a function."""
    known = dict(known or {})
    out = {}
    for e in entries:
        if e.name in known:
            out[e.name] = float(known[e.name])
        else:
            fn = length_of[e.name] if isinstance(length_of, Mapping) else length_of
            out[e.name] = estimate_mean_tokens(sources[e.name], fn, n)
    return out
