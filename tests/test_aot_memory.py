"""experiments/bench/aot_memory.py: the script runs on a fake 2x2x2 mesh and its by-hand byte
counts agree with real sharded arrays, the compiled arguments and the published 7B size."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np

from lmm_align import sharding
from lmm_align.models.llava import Llava
from lmm_align.trainers import state as state_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "bench" / "aot_memory.py"
CONFIG = "configs/llava_sft_7b.py:runlocal"


def _script():
  spec = importlib.util.spec_from_file_location("aot_memory", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _bytes(output: str, name: str) -> int:
  return int(re.search(rf"^  {re.escape(name)} .* (\d+) bytes$", output, re.M).group(1))


def test_script_prints_a_positive_peak_and_its_arguments_add_up():
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(
    [sys.executable, str(SCRIPT), f"--config={CONFIG}", "--mesh=2,2,2", "--devices=8"],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  last = result.stdout.strip().splitlines()[-1]
  match = re.fullmatch(r"per_device_peak_gib: (\d+\.\d+)", last)
  assert match, last
  assert float(match.group(1)) > 0
  # argument = params + optimizer state + this device's batch rows + step (int32) + rng key.
  rows, seq, image = 8 // 4, 128, 32  # global 8 over data x fsdp = 4; the tiny tower's 32 px
  batch_bytes = 3 * rows * seq * 4 + rows * image * image * 3 * 4
  by_hand = _bytes(result.stdout, "params by hand") + _bytes(
    result.stdout, "optimizer state by hand"
  )
  assert _bytes(result.stdout, "argument") == by_hand + batch_bytes + 4 + 8


def test_param_bytes_per_device_match_real_sharded_arrays():
  aot = _script()
  config = aot.load_config(CONFIG)
  model_config, _ = aot.model_config_for(config)
  model = Llava(model_config)
  mesh = sharding.make_mesh((2, 2, 2))
  rules = tuple(tuple(r) for r in config.mesh.rules)
  with sharding.activation_sharding(mesh, rules):
    abstract, _, _ = aot.abstract_train_state(config, model, mesh)
    params = state_lib.init_params_sharded(
      model, jax.random.key(0), state_lib.param_shardings(model, mesh, rules)
    )
  device0 = mesh.devices.flat[0]
  real = sum(
    next(s for s in x.addressable_shards if s.device == device0).data.nbytes
    for x in jax.tree.leaves(params)
  )
  assert aot.tree_bytes_per_device(abstract.params) == real
  total = sum(x.nbytes for x in jax.tree.leaves(params))
  assert total / 8 < real < total  # sharded, but norms and small axes are replicated


def test_llava_7b_param_count_by_hand():
  aot = _script()
  config = aot.load_config("configs/llava_sft_7b.py")
  config.init_from = ""
  model_config, source = aot.model_config_for(config)
  assert source == "variant llava-1.5-7b"
  mesh = sharding.make_mesh((1, 8, 1))
  with sharding.activation_sharding(mesh, sharding.DEFAULT_RULES):
    state, _, _ = aot.abstract_train_state(config, Llava(model_config), mesh)

  d, f, layers, vocab = 4096, 11008, 32, 32064
  text = 2 * vocab * d + layers * (4 * d * d + 3 * d * f + 2 * d) + d
  dv, fv, lv, patches = 1024, 4096, 24, 576
  vision = (
    14 * 14 * 3 * dv  # patch embedding (no bias)
    + dv  # class embedding
    + (patches + 1) * dv  # position embedding
    + 2 * 2 * dv  # pre and post layer norms
    + lv * (4 * (dv * dv + dv) + dv * fv + fv + fv * dv + dv + 2 * 2 * dv)
  )
  projector = dv * d + d + d * d + d
  assert text + vision + projector == 7_063_427_072  # llava-hf/llava-1.5-7b-hf
  assert aot.num_params(state.params) == 7_063_427_072

  # bf16 params; the fp32 Adam moments cover the projector and the language model only.
  per_device = aot.tree_bytes_per_device(state.params)
  assert 2 * 7_063_427_072 / 8 < per_device < 2 * 7_063_427_072 / 8 * 1.01
  opt = aot.tree_bytes_per_device(state.opt_state)
  trainable = text + projector
  assert np.isclose(opt, 2 * 4 * trainable / 8, rtol=1e-3)
