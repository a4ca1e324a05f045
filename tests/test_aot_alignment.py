"""experiments/bench/aot_alignment.py: one runlocal run on a fake 2x2x2 mesh compiles the DPO and
PPO steps and the rollout forwards, and its byte counts agree with hand-computed ones."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "bench" / "aot_alignment.py"
FUNCTIONS = (
  "dpo_train_step",
  "dpo_reference_logps",
  "ppo_train_step",
  "ppo_reward_scores",
  "ppo_policy_logps",
)
ROWS = 2  # PPO update rows per device


@pytest.fixture(scope="module")
def output() -> str:
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(
    [sys.executable, str(SCRIPT), "--runlocal", "--mesh=2,2,2", f"--ppo_rows_per_device={ROWS}"],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=180,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def _section(output: str, name: str) -> str:
  return output.split(f"== {name}\n", 1)[1].split("\n== ", 1)[0]


def _bytes(section: str, label: str) -> int:
  return int(re.search(rf"^  {re.escape(label)} .* (\d+) bytes$", section, re.M).group(1))


def test_every_function_has_a_positive_peak_and_the_summary_ends_the_output(output):
  lines = output.strip().splitlines()
  assert lines[-6] == "per-device peak vs TPU v4 (32 GiB HBM per chip):"
  for name, line in zip(FUNCTIONS, lines[-5:]):
    assert re.fullmatch(rf"  {name} +\d+\.\d+ GiB +\d+\.\d% +fits", line), line
    section = _section(output, name)
    peak = float(re.search(rf"^peak_gib {name}: (\d+\.\d+)$", section, re.M).group(1))
    assert peak > 0
    by_parts = sum(_bytes(section, k) for k in ("argument", "output", "temp")) - _bytes(
      section, "alias"
    )
    assert _bytes(section, "peak = argument + output - alias + temp") == by_parts


def test_dpo_step_arguments_are_the_state_and_the_pair_batch(output):
  section = _section(output, "dpo_train_step")
  # One pair per device (4 data-parallel devices), 2 x 128 tokens, the tiny tower's 32 px image.
  pairs, seq, image = 1, 128, 32
  batch = 3 * pairs * 2 * seq * 4 + pairs * 2 * image * image * 3 * 4 + pairs * 2 * 4
  assert _bytes(section, "batch by hand") == batch
  assert _bytes(section, "frozen reference by hand") == 0  # reference log-probs precomputed
  assert _bytes(section, "argument") == _bytes(section, "train state by hand") + batch
  # The state is donated: its buffers come back as the output's aliases.
  assert _bytes(section, "alias") == _bytes(section, "train state by hand")


def test_ppo_step_trains_only_the_adapters_and_the_value_head(output):
  # LoRA r=8 on the tiny decoder's 7 projections (D 64, 4 heads x 16, 2 kv heads, mlp 128),
  # 2 layers, once on the policy and once on the value backbone; the head is D weights + a bias.
  d, q, kv, mlp, r = 64, 64, 32, 128, 8
  per_layer = r * ((d + q) + 2 * (d + kv) + (q + d) + 2 * (d + mlp) + (mlp + d))
  assert f"[ppo] trained {2 * 2 * per_layer + d + 1:,};" in output

  section = _section(output, "ppo_train_step")
  query, new, image = 64, 12, 32  # configs/shapes_ppo.py:runlocal, copied by llava_rlhf_ppo
  batch = 2 * ROWS * (query + new) * 4 + ROWS * image * image * 3 * 4 + 5 * ROWS * new * 4
  assert _bytes(section, "batch by hand") == batch
  # jit drops inputs the step never reads: the value backbone's lm_head [64, 512] float32 (its
  # head reads hidden states; this device's quarter: embed over fsdp, vocab over tensor) and
  # both CLIP towers' unused post-layernorm (scale and bias [32] float32, replicated).
  unused = 64 * 512 * 4 // 4 + 2 * 2 * 32 * 4
  inputs = sum(_bytes(section, k) for k in ("train state by hand", "frozen bases by hand"))
  assert _bytes(section, "argument") == inputs + batch - unused
