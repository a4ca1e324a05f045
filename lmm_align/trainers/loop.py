"""What every trainer's outer loop shares: metric logging (metrics.jsonl, TensorBoard, a
progress bar), the non-finite check, and preemption (SIGTERM) handling."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import tqdm


class PreemptionGuard:
  """Turns SIGTERM (TPU preemption, `kill`) into a flag the loop checks after each step, so
  the run saves a checkpoint and exits 0 instead of dying mid-step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self) -> PreemptionGuard:
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self.requested = True

  def should_stop(self) -> bool:
    """True on every process once any process was signalled (a collective in multi-host)."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.array([self.requested], np.int32))
    return bool(np.any(flags))

  def __exit__(self, *exc) -> None:
    signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)


class NonFiniteError(FloatingPointError):
  pass


def check_finite(
  step: int, metrics: Mapping[str, float], keys: tuple[str, ...] = ("loss", "grad_norm")
) -> None:
  bad = {k: metrics[k] for k in keys if k in metrics and not math.isfinite(metrics[k])}
  if bad:
    raise NonFiniteError(f"step {step}: non-finite {bad}; stopping before the state is saved")


class MetricLogger:
  """metrics.jsonl (one object per logged step, with `step`), TensorBoard events and a
  progress bar with loss, tokens/s and ETA. Only process 0 writes."""

  def __init__(self, workdir: str, total_steps: int, start_step: int, enabled: bool = True):
    self.enabled = enabled and jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._writer = None
    self._bar = None
    if self.enabled:
      from tensorboardX import SummaryWriter

      self._writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
      self._bar = tqdm.tqdm(
          total=total_steps, initial=start_step, desc="train", file=sys.stderr, dynamic_ncols=True,
          disable=not sys.stderr.isatty() and os.environ.get("LMM_ALIGN_PROGRESS", "1") == "0",
      )  # fmt: skip
    self._window_start = time.perf_counter()
    self._window_tokens = 0.0

  def add_tokens(self, tokens: float) -> None:
    self._window_tokens += tokens

  def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
    """Logs a step's scalars; adds tokens_per_second over the window since the last write."""
    now = time.perf_counter()
    record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    if self._window_tokens:
      record["tokens_per_second"] = self._window_tokens / max(now - self._window_start, 1e-9)
    self._window_start, self._window_tokens = now, 0.0
    if self.enabled:
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")
      for k, v in record.items():
        if k != "step":
          self._writer.add_scalar(k, v, step)
      self._writer.flush()
    return record

  def progress(self, step: int, postfix: Mapping[str, float]) -> None:
    if self._bar is not None:
      self._bar.n = step
      self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._writer is not None:
      self._writer.close()


def write_json(path: str, payload: Mapping[str, Any]) -> None:
  """Atomic JSON write (rename), so a reader never sees half a file."""
  if jax.process_index() != 0:
    return
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)
