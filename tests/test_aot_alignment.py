"""experiments/bench/aot_alignment.py: the PPO update and rollout forwards planned through
lmm_align/aot.py on a fake 2x2x2 mesh, with byte counts that agree with hand-computed ones."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "bench" / "aot_alignment.py"
FUNCTIONS = ("ppo_train_step", "ppo_reward_scores", "ppo_policy_logps")
ROWS = 2  # PPO update rows per device


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> tuple[str, dict]:
  save = tmp_path_factory.mktemp("plan") / "plan.json"
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  argv = ["--runlocal", "--topology=cpu-8", "--mesh=2,2,2", f"--ppo_rows_per_device={ROWS}"]
  result = subprocess.run(
    [sys.executable, str(SCRIPT), *argv, "--cost=none", f"--save={save}"],
    cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout, json.loads(save.read_text())


def test_every_function_has_a_positive_peak_and_the_plan_line_ends_the_output(planned):
  output, table = planned
  assert [p["name"] for p in table["programs"]] == list(FUNCTIONS)
  for row in table["programs"]:
    assert row["peak"] == row["argument"] + row["output"] - row["alias"] + row["temp"] > 0
    assert f"== {row['name']}" in output
  assert re.fullmatch(r"plan: fits peak_gib=\d+\.\d+ hbm_gib=\d+\.\d+ device=cpu", output.strip().splitlines()[-1])  # fmt: skip


def test_ppo_step_arguments_are_the_state_the_frozen_bases_and_the_rollout_batch(planned):
  _, table = planned
  row = next(p for p in table["programs"] if p["name"] == "ppo_train_step")
  query, new, image = 64, 12, 32  # configs/shapes ppo runlocal, copied by llava_rlhf_ppo
  batch = 2 * ROWS * (query + new) * 4 + ROWS * image * image * 3 * 4 + 5 * ROWS * new * 4
  # jit drops inputs the step never reads: the value backbone's lm_head [64, 512] float32 (its
  # head reads hidden states; this chip's quarter: embed over fsdp, vocab over tensor) and
  # both CLIP towers' unused post-layernorm (scale and bias [32] float32, replicated).
  unused = 64 * 512 * 4 // 4 + 2 * 2 * 32 * 4
  state, frozen = row["by_hand"]["train state"], row["by_hand"]["frozen bases"]
  assert row["argument"] == state + frozen + batch - unused
  assert row["alias"] == state  # the state (adapters, head, optimizer) is donated


def test_the_forwards_read_one_row_per_chip(planned):
  _, table = planned
  scores = next(p for p in table["programs"] if p["name"] == "ppo_reward_scores")
  assert scores["output"] == 4  # one float32 score per row, one row per chip
  logps = next(p for p in table["programs"] if p["name"] == "ppo_policy_logps")
  assert logps["output"] == 12 * 4  # [1, N] float32 log-probs
