"""Training progress: a progress line with loss, steps/s and ETA, a CSV log, and optionally TensorBoard."""

from __future__ import annotations

import csv
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

from unnoise.train.config import LoopConfig


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Averages the logged values over ``log_every`` steps into ``log.csv`` rows; prints progress on rank 0."""

    def __init__(
        self, out: Path, cfg: LoopConfig, columns: list[str], enabled: bool, log: Callable[[str], None] | None
    ):
        self.path, self.cfg, self.columns, self.enabled = out / "log.csv", cfg, columns, enabled
        self.tty = log is None and sys.stderr.isatty()
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.sums: dict[str, float] = {}
        self.count = 0
        self.writer = None

    def start(self, step: int) -> None:
        self.first_step, self.t0 = step, time.perf_counter()
        self.window_t0 = self.t0
        if not self.enabled:
            return
        if self.cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                message = "train.tensorboard = true needs the tensorboard package: pip install tensorboard"
                raise RuntimeError(message) from None
            self.writer = SummaryWriter(str(self.path.parent / "tensorboard"))
        if not self.path.exists() or step == 0:
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(["step", "elapsed_s", "steps_per_s", *self.columns])

    def resume(self, step: int) -> None:
        """Drop log rows after ``step`` (written after the checkpoint a run resumes from)."""
        if not self.enabled or not self.path.exists():
            return
        with open(self.path, newline="") as f:
            rows = list(csv.reader(f))
        kept = [rows[0], *(r for r in rows[1:] if int(r[0]) <= step)]
        with open(self.path, "w", newline="") as f:
            csv.writer(f).writerows(kept)

    def update(self, step: int, logs: dict[str, float]) -> None:
        for key, value in logs.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1
        if not self.enabled:
            return
        now = time.perf_counter()
        rate = (step - self.first_step) / max(now - self.t0, 1e-9)
        eta = (self.cfg.steps - step) / rate if rate > 0 else math.inf
        loss = logs.get("loss", math.nan)
        line = f"step {step}/{self.cfg.steps}  loss {loss:.4f}  {rate:.2f} steps/s  ETA {_duration(eta)}"
        if self.tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        if step % self.cfg.log_every == 0 or step == self.cfg.steps:
            means = {k: v / self.count for k, v in self.sums.items()}
            window_rate = self.count / max(now - self.window_t0, 1e-9)
            with open(self.path, "a", newline="") as f:
                row = [step, f"{now - self.t0:.1f}", f"{window_rate:.3f}"]
                csv.writer(f).writerow(row + [f"{means[c]:.6g}" if c in means else "" for c in self.columns])
            if self.writer is not None:
                for key, value in means.items():
                    self.writer.add_scalar(key, value, step)
            if not self.tty:
                self.log(line)
            self.sums, self.count, self.window_t0 = {}, 0, now

    def close(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr)
        if self.writer is not None:
            self.writer.close()
