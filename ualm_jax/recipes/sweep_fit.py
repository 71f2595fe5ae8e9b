"""The regression of a mixture sweep: per-task held-out loss as a function of the blend's shares,
its quality, and the blend it predicts to be best (RegMix / data-mixing-law style).

Fits (one per task t, over the sweep's blends s in the simplex):
  loglinear  log L_t = a_t + b_t log s_t       a power law in the task's own share (loss falls as
                                               a power of the data the task gets), fitted on the
                                               blends where s_t > 0: a law of data amount says
                                               nothing about a task never seen, whose loss is
                                               that of an untrained task (the sweep reports it)
  linear     L_t = sum_j c_tj s_j              RegMix's linear regression on all shares (the
                                               constant is absorbed: shares sum to 1), all blends
Quality: R^2 in loss units, and the leave-one-out RMSE (each blend predicted by the fit on the
others), the honest error of a prediction at a new blend. The best blend is searched only inside
the sampled range (each share between its smallest and largest sampled value; for loglinear the
smallest POSITIVE one): outside it the fit is extrapolation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np

FITS = ("loglinear", "linear")
RIDGE = 1e-6


@dataclass
class TaskFit:
    task: str
    kind: str
    column: int           # the task's share column
    coef: np.ndarray      # loglinear: (a, b); linear: one coefficient per share
    r2: float             # in-sample, loss units, over the fitted blends
    loo_rmse: float       # leave-one-out RMSE, loss units
    loo_pred: np.ndarray  # each blend's leave-one-out prediction (NaN: not a fitted blend)
    used: np.ndarray      # which blends the fit used

    def features(self, shares) -> np.ndarray:
        x = np.atleast_2d(np.asarray(shares, np.float64))
        if self.kind == "linear":
            return x
        with np.errstate(divide="ignore"):
            return np.stack([np.ones(len(x)), np.log(x[:, self.column])], axis=1)

    def predict(self, shares) -> np.ndarray:
        z = self.features(shares) @ self.coef
        return np.exp(z) if self.kind == "loglinear" else z

    def to_json(self, names: Sequence[str]) -> dict:
        coef = ({"log_scale": float(self.coef[0]), "exponent": float(self.coef[1])}
                if self.kind == "loglinear" else {n: float(c) for n, c in zip(names, self.coef)})
        return {"task": self.task, "fit": self.kind, "r2": self.r2, "loo_rmse": self.loo_rmse,
                "blends_used": int(self.used.sum()), "coef": coef}


def _solve(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    k = x.shape[1]
    return np.linalg.solve(x.T @ x + RIDGE * np.eye(k), x.T @ y)


def fit_task(task: str, shares, losses, kind: str = "loglinear", column: int = 0) -> TaskFit:
    """shares [n, K] (rows summing to 1), losses [n] (finite, > 0 for loglinear); column: the
    task's share column."""
    if kind not in FITS:
        raise ValueError(f"fit {kind!r} is not one of {', '.join(FITS)}")
    x, y = np.asarray(shares, np.float64), np.asarray(losses, np.float64)
    used = x[:, column] > 0 if kind == "loglinear" else np.ones(len(y), bool)
    need = 3
    if used.sum() < need:
        raise ValueError(f"task {task!r}: {int(used.sum())} blends with a held-out loss"
                         f"{' and a share > 0' if kind == 'loglinear' else ''}; a fit needs {need}")
    if kind == "loglinear" and (y[used] <= 0).any():
        raise ValueError(f"task {task!r}: a loss <= 0 cannot be fitted log-linearly (use --fit linear)")
    fit = TaskFit(task, kind, column, np.zeros(0), 0.0, 0.0, np.full(len(y), np.nan), used)
    f, yu = fit.features(x[used]), y[used]
    target = np.log(yu) if kind == "loglinear" else yu
    fit.coef = _solve(f, target)
    pred = fit.predict(x[used])
    ss_res, ss_tot = float(((yu - pred) ** 2).sum()), float(((yu - yu.mean()) ** 2).sum())
    fit.r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    idx = np.flatnonzero(used)
    for j, i in enumerate(idx):
        keep = np.arange(len(idx)) != j
        other = TaskFit(task, kind, column, _solve(f[keep], target[keep]), 0, 0, None, None)
        fit.loo_pred[i] = other.predict(x[i])[0]
    fit.loo_rmse = float(np.sqrt(np.nanmean((fit.loo_pred[used] - yu) ** 2)))
    return fit


def objective_weights(spec: str, tasks: Sequence[str]) -> dict:
    """`mean` (every task alike) or `task=weight,...` (others 0) -> {task: weight}, summing to 1."""
    spec = (spec or "mean").strip()
    if spec == "mean":
        return {t: 1.0 / len(tasks) for t in tasks}
    out = {}
    for part in spec.split(","):
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or name not in tasks:
            raise ValueError(f"--objective {spec!r}: expected mean or task=weight,... with tasks "
                             f"from {', '.join(tasks)} (got {part.strip()!r})")
        try:
            w = float(value)
        except ValueError:
            raise ValueError(f"--objective {spec!r}: weight of {name!r} is not a number") from None
        if not np.isfinite(w) or w < 0:
            raise ValueError(f"--objective {spec!r}: weight of {name!r} must be >= 0")
        out[name] = w
    total = sum(out.values())
    if total <= 0:
        raise ValueError(f"--objective {spec!r}: at least one weight must be > 0")
    return {t: out.get(t, 0.0) / total for t in tasks}


@dataclass
class SweepFit:
    names: list              # share columns (the mixture's tasks)
    fits: dict               # task -> TaskFit (tasks with held-out data)
    weights: dict            # objective weights over the fitted tasks
    objective_loo_rmse: float
    skipped: dict = None     # task -> why it has no fit (left out of the objective)

    def predict(self, shares) -> dict:
        return {t: f.predict(shares) for t, f in self.fits.items()}

    def objective(self, shares) -> np.ndarray:
        p = self.predict(shares)
        return sum(w * p[t] for t, w in self.weights.items() if w > 0)


def fit_sweep(names: Sequence[str], shares, losses: Mapping[str, Sequence[Optional[float]]],
              kind: str = "loglinear", objective: str = "mean") -> SweepFit:
    """shares [n, K] over `names`; losses: task -> n held-out losses (None where missing). Tasks
    without a loss for every blend are left out of the fit and the objective. The objective's
    leave-one-out RMSE is over the blends every task's fit used."""
    x = np.asarray(shares, np.float64)
    fitted = [t for t in names if t in losses and all(v is not None and np.isfinite(v)
                                                      for v in losses[t])]
    if not fitted:
        raise ValueError("no task has a held-out loss for every blend: nothing to fit")
    fits, skipped = {}, {}
    for t in fitted:
        try:
            fits[t] = fit_task(t, x, np.asarray(losses[t], np.float64), kind, list(names).index(t))
        except ValueError as e:  # too few blends with this task's data: reported, not fitted
            skipped[t] = str(e)
    if not fits:
        raise ValueError("no task could be fitted: " + "; ".join(skipped.values()))
    fitted = [t for t in fitted if t in fits]
    weights = objective_weights(objective, fitted) if objective == "mean" else {
        t: w for t, w in objective_weights(objective, list(names)).items() if t in fits}
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"--objective {objective!r}: none of its tasks could be fitted "
                         f"({'; '.join(skipped.values())})")
    weights = {t: w / total for t, w in weights.items()}
    actual = sum(w * np.asarray(losses[t], np.float64) for t, w in weights.items())
    loo = sum(w * fits[t].loo_pred for t, w in weights.items() if w > 0)
    ok = np.isfinite(loo)
    rmse = float(np.sqrt(((loo[ok] - actual[ok]) ** 2).mean())) if ok.any() else float("nan")
    return SweepFit(list(names), fits, weights, rmse, skipped)


def best_blend(fit: SweepFit, sampled, candidates: int = 20000, seed: int = 0) -> tuple:
    """The candidate blend with the lowest predicted objective, among `candidates` uniform draws
    from the simplex and the sampled blends, kept inside the sampled range of every share (for
    loglinear fits, from the smallest positive sampled share up).
    -> (shares [K], predicted objective, predicted loss per task)."""
    x = np.asarray(sampled, np.float64)
    lo, hi = x.min(axis=0), x.max(axis=0)
    if any(f.kind == "loglinear" for f in fit.fits.values()):
        lo = np.asarray([x[x[:, j] > 0, j].min() if (x[:, j] > 0).any() else 0.0
                         for j in range(x.shape[1])])
    rng = np.random.default_rng(seed)
    cand = np.concatenate([x, rng.dirichlet(np.ones(x.shape[1]), candidates)])
    inside = cand[((cand >= lo - 1e-12) & (cand <= hi + 1e-12)).all(axis=1)]
    values = fit.objective(inside)
    i = int(np.nanargmin(values))
    best = inside[i]
    return best, float(values[i]), {t: float(v[i]) for t, v in fit.predict(inside).items()}
