"""What the CPU benchmarks against transformers share: the environment (set before JAX and
transformers are imported: one fake JAX device per core, offline hub) and the timing rules
(median of timed runs after a warm-up; transformers at its best thread count).

  import timing  # first, from a script in experiments/bench (its folder is on sys.path)
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={os.cpu_count()}"
  ).strip()
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def median_seconds(fn: Callable[[], object], runs: int) -> float:
  """The median wall time of `runs` calls of fn, after one untimed warm-up call (where our side
  compiles)."""
  fn()
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def torch_best_threads(fn: Callable[[], object], runs: int) -> tuple[int, dict[int, float]]:
  """(the faster thread count, {threads: median seconds}) of fn under torch's default intra-op
  thread count and under one thread. On a small shared CPU the default's spin-waiting threads
  can be far slower than one thread, so the baseline is the faster of the two."""
  import torch

  default_threads = torch.get_num_threads()
  by_threads = {}
  try:
    for threads in sorted({default_threads, 1}):
      torch.set_num_threads(threads)
      by_threads[threads] = median_seconds(fn, runs)
  finally:
    torch.set_num_threads(default_threads)
  return min(by_threads, key=by_threads.get), by_threads
