"""Metrics sinks: DIR/metrics.jsonl (one JSON object per line), TensorBoard, one console line."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class MetricsWriter:
    def __init__(self, run_dir: Path, tensorboard: bool = True, is_main: bool = True):
        self.is_main = is_main
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if is_main and tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:  # optional sink
                self.tb = None

    def write(self, record: dict) -> None:
        if not self.is_main:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record["step"]
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def console(self, record: dict, total_steps: int, started: float, start_step: int) -> None:
        if not self.is_main:
            return
        step = record["step"]
        done = step - start_step
        elapsed = time.perf_counter() - started
        eta = elapsed / done * (total_steps - step) if done else float("nan")
        tasks = " ".join(f"{k[5:]} {v:.3f}" for k, v in record.items()
                         if k.startswith("loss/") and not k.startswith("loss/stream"))
        tps = record.get("tokens_per_s")
        mfu = record.get("mfu")
        print(f"step {step}/{total_steps} | loss {record['loss']:.4f}"
              + (f" | {tasks}" if tasks else "")
              + f" | gnorm {record['grad_norm']:.3f} | lr {record.get('lr', 0):.2e}"
              + (f" | {tps / 1e3:.1f}k tok/s" if tps else "")
              + (f" | mfu {mfu:.1%}" if mfu is not None else "")
              + f" | eta {_fmt_time(eta)}", flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
