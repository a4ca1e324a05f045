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


def write_config(config, workdir: str) -> None:
  """workdir/config.json: what the run was, for reading, export and reproduction."""
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


def write_json(path: str, payload: Mapping[str, Any]) -> None:
  """Atomic JSON write (rename), so a reader never sees half a file."""
  if jax.process_index() != 0:
    return
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def run_loop(
  config, workdir, mesh, state, train_step, data, checkpointer, evaluate, name: str
) -> dict[str, Any]:
  """Steps from state.step to config.total_steps: logging, periodic and final checkpoints,
  preemption; then `evaluate(state) -> dict`, merged into workdir/summary.json.

  The step's metrics may hold `loss_sum` with `tokens` (token-weighted mean loss) or a batch
  `loss`; every other scalar is averaged over the logging window.
  """
  from lmm_align import sharding

  start_step = int(state.step)
  logger = MetricLogger(workdir, config.total_steps, start_step)
  batches = data.iterate(start_step, config.batch_size, jax.process_index(), jax.process_count())
  window = _Window()
  pending = None  # the previous step's metrics, fetched after the next step is dispatched
  step = saved_step = start_step
  fingerprint = data.fingerprint()
  try:
    with PreemptionGuard() as guard:
      while step < config.total_steps:
        batch = sharding.global_batch_from_local(next(batches), mesh)
        state, metrics = train_step(state, batch)
        step += 1
        if pending is not None:
          window.consume(*pending, logger, config)
        pending = (step, metrics)
        if step % config.checkpoint_every == 0 or step == config.total_steps:
          window.consume(*pending, logger, config)
          pending = None
          checkpointer.save(step, state, {"step": step, **fingerprint})
          saved_step = step
        if guard.should_stop():
          if pending is not None:
            window.consume(*pending, logger, config)
          if saved_step != step:  # the periodic save may have just started on this step
            checkpointer.save(step, state, {"step": step, **fingerprint}, force=True)
          checkpointer.close()
          print(f"[{name}] preempted: saved step {step}, exiting")
          raise SystemExit(0)
      if pending is not None:
        window.consume(*pending, logger, config)
  finally:
    logger.close()
    batches.close()
  checkpointer.wait()
  summary = {"final_step": step, "final_train_loss": window.last_loss}
  # What the data kept and, with data.on_error=skip, how many records it skipped and why.
  summary["data"] = {k: int(v) for k, v in getattr(data, "stats", {}).items()}
  summary.update(evaluate(state))
  write_json(os.path.join(workdir, "summary.json"), summary)
  checkpointer.close()
  return summary


class _Window:
  """Sums of the step metrics since the last log line."""

  def __init__(self):
    self.sums: dict[str, float] = {}
    self.steps = 0
    self.last_loss = float("nan")

  def consume(self, step: int, metrics: Mapping[str, Any], logger: MetricLogger, config) -> None:
    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if "loss_sum" in host:
      loss = host["loss_sum"] / max(host["tokens"], 1.0)
    else:
      loss = host["loss"]
    check_finite(step, {"loss": loss, "grad_norm": host.get("grad_norm", 0.0)})
    logger.add_tokens(host.get("input_tokens", 0.0))
    self.last_loss = loss
    for k, v in host.items():
      self.sums[k] = self.sums.get(k, 0.0) + v
    self.steps += 1
    if step % config.log_every == 0 or step == config.total_steps:
      if "loss_sum" in self.sums:
        means = {"loss": self.sums["loss_sum"] / max(self.sums["tokens"], 1.0)}
      else:
        means = {}
      skip = {"loss_sum", "tokens", "input_tokens"}
      means.update(
        {k: v / self.steps for k, v in self.sums.items() if k not in skip and k not in means}
      )
      record = logger.write(step, means)
      logger.progress(step, {"loss": means["loss"], "tok/s": record.get("tokens_per_second", 0.0)})
      self.sums, self.steps = {}, 0
