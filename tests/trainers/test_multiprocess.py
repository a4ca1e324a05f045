"""Two local processes with 4 CPU devices each, joined by jax.distributed on 127.0.0.1, train
exactly like one process with 8 devices."""

from __future__ import annotations

import json
import pathlib
import sys

import local_ranks
import numpy as np

from configs.shapes import sft as shapes_sft
from lmm_align.trainers import sft

OVERRIDES = ["--config.total_steps=6", "--config.log_every=1", "--config.checkpoint_every=3",
             "--config.eval.enabled=True", "--config.mesh.sizes=(2,2,2)"]  # fmt: skip


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

  workdir = tmp_path / "multi"
  command = [sys.executable, "-m", "lmm_align.main", "--config=configs/shapes/sft.py:runlocal",
             f"--workdir={workdir}", *OVERRIDES]  # fmt: skip
  procs = local_ranks.start(
    lambda rank: command, tmp_path, extra_env=lambda rank: {"LMM_ALIGN_PROGRESS": "0"}
  )
  try:
    local_ranks.finish(procs, timeout=600)
  finally:
    local_ranks.kill(procs)
  np.testing.assert_allclose(_losses(workdir), _losses(tmp_path / "single"), atol=1e-5, rtol=0)
  assert sorted(int(d.name) for d in (workdir / "checkpoints").iterdir() if d.name.isdigit()) == [
    3,
    6,
  ]
  summary = json.loads((workdir / "summary.json").read_text())
  assert 0.0 <= summary["hallucination_rate"] <= 1.0 and "pope_f1" in summary
