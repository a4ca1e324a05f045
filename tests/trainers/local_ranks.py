"""Local multi-process runs for tests: ranks with 4 CPU devices each, joined by
jax.distributed on 127.0.0.1 (`sharding.initialize_distributed` reads the LMM_ALIGN_* vars)."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
from collections.abc import Callable

REPO = pathlib.Path(__file__).resolve().parents[2]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(
  command: Callable[[int], list[str]],
  tmp_path: pathlib.Path,
  num_processes: int = 2,
  extra_env: Callable[[int], dict[str, str]] = lambda rank: {},
) -> list[subprocess.Popen]:
  """Starts `command(rank)` for each rank in the repo root, output captured."""
  port = free_port()
  procs = []
  for rank in range(num_processes):
    env = {
      **os.environ,
      "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
      "JAX_PLATFORMS": "cpu",
      "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests' / 'trainers'}",
      "LMM_ALIGN_COORDINATOR": f"127.0.0.1:{port}",
      "LMM_ALIGN_NUM_PROCESSES": str(num_processes),
      "LMM_ALIGN_PROCESS_ID": str(rank),
      # Both ranks compile the same programs at once, and the cache writes files in place:
      # one rank could read the other's half-written entry. A cache each.
      "JAX_COMPILATION_CACHE_DIR": str(tmp_path / f"xla_cache_{rank}"),
      **extra_env(rank),
    }
    procs.append(
      subprocess.Popen(
        command(rank),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
      )  # fmt: skip
    )
  return procs


def finish(procs: list[subprocess.Popen], timeout: float) -> list[str]:
  """Each rank's output once all have exited with status 0."""
  outputs = [p.communicate(timeout=timeout)[0] for p in procs]
  for p, out in zip(procs, outputs, strict=True):
    assert p.returncode == 0, out[-6000:]
  return outputs


def kill(procs: list[subprocess.Popen]) -> None:
  """Kills the ranks still running (one left waiting for a failed peer, or for a test that
  failed before `finish`)."""
  for p in procs:
    if p.poll() is None:
      p.kill()
