"""Each manifest line's outcome as one log entry, and the entries as `build_report.json` and
`stats.json` (written + skipped = lines); Beam workers write their entries as JSON lines that
`read_beam_logs` merges.
"""
from __future__ import annotations

import json
from typing import Iterable, Iterator, Sequence, Union


import ualm_jax.storage as storage

from data_pipelines.builders.converter import Converter
from data_pipelines.builders.manifest import (SPLITS, Chunk, Limits, Skip, Splitter, parse_line,
                                              read_chunk, skipped_entry)

LOG_DIR = "_build_log"  # Beam workers' log shards, merged into the report


def convert_line(converter: Converter, line: int, split: str, data: dict) -> tuple:
    """-> (examples [(key, example)], log entry). Never raises for a bad line."""
    try:
        converter.check_keys(data)
        converter.check(data)
        written = converter.records(data)
    except Skip as s:
        return [], skipped_entry(line, split, s)
    except Exception as e:  # a bug, an exotic file or a hostile value: log it, keep building
        return [], skipped_entry(line, split, Skip("error", _describe(e)))
    tasks: dict = {}
    for task, _, tokens in written:
        n, t = tasks.get(task, (0, 0))
        tasks[task] = (n + 1, t + int(tokens))
    examples = [(f"{line:010d}/{task}/{i}", ex) for i, (task, ex, _) in enumerate(written)]
    return examples, {"line": line, "split": split, "records": {k: list(v) for k, v in tasks.items()}}


def _describe(e: BaseException) -> str:
    try:
        return f"{type(e).__name__}: {e}"
    except Exception:  # an exception whose message cannot be formed
        return type(e).__name__


def chunk_outcomes(converter: Converter, manifest: str, chunk: Chunk, split: str,
                   splitter: Union[Splitter, float], log_unparsed: bool,
                   limits: Limits = Limits()) -> Iterator[tuple]:
    """(examples, log entry) for each line of `chunk` in `split`; lines that do not parse are
    logged only when `log_unparsed` (one split's pass owns them, so each is logged once)."""
    for line, raw in read_chunk(manifest, chunk, limits):
        try:
            line_split, data = parse_line(raw, splitter, limits)
        except Skip as s:
            if log_unparsed:
                yield [], skipped_entry(line, None, s)
            continue
        if line_split == split:
            yield convert_line(converter, line, split, data)


def summarize(kind: str, entries: Iterable[dict], lines: int, built_splits: Sequence[str]) -> tuple:
    """Log entries -> (report, stats). written + skipped == lines when every line was logged."""
    entries = sorted(entries, key=lambda e: e["line"])
    skipped = [e for e in entries if "code" in e]
    written = [e for e in entries if "records" in e]
    stats, by_code = {}, {}
    for e in skipped:
        by_code[e["code"]] = by_code.get(e["code"], 0) + 1
    for e in written:
        s = stats.setdefault(e["split"], {"lines": 0, "records": 0, "tokens": 0, "tasks": {}})
        s["lines"] += 1
        for task, (n, tokens) in e["records"].items():
            t = s["tasks"].setdefault(task, {"records": 0, "tokens": 0})
            t["records"] += n
            t["tokens"] += tokens
            s["records"] += n
            s["tokens"] += tokens
    for s in stats.values():
        for t in s["tasks"].values():
            t["mean_tokens"] = t["tokens"] / t["records"]
    stats = {k: stats[k] for k in SPLITS if k in stats and k in built_splits}
    report = {
        "kind": kind, "lines": lines, "written": len(written), "skipped": len(skipped),
        "splits": {k: {"lines": v["lines"], "records": v["records"]} for k, v in stats.items()},
        "skipped_by_code": dict(sorted(by_code.items())),
        "skipped_lines": [{k: e[k] for k in ("line", "code", "reason")} for e in skipped],
        # Which lines were held out, so another build (or a person) can check for leaks.
        "validation_lines": [e["line"] for e in written if e["split"] == "validation"],
    }
    if len(written) + len(skipped) != lines:
        report["unaccounted_lines"] = lines - len(written) - len(skipped)
    return report, stats


def read_beam_logs(log_dir: str) -> list:
    """Log entries the Beam workers wrote (JSON lines)."""
    entries = []
    for path in storage.glob(log_dir, "*.jsonl*"):
        with storage.open_file(path, "r") as f:
            entries += [json.loads(x) for x in f if x.strip()]
    return entries
