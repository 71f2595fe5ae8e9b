"""Run figures as PNG files. Figures are built on matplotlib's Agg canvas directly (no pyplot), so
nothing touches the global backend or needs a display, and figures are freed when dropped.

    plot_losses("runs/demo/metrics.jsonl", "runs/demo/losses.png")
    plot_mixture(target_shares, realised["shares"], "runs/demo/mixture.png")
    plot_spectrograms(results["samples"], "runs/demo/samples.png")
"""
from __future__ import annotations

import json
import os
import textwrap

import numpy as np

SAMPLE_RATE = 16000
N_MELS = 64


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out_png: str) -> str:
    folder = os.path.dirname(os.path.abspath(out_png))
    os.makedirs(folder, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_png, format="png")
    return out_png


def _series(records: list, prefix: str) -> dict:
    """{task: (steps, values)} of keys `prefix<task>` (per-stream losses left out)."""
    out: dict = {}
    for r in records:
        for key, v in r.items():
            if key.startswith(prefix) and not key[len(prefix):].startswith("stream_") \
                    and isinstance(v, (int, float)) and np.isfinite(v):
                steps, values = out.setdefault(key[len(prefix):], ([], []))
                steps.append(r["step"])
                values.append(float(v))
    return out


def plot_losses(metrics_jsonl: str, out_png: str) -> str:
    """Train loss per task (and overall) and eval loss per task vs step, from metrics.jsonl."""
    with open(metrics_jsonl) as f:
        records = [json.loads(x) for x in f if x.strip()]
    records = [r for r in records if "step" in r]
    panels = (("train loss", "loss", _series(records, "loss/")),
              ("eval loss", "eval/loss", _series(records, "eval/loss/")))
    names = sorted({t for _, _, s in panels for t in s})
    colours = {t: f"C{i % 10}" for i, t in enumerate(names)}  # one colour per task, both panels
    fig = _figure(11, 4)
    for i, (title, total_key, series) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        total = [(r["step"], r[total_key]) for r in records if total_key in r]
        if total:
            ax.plot(*zip(*total), color="black", lw=2, label="all")
        for task, (steps, values) in sorted(series.items()):
            ax.plot(steps, values, color=colours[task], marker="." if len(steps) < 30 else None,
                    label=task)
        if not total and not series:
            ax.text(0.5, 0.5, "no records", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.legend(fontsize=8)
            values = [v for _, v in total] + [v for _, vs in series.values() for v in vs]
            if min(values) > 0 and max(values) > 10 * min(values):
                ax.set_yscale("log")  # early losses dwarf the late ones otherwise
        ax.set(title=title, xlabel="step", ylabel="loss")
        ax.grid(alpha=0.3)
    return _save(fig, out_png)


def plot_mixture(target_shares: dict, realised_shares: dict, out_png: str) -> str:
    """Target vs realised token share per task, as grouped bars."""
    names = list(dict.fromkeys([*target_shares, *realised_shares]))
    x = np.arange(len(names))
    fig = _figure(max(5, 1.2 * len(names) + 2), 4)
    ax = fig.add_subplot(1, 1, 1)
    for offset, label, shares in ((-0.2, "target", target_shares),
                                  (0.2, "realised", realised_shares)):
        ax.bar(x + offset, [float(shares.get(n, 0.0)) for n in names], 0.4, label=label)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set(ylabel="token share", title="task mixture")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out_png)


def _log_mel(path: str) -> tuple:
    import soundfile as sf

    from data_pipelines.features import log_mel, resample, to_mono

    wave, sr = sf.read(path, dtype="float32")
    wave = resample(to_mono(wave), sr, SAMPLE_RATE) if len(wave) else np.zeros(0, np.float32)
    return log_mel(wave, N_MELS), len(wave) / SAMPLE_RATE


def plot_spectrograms(items: list, out_png: str, columns: int = 2) -> str:
    """Log-mel spectrograms of (caption, wav path) items, each titled with its caption."""
    items = list(items)
    rows = max(1, -(-len(items) // columns))
    fig = _figure(6 * columns, 2.4 * rows)
    for i, (caption, path) in enumerate(items):
        ax = fig.add_subplot(rows, columns, i + 1)
        mel, seconds = _log_mel(path)
        if len(mel):
            ax.imshow(mel.T, origin="lower", aspect="auto", cmap="magma",
                      extent=(0.0, seconds, 0, N_MELS))
        else:
            ax.text(0.5, 0.5, "empty clip", ha="center", va="center", transform=ax.transAxes)
        ax.set_title("\n".join(textwrap.wrap(str(caption), 70)[:2]), fontsize=8)
        ax.set(xlabel="s", ylabel="mel bin")
    if not items:
        fig.add_subplot(1, 1, 1).text(0.5, 0.5, "no samples", ha="center", va="center")
    return _save(fig, out_png)


def plot_sweep(rows: list, names: list, report: dict, out_png: str) -> str:
    """One panel per task: held-out loss of each blend against the task's share (dots), the
    fit's value at each blend (crosses) and the predicted best blend (star)."""
    fits = {t["task"]: t for t in report["tasks"]}
    shares = np.asarray([[r["shares"][n] for n in names] for r in rows])
    best = report["prediction"]
    fig = _figure(3.6 * len(names), 3.4)
    for i, task in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        losses = [(r["held_out"].get(task) or {}).get("loss") for r in rows]
        pts = [(s, v) for s, v in zip(shares[:, i], losses) if v is not None]
        if pts:
            ax.scatter(*zip(*pts), color="C0", label="measured", zorder=3)
        if task in fits:
            coef = fits[task]["coef"]
            if report["fit"] == "loglinear":  # loss = exp(a) * share^b over the fitted shares
                used = shares[:, i][shares[:, i] > 0]
                s = np.linspace(used.min(), used.max(), 50)
                ax.plot(s, np.exp(coef["log_scale"]) * s ** coef["exponent"], color="C1",
                        label="loglinear fit")
            else:
                z = shares @ np.asarray([coef[n] for n in names])
                ax.scatter(shares[:, i], z, marker="x", color="C1", label="linear fit")
            ax.scatter([best["shares"][task]], [best["losses"][task]], marker="*", s=160,
                       color="C3", label="predicted best", zorder=4)
            ax.set_title(f"{task} (R^2 {fits[task]['r2']:.2f})", fontsize=10)
        else:
            ax.set_title(f"{task} (no held-out data)", fontsize=10)
        ax.set(xlabel=f"{task} token share", ylabel="held-out loss" if i == 0 else "")
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    return _save(fig, out_png)
