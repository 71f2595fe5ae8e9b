"""Metrics sinks: DIR/metrics.jsonl (one JSON object per line), TensorBoard, one console line.
DIR may be a gs:// URL: object storage cannot append, so there both sinks upload at most every
`flush_seconds` (and at eval and close) instead of after every record."""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import time

from ualm_jax import storage


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class MetricsWriter:
    def __init__(self, run_dir, tensorboard: bool = True, is_main: bool = True,
                 flush_seconds: float = 30.0):
        self.is_main = is_main
        self.remote = storage.is_url(run_dir)
        self.flush_seconds = flush_seconds if self.remote else 0.0
        self.log = storage.LineLog(storage.as_path(run_dir) / "metrics.jsonl", self.flush_seconds) \
            if is_main else None
        self.tb = None
        self._tb_flushed = time.monotonic()
        # On object storage the event files are written locally and uploaded whole at each flush
        # (what tensorboardX's own gs:// writer does, minus its retries at interpreter exit).
        self._tb_dest = storage.as_path(run_dir) / "tensorboard"
        self._tb_local = tempfile.mkdtemp(prefix="ualm-tb-") if self.remote and is_main and tensorboard \
            else None
        if is_main and tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(self._tb_local or str(self._tb_dest),
                                        flush_secs=max(self.flush_seconds, 1.0))
            except ImportError:  # optional sink
                self.tb = None

    def write(self, record: dict, flush: bool = False) -> None:
        if not self.is_main:
            return
        self.log.append(json.dumps(record))
        if self.tb is not None:
            step = record["step"]
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(k, v, step)
            if flush or time.monotonic() - self._tb_flushed >= self.flush_seconds:
                self._flush_tb()
        if flush:
            self.log.flush()

    def _flush_tb(self) -> None:
        self.tb.flush()
        self._tb_flushed = time.monotonic()
        if self._tb_local:
            storage.upload_tree(self._tb_local, self._tb_dest)

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
        if self.log is not None:
            self.log.flush()
        if self.tb is not None:
            self._flush_tb()
            self.tb.close()
        if self._tb_local:
            shutil.rmtree(self._tb_local, ignore_errors=True)
