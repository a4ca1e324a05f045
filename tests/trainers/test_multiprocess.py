"""Two local processes with 4 CPU devices each, joined by jax.distributed on 127.0.0.1, train
exactly like one process with 8 devices."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

from configs.shapes import sft as shapes_sft
from lmm_align.trainers import sft

REPO = pathlib.Path(__file__).resolve().parents[2]
OVERRIDES = ["--config.total_steps=6", "--config.log_every=1", "--config.checkpoint_every=3",
             "--config.eval.enabled=True", "--config.mesh.sizes=(2,2,2)"]  # fmt: skip


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _losses(workdir) -> list[float]:
  return [
    json.loads(x)["loss"]
    for x in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  ]


def test_two_processes_equal_one_process(tmp_path):
  config = shapes_sft.get_config("runlocal")
  config.total_steps, config.log_every, config.checkpoint_every = 6, 1, 3
  config.eval.enabled = False
  config.mesh.sizes = (2, 2, 2)
  sft.train(config, str(tmp_path / "single"))

  port = _free_port()
  workdir = tmp_path / "multi"
  procs = []
  for rank in range(2):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "LMM_ALIGN_PROGRESS": "0",
           "LMM_ALIGN_COORDINATOR": f"127.0.0.1:{port}", "LMM_ALIGN_NUM_PROCESSES": "2",
           "LMM_ALIGN_PROCESS_ID": str(rank),
           # Both ranks compile the same programs at once, and the cache writes files in
           # place: one rank could read the other's half-written entry. A cache each.
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / f"xla_cache_{rank}")}  # fmt: skip
    cmd = [
      sys.executable,
      "-m",
      "lmm_align.main",
      "--config=configs/shapes/sft.py:runlocal",
      f"--workdir={workdir}",
      *OVERRIDES,
    ]
    procs.append(
      subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
      )
    )
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-4000:]
  np.testing.assert_allclose(_losses(workdir), _losses(tmp_path / "single"), atol=1e-5, rtol=0)
  assert sorted(int(d.name) for d in (workdir / "checkpoints").iterdir() if d.name.isdigit()) == [
    3,
    6,
  ]
  summary = json.loads((workdir / "summary.json").read_text())
  assert 0.0 <= summary["hallucination_rate"] <= 1.0 and "pope_f1" in summary
