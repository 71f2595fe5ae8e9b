"""`ualm mixture sweep`: which blend should we train on? One short proxy run per candidate blend,
every run from the same seed and initialisation, each evaluated on the same held-out batches of
every task; then a per-task regression of held-out loss on the shares (sweep_fit.py) and the blend
it predicts to be best, marked as a prediction (`--verify` trains it and reports the gap).

OUT/
  blends.json            the plan: every blend's target token shares (a rerun must match it)
  runs/<blend>/          an ordinary run directory (checkpoint, metrics) + result.json when done
  sweep.jsonl            one line per finished blend: shares, realised shares, tokens seen per
                         task, held-out loss / accuracy / targets per task
  fit.json               per-task fits (coefficients, R^2, leave-one-out RMSE), the predicted
                         best blend and its predicted losses; after --verify also the measured ones
  sweep.png              held-out loss of each task against its share, with the fit

A rerun skips blends whose result.json exists (and resumes an interrupted one from its
checkpoint). Blends run one after another on the local devices, or each in its own process
(`--parallel N`, N at a time).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import yaml

from data_pipelines import mixture as mix
from data_pipelines.grain_pipeline import make_config_iterator, realised_shares
from ualm_jax.config import load_config
from ualm_jax.recipes import sweep_fit
from ualm_jax.train.evaluation import HeldOut, eval_record, eval_sums
from ualm_jax.train.loop import train
from ualm_jax.train.setup import setup_training

RESULT = "result.json"


# The plan ------------------------------------------------------------------------------------------
def _normalise(shares: dict, names: Sequence[str], where: str) -> dict:
    unknown = [k for k in shares if k not in names]
    if unknown:
        raise ValueError(f"{where}: unknown task(s) {', '.join(map(str, unknown))}; the mixture's "
                         f"tasks are {', '.join(names)}")
    out = {}
    for n in names:
        v = shares.get(n, 0.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
            raise ValueError(f"{where}.{n}={v!r}: expected a share >= 0")
        out[n] = float(v)
    total = sum(out.values())
    if total <= 0:
        raise ValueError(f"{where}: every share is 0")
    return {n: v / total for n, v in out.items()}


def load_blends(path: str, names: Sequence[str]) -> list[dict]:
    """A YAML file: `blends:` (or the top level) is a list of {name?, shares: {task: share}} or
    plain {task: share} mappings; shares are renormalised, missing tasks are 0."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"--blends {path}: cannot read it as YAML ({e})") from e
    items = raw.get("blends") if isinstance(raw, dict) else raw
    if not isinstance(items, list) or not items:
        raise ValueError(f"--blends {path}: expected a non-empty list under `blends:`")
    out, seen = [], set()
    for i, item in enumerate(items):
        where = f"{path}: blends[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected a mapping of task shares")
        name = str(item.get("name", f"b{i:02d}"))
        shares = item.get("shares", {k: v for k, v in item.items() if k != "name"})
        if not isinstance(shares, dict):
            raise ValueError(f"{where}.shares: expected a mapping task -> share")
        if name in seen or not name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"{where}.name={name!r}: expected a unique name of letters, digits, - and _")
        seen.add(name)
        out.append({"name": name, "shares": _normalise(shares, names, f"{where}.shares")})
    return out


def sample_blends(base: dict, n: int, seed: int, concentration: float) -> list[dict]:
    """The config's own blend ("base") and n draws from a Dirichlet centred on it (RegMix-style:
    alpha = concentration x base shares; lower concentration spreads the blends further)."""
    if n < 1:
        raise ValueError(f"--samples must be at least 1, got {n}")
    if not concentration > 0:
        raise ValueError(f"--concentration must be > 0, got {concentration}")
    names = list(base)
    alpha = np.maximum(np.asarray([base[k] for k in names]) * concentration, 1e-3)
    draws = np.random.default_rng(seed).dirichlet(alpha, n)
    return [{"name": "base", "shares": dict(base)}] + [
        {"name": f"s{i + 1:02d}", "shares": {k: float(v) for k, v in zip(names, d)}}
        for i, d in enumerate(draws)]


def blend_config(cfg, shares: dict, steps: int):
    """The proxy run of one blend: the config with these token shares (upsample folded in), run
    for `steps`, no in-loop evaluation (the sweep evaluates every task itself), one checkpoint."""
    c = copy.deepcopy(cfg)
    entries = mix.parse_mixture(cfg.data.mixture)
    c.data.mixture = [{"name": e.name, "path": e.path, "share": float(shares[e.name]),
                       "upsample": 1.0} for e in entries]
    c.train.steps = int(steps)
    c.train.eval_every, c.train.eval_batches = 0, 0
    c.train.checkpoint_every, c.train.keep_last = int(steps), 1
    c.train.log_every = max(1, min(c.train.log_every, int(steps)))
    c.eval.prompts = ""
    return c.validate()


def task_eval_config(cfg, task: str):
    """Held-out batches of one task only (its id unchanged): the same batches for every blend."""
    c = copy.deepcopy(cfg)
    c.data.mixture = [{"name": e.name, "path": e.path, "share": 1.0 if e.name == task else 0.0}
                      for e in mix.parse_mixture(cfg.data.mixture)]
    return c.validate()


# One blend -----------------------------------------------------------------------------------------
class Evaluator:
    """The sharded eval step (compiled once per process) and each task's held-out config."""

    def __init__(self, cfg, names: Sequence[str], batches: int):
        self.names, self.batches = list(names), batches
        self.setup = setup_training(cfg, names)
        self.cfgs = {t: task_eval_config(cfg, t) for t in names}
        self.held_out = {t: HeldOut(c) for t, c in self.cfgs.items()}  # opened once, rewound

    def __call__(self, params) -> dict:
        out = {}
        for t in self.names:
            try:
                total = eval_sums(self.setup.eval_fn, params, self.cfgs[t], self.setup.mesh,
                                  self.batches, self.held_out[t])
            except KeyError:  # the task's build has no validation split
                out[t] = None
                continue
            rec = eval_record(total, self.names, 0)
            out[t] = {"loss": rec.get(f"eval/loss/{t}"), "accuracy": rec.get(f"eval/accuracy/{t}"),
                      "targets": rec.get(f"eval/targets/{t}", 0)}
        return out


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)  # never a half-written result that looks complete


def run_blend(cfg, blend: dict, out: Path, steps: int, evaluator: Callable[[], Evaluator]) -> dict:
    """One blend's result: read back when it has one, else trained and evaluated (`evaluator()`
    gives the shared Evaluator, built on first use)."""
    run_dir = out / "runs" / blend["name"]
    done = run_dir / RESULT
    if done.exists():
        return json.loads(done.read_text())
    c = blend_config(cfg, blend["shares"], steps)
    print(f"blend {blend['name']}: " + ", ".join(f"{k} {v:.3f}" for k, v in blend["shares"].items()),
          flush=True)
    result = train(c, run_dir)
    if result["step"] != steps:
        raise RuntimeError(f"blend {blend['name']} stopped at step {result['step']} of {steps}; "
                           "rerun the sweep to resume it")
    ev = evaluator()
    held = ev(result["state"]["params"])
    # The tokens the run saw: the same deterministic stream, replayed on the host.
    it = make_config_iterator(c, "train", 0, 1)
    available = {r["name"]: r.get("tokens_available") for r in it.report}
    seen = realised_shares(it, steps, ev.names)
    epochs = {n: (seen["tokens"].get(n, 0) / available[n] if available.get(n) else None)
              for n in ev.names}
    row = {"name": blend["name"], "shares": blend["shares"], "steps": steps,
           "realised_shares": seen["shares"], "tokens": seen["tokens"], "epochs": epochs,
           "packing_efficiency": seen["packing_efficiency"], "held_out": held,
           "run_dir": str(run_dir)}
    _write_json(done, row)
    return row


# The sweep -----------------------------------------------------------------------------------------
def _plan(out: Path, blends: list[dict]) -> list[dict]:
    plan = out / "blends.json"
    if plan.exists():
        saved = json.loads(plan.read_text())
        if saved != blends:
            raise ValueError(f"{plan} holds another sweep's blends: rerun with the same blends "
                             "(same --blends, or --samples/--seed/--concentration), or use "
                             "another --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(plan, blends)
    return blends


def _run_parallel(config: str, out: Path, names: list[str], parallel: int,
                  overrides: Sequence[str]) -> None:
    """Each blend in its own process, `parallel` at a time (each trains, evaluates, writes its
    result.json; this process only waits)."""
    launcher = "import sys; from ualm_jax.cli import main; sys.exit(main(sys.argv[1:]))"
    waiting, running = list(names), []
    failed = []
    while waiting or running:
        while waiting and len(running) < parallel:
            name = waiting.pop(0)
            log = open(out / "runs" / f"{name}.log", "w")
            cmd = [sys.executable, "-c", launcher, "mixture", "sweep", "--config", config,
                   "--out", str(out), "--only", name, *overrides]
            running.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
        name, proc, log = running.pop(0)
        if proc.wait() != 0:
            failed.append(name)
        log.close()
        print(f"blend {name}: {'failed' if proc.returncode else 'done'} (log {log.name})", flush=True)
    if failed:
        raise RuntimeError(f"blend(s) {', '.join(failed)} failed; see their logs in {out / 'runs'}")


def sweep(config: str, out: str, blends_file: Optional[str] = None, samples: Optional[int] = None,
          seed: int = 0, concentration: float = 2.0, steps: Optional[int] = None,
          objective: str = "mean", fit: str = "loglinear", parallel: int = 1,
          eval_batches: Optional[int] = None, verify: bool = False, only: Optional[str] = None,
          overrides: Sequence[str] = ()) -> dict:
    cfg = load_config(config, list(overrides))
    if cfg.data.source != "mixture":
        raise ValueError(f"{config}: data.source={cfg.data.source!r}; `mixture sweep` trains on "
                         "data.mixture builds through Grain (data.source=mixture)")
    entries = mix.parse_mixture(cfg.data.mixture)
    names = [e.name for e in entries]
    if len(names) < 2:
        raise ValueError("a sweep needs a mixture of at least 2 tasks")
    steps = int(steps or cfg.train.steps)
    batches = int(eval_batches or cfg.train.eval_batches or 4)
    sweep_fit.objective_weights(objective, names)  # a bad --objective fails before any training
    if fit not in sweep_fit.FITS:
        raise ValueError(f"--fit {fit!r} is not one of {', '.join(sweep_fit.FITS)}")
    out_dir = Path(out)
    if only is None:
        if blends_file:
            blends = load_blends(blends_file, names)
        else:
            blends = sample_blends(mix.target_shares(entries), samples or 6, seed, concentration)
        if len(blends) < 3:
            raise ValueError(f"{len(blends)} blend(s): the fit needs at least 3")
        _plan(out_dir, [{**b, "steps": steps} for b in blends])
    plan = json.loads((out_dir / "blends.json").read_text())
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    with compilation_cache(out_dir):
        return _sweep(cfg, config, out_dir, plan, names, batches, steps, objective, fit, parallel,
                      verify, only, seed, overrides)


def _sweep(cfg, config, out_dir, plan, names, batches, steps, objective, fit, parallel, verify,
           only, seed, overrides) -> dict:
    evaluator = None

    def evaluate_with():
        nonlocal evaluator
        if evaluator is None:
            evaluator = Evaluator(cfg, names, batches)
        return evaluator

    if only is not None:
        blend = next((b for b in plan if b["name"] == only), None)
        if blend is None:
            raise ValueError(f"--only {only}: no such blend in {out_dir / 'blends.json'}")
        return run_blend(cfg, blend, out_dir, blend["steps"], evaluate_with)
    todo = [b["name"] for b in plan if not (out_dir / "runs" / b["name"] / RESULT).exists()]
    if todo:
        print(f"sweep: {len(plan) - len(todo)} of {len(plan)} blends done; training "
              f"{', '.join(todo)}", flush=True)
    if parallel > 1 and len(todo) > 1:
        _run_parallel(config, out_dir, todo, parallel, overrides)
    rows = [run_blend(cfg, b, out_dir, b["steps"], evaluate_with) for b in plan]
    with open(out_dir / "sweep.jsonl.tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(out_dir / "sweep.jsonl.tmp", out_dir / "sweep.jsonl")

    report = fit_report(rows, names, fit, objective, seed)
    if verify:
        shares = report["prediction"]["shares"]
        tag = hashlib.sha256(json.dumps(shares, sort_keys=True).encode()).hexdigest()[:8]
        row = run_blend(cfg, {"name": f"predicted-{tag}", "shares": shares}, out_dir, steps,
                        evaluate_with)
        report["verification"] = verification(report, row)
    _write_json(out_dir / "fit.json", report)
    try:
        from ualm_jax.report.plots import plot_sweep

        plot_sweep(rows, names, report, str(out_dir / "sweep.png"))
    except ImportError:  # matplotlib is in the lock; a trimmed install still gets the numbers
        pass
    return {"out": str(out_dir), "rows": rows, "fit": report}


@contextlib.contextmanager
def compilation_cache(out: Path):
    """Blends compile the same train and eval steps: XLA's persistent cache in OUT/xla_cache
    (unless the user set one) makes every run after the first skip compilation. The previous
    settings come back afterwards (a sweep called in-process leaves the process as it was)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = {k: getattr(jax.config, k) for k in keys}
    if before[keys[0]]:
        yield
        return
    cc.reset_cache()  # the cache binds its folder on first use
    jax.config.update(keys[0], str((out / "xla_cache").absolute()))
    jax.config.update(keys[1], 0.5)
    try:
        yield
    finally:
        for k, v in before.items():
            jax.config.update(k, v)
        cc.reset_cache()


def _losses(rows: list[dict], names: Sequence[str]) -> dict:
    return {t: [(r["held_out"].get(t) or {}).get("loss") for r in rows] for t in names}


def fit_report(rows: list[dict], names: Sequence[str], kind: str, objective: str,
               seed: int = 0) -> dict:
    shares = np.asarray([[r["shares"][n] for n in names] for r in rows])
    f = sweep_fit.fit_sweep(names, shares, _losses(rows, names), kind, objective)
    best, value, per_task = sweep_fit.best_blend(f, shares, seed=seed)
    return {"fit": kind, "objective": objective, "weights": f.weights,
            "not_fitted": f.skipped or {},
            "tasks": [f.fits[t].to_json(names) for t in f.fits],
            "objective_loo_rmse": f.objective_loo_rmse,
            "prediction": {"shares": {n: float(v) for n, v in zip(names, best)},
                           "objective": value, "losses": per_task,
                           "error": 2.0 * f.objective_loo_rmse,
                           "note": "a prediction of the fit (within the sampled range), not a "
                                   "measured result; error = 2 x leave-one-out RMSE"},
            "measured_objective": {r["name"]: _objective(r, f.weights) for r in rows},
            "warnings": fit_warnings(rows, names, f)}


MAX_PROXY_EPOCHS = 4.0  # past this a proxy run memorises its task: its loss says little of a blend


def fit_warnings(rows: list[dict], names: Sequence[str], f) -> list[str]:
    """Why the prediction may mislead: fits with no spare blends (as many parameters as points
    make R^2 = 1 whatever the data), a power law whose loss rises with the task's own share, and
    tasks repeated for many epochs in the proxy runs."""
    out = []
    for t, tf in f.fits.items():
        used, params = int(tf.used.sum()), len(tf.coef)
        if used <= params + 1:
            out.append(f"{t}: fitted from {used} blends with {params} parameters (R^2 "
                       f"{tf.r2:.3f} means little): sample more blends (--samples)")
        if tf.kind == "loglinear" and tf.coef[1] > 0:
            out.append(f"{t}: held-out loss RISES with its own share (exponent "
                       f"{tf.coef[1]:+.3f}): noise or overfitting, not a law of data amount")
    for t in names:
        most = max(((r.get("epochs") or {}).get(t) or 0.0) for r in rows)
        if most > MAX_PROXY_EPOCHS:
            out.append(f"{t}: up to {most:.1f} epochs over its data in the proxy runs (more than "
                       f"{MAX_PROXY_EPOCHS:g}): shorten --steps or add data")
    return out


def _objective(row: dict, weights: dict) -> Optional[float]:
    vals = [(w, (row["held_out"].get(t) or {}).get("loss")) for t, w in weights.items()]
    if any(v is None for _, v in vals):
        return None
    return float(sum(w * v for w, v in vals))


def verification(report: dict, row: dict) -> dict:
    p = report["prediction"]
    measured = _objective(row, report["weights"])
    gap = None if measured is None else measured - p["objective"]
    return {"name": row["name"], "predicted_objective": p["objective"],
            "measured_objective": measured, "gap": gap, "error": p["error"],
            "within_error": gap is not None and abs(gap) <= p["error"],
            "measured_losses": {t: (row["held_out"].get(t) or {}).get("loss") for t in report["weights"]},
            "best_sampled_objective": min(v for v in report["measured_objective"].values()
                                          if v is not None)}


def format_sweep(result: dict) -> str:
    rows, fit = result["rows"], result["fit"]
    names = list(rows[0]["shares"])
    head = ["blend"] + [f"{n} share" for n in names] + [f"{n} loss" for n in names] + \
           [f"{n} acc" for n in names] + ["objective"]
    table = [head]
    for r in rows:
        cells = [r["name"]] + [f"{r['shares'][n]:.3f}" for n in names]
        for key, fmt in (("loss", "{:.4f}"), ("accuracy", "{:.3f}")):
            cells += ["-" if not r["held_out"].get(n) else fmt.format(r["held_out"][n][key])
                      for n in names]
        obj = fit["measured_objective"].get(r["name"])
        table.append(cells + ["-" if obj is None else f"{obj:.4f}"])
    widths = [max(len(row[c]) for row in table) for c in range(len(head))]
    lines = ["  ".join(v.rjust(w) if c else v.ljust(w) for c, (v, w) in
                       enumerate(zip(row, widths))) for row in table]
    lines.append("")
    lines.append(f"fit: {fit['fit']} per task (held-out loss on the shares)")
    for t in fit["tasks"]:
        lines.append(f"  {t['task']:<12} R^2 {t['r2']:.3f}   leave-one-out RMSE {t['loo_rmse']:.4f}")
    p = fit["prediction"]
    for t, why in fit.get("not_fitted", {}).items():
        lines.append(f"  {t:<12} no fit, left out of the objective: {why}")
    lines.append(f"objective {fit['objective']}: leave-one-out RMSE {fit['objective_loo_rmse']:.4f}")
    for w in fit.get("warnings", []):
        lines.append(f"WARNING {w}")
    lines.append("PREDICTED best blend (a prediction, not a result): " + ", ".join(
        f"{n} {v:.3f}" for n, v in p["shares"].items())
        + f" -> objective {p['objective']:.4f} +- {p['error']:.4f}")
    v = fit.get("verification")
    if v:
        lines.append(f"verified: trained {v['name']}: measured objective {v['measured_objective']:.4f}"
                     f" (gap {v['gap']:+.4f}; {'within' if v['within_error'] else 'OUTSIDE'} the "
                     f"stated error {v['error']:.4f}); best sampled blend {v['best_sampled_objective']:.4f}")
    lines.append(f"files: {result['out']}/sweep.jsonl, fit.json, sweep.png")
    return "\n".join(lines)
