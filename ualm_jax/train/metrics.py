"""Metrics sinks: DIR/metrics.jsonl (one JSON object per line), TensorBoard, one console line.
DIR may be a gs:// URL: object storage cannot append, so there both sinks upload at most every
`flush_seconds` (and at eval and close) instead of after every record."""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import time

import ualm_jax.storage as storage


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _start_wandb(run_dir, config):
    """A Weights & Biases run named after the run dir, resumed across restarts (same id);
    WANDB_PROJECT picks the project, WANDB_MODE=offline keeps it local."""
    import hashlib
    import os

    try:
        import wandb
    except ImportError:
        from ualm_jax.config import ConfigError

        raise ConfigError("train.trackers=[wandb] needs the wandb package: pip install wandb") from None
    name = str(run_dir).rstrip("/")
    local = None if storage.is_url(run_dir) else name
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "ualm-jax"),
                      name=os.path.basename(name), dir=local, config=config, resume="allow",
                      id=hashlib.sha1(os.path.abspath(name).encode()).hexdigest()[:16])


class StepTrace:
    """train.profile_steps=[first, last]: a jax.profiler trace of those steps in RUN/profile/
    (written locally, then uploaded when the run dir is a URL). Process 0 only."""

    def __init__(self, run_dir, steps, is_main: bool = True):
        self.first, self.last = (steps or [0, -1])
        self.enabled = bool(steps) and is_main
        self.remote = storage.is_url(run_dir)
        self.target = storage.as_path(run_dir) / "profile"
        self.local = None
        self.active = False

    def before(self, step: int) -> None:
        """Called before running step `step` (1-based)."""
        if self.enabled and step == self.first and not self.active:
            import jax

            self.local = tempfile.mkdtemp(prefix="ualm-profile-") if self.remote else str(self.target)
            jax.profiler.start_trace(self.local)
            self.active = True

    def after(self, step: int, state) -> None:
        if self.active and step >= self.last:
            self.stop(state)

    def stop(self, state=None) -> None:
        if not self.active:
            return
        import jax

        if state is not None:
            jax.block_until_ready(state)
        jax.profiler.stop_trace()
        self.active = False
        if self.remote:
            storage.upload_tree(self.local, self.target)
            shutil.rmtree(self.local, ignore_errors=True)
        print(f"profile of steps {self.first}..{self.last}: {self.target}", flush=True)


AUDIO_KEY = "_audio"  # a record's audio summaries: {"sample_rate", "clips": [(caption, wave)]}


class WindowMeans:
    """Each logged value is the mean over the steps since the previous log line (a key over the
    steps that reported it: per-task losses only where the task had targets), not one step's
    value; non-finite values (a skipped step's NaN loss) are left out of the means, and steps
    skipped as non-finite are counted in `skipped`. `lr` is its last value, and the last step's
    loss is kept as `loss_last`."""
    LAST = ("lr",)

    def __init__(self):
        self.sums, self.counts, self.last, self.skipped, self.steps = {}, {}, {}, 0, 0

    def add(self, rec: dict) -> None:
        self.steps += 1
        self.skipped += int(bool(rec.get("skipped")))
        for k, v in rec.items():
            if (isinstance(v, (int, float)) and not isinstance(v, bool) and k != "skipped"
                    and math.isfinite(v)):
                self.sums[k] = self.sums.get(k, 0.0) + float(v)
                self.counts[k] = self.counts.get(k, 0) + 1
                self.last[k] = v

    def pop(self) -> dict:
        out = {k: (self.last[k] if k in self.LAST else self.sums[k] / self.counts[k])
               for k in self.sums}
        if "loss" in self.last:
            out["loss_last"] = self.last["loss"]
        out["window_steps"] = self.steps
        out["skipped"] = self.skipped  # steps of the window skipped as non-finite
        self.sums, self.counts, self.last, self.skipped, self.steps = {}, {}, {}, 0, 0
        return out


class MetricsWriter:
    def __init__(self, run_dir, tensorboard: bool = True, is_main: bool = True,
                 flush_seconds: float = 30.0, trackers=(), config: dict | None = None):
        self.is_main = is_main
        self.wandb = _start_wandb(run_dir, config) if is_main and "wandb" in trackers else None
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
        audio = record.pop(AUDIO_KEY, None)
        self.log.append(json.dumps(record))
        if audio and audio.get("clips"):
            self._audio(record["step"], audio)
        if self.tb is not None:
            step = record["step"]
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(k, v, step)
            if flush or time.monotonic() - self._tb_flushed >= self.flush_seconds:
                self._flush_tb()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"
                            and isinstance(v, (int, float)) and not isinstance(v, bool)},
                           step=int(record["step"]))
        if flush:
            self.log.flush()

    def _audio(self, step: int, audio: dict) -> None:
        """The in-loop generations as audio summaries (TensorBoard, W&B), captions as titles."""
        sr = int(audio["sample_rate"])
        for i, (caption, wave) in enumerate(audio["clips"]):
            if self.tb is not None:
                self.tb.add_audio(f"gen/{i}", wave, step, sample_rate=sr)
                self.tb.add_text(f"gen/{i}", caption, step)
            if self.wandb is not None:
                import wandb

                self.wandb.log({f"gen/{i}": wandb.Audio(wave, sample_rate=sr, caption=caption)},
                               step=step)

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
        nan = float("nan")
        dpo = (f" | reward acc {record['reward_accuracy']:.3f} margin {record['reward_margin']:.3f}"
               if "reward_accuracy" in record else "")
        print(f"step {step}/{total_steps} | loss {record.get('loss', nan):.4f}"
              + (f" | {tasks}" if tasks else "") + dpo
              + f" | gnorm {record.get('grad_norm', nan):.3f} | lr {record.get('lr', 0):.2e}"
              + (f" | {tps / 1e3:.1f}k tok/s" if tps else "")
              + (f" | mfu {mfu:.1%}" if mfu is not None else "")
              + f" | eta {_fmt_time(eta)}", flush=True)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        if self.log is not None:
            self.log.flush()
        if self.tb is not None:
            self._flush_tb()
            self.tb.close()
        if self._tb_local:
            shutil.rmtree(self._tb_local, ignore_errors=True)
