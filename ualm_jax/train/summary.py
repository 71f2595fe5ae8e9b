"""The table `ualm train` prints when a run finishes, from train()'s summary."""
from __future__ import annotations


def results_table(summary: dict) -> str:
    """Per-task loss at the first logged step vs held-out loss at the end."""
    first, ev = summary.get("first_loss") or {}, summary.get("eval") or {}
    tasks = sorted({k.split("/", 1)[1] for k in first if k.startswith("loss/") and "stream" not in k}
                   | {k.split("/", 2)[2] for k in ev if k.startswith("eval/loss/")})
    lines = [f"results after {summary['step']} steps ({summary['run_dir']})",
             f"{'task':<10} {'first train loss':>17} {'final eval loss':>16}"]
    for t in tasks:
        a, b = first.get(f"loss/{t}"), ev.get(f"eval/loss/{t}")
        lines.append(f"{t:<10} {'-' if a is None else f'{a:.4f}':>17} {'-' if b is None else f'{b:.4f}':>16}")
    if ev:
        lines.append(f"{'all':<10} {first.get('loss', float('nan')):>17.4f} {ev['eval/loss']:>16.4f}"
                     f"   eval stream-0 accuracy {ev['eval/accuracy']:.3f}")
    last = summary.get("last_logged") or {}
    if "reward_accuracy" in last:  # DPO: no held-out eval; the first and last logged windows
        lines = [f"DPO results after {summary['step']} steps ({summary['run_dir']})",
                 f"{'metric':<16} {'first logged':>13} {'last logged':>12}"]
        for key in ("dpo_loss", "reward_accuracy", "reward_margin", "chosen_ce", "loss"):
            if key in last:
                a, b = first.get(key, float("nan")), last[key]
                lines.append(f"{key:<16} {a:>13.4f} {b:>12.4f}")
    return "\n".join(lines)
