"""Per-chip memory of the PPO step and its rollout forwards at 7B / 13B, compiled ahead of time.

  python experiments/bench/aot_alignment.py --topology=v5p-64 [--mesh=1,-1,1] \
      [--ppo_rows_per_device=8] [--ppo_forward_rows_per_device=1] [--save=FILE]
  python experiments/bench/aot_alignment.py --runlocal --topology=cpu-8 --mesh=2,2,2  # seconds

A caller of lmm_align/aot.py (`lmm-align plan`): the same compile-only TPU devices or fake CPU
devices, abstract state and batches, per-chip table and last line. `lmm-align plan` compiles
the SFT, DPO (with its reference log-prob pass) and reward-model programs from their configs;
PPO is not planned there yet (its reward model is an HF folder the plan cannot size), so this
script registers the PPO programs with aot.py itself, its reward model sized as below:
  ppo_train_step     `trainers.ppo.ppo_train_step` as ppo.train jits it: policy = LoRA r=64 over
                     a frozen llava-1.5-7b, value = LoRA r=64 over the frozen llava-1.5-13b
                     reward-model backbone plus a scalar head (configs/llava_rlhf/ppo.py), rows
                     of Q + N = 128 + 896 tokens.
  ppo_reward_scores  the 13B reward model's scoring forward (`reward_scores`) on rows of the
                     largest reward bucket (2048), as the rollouts run it.
  ppo_policy_logps   the policy's `ppo.response_logps` (LoRA over the 7B base), as the rollouts
                     run it for the old log-probs.
The sampler (prefill and decode with a KV cache) is not compiled here. With --runlocal the
models are the config's tiny ones (configs/llava_rlhf/ppo.py:runlocal, the reward model tiny too).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from lmm_align import aot, config_files, sharding
from lmm_align.models.config import ModelConfig, get_variant
from lmm_align.models.heads import ScalarHead
from lmm_align.models.llava import Llava
from lmm_align.trainers import ppo
from lmm_align.trainers import state as state_lib

REPO = pathlib.Path(__file__).resolve().parents[2]
# The config files import `configs.*`, a package at the repository's root.
sys.path.insert(0, str(REPO))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--topology", default="v5p-64", help="accelerator type or cpu-N")
  p.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor sizes (one may be -1)")
  p.add_argument("--runlocal", action="store_true", help="tiny models (tests)")
  p.add_argument("--remat", default="full", help="remat policy of every model")
  p.add_argument("--ppo_rows_per_device", type=int, default=8, help="update minibatch rows")
  p.add_argument("--ppo_forward_rows_per_device", type=int, default=1, help="rollout forwards")
  p.add_argument("--hbm_gib", type=float, default=0.0, help="HBM per chip override")
  p.add_argument("--cost", default="unrolled", choices=("unrolled", "scanned", "none"))
  p.add_argument("--save", default="", help="write the table as JSON here")
  return p.parse_args(argv)


def reward_model_config(policy: ModelConfig, runlocal: bool) -> ModelConfig:
  """The reward model as ppo.train loads it: the policy's runtime without LoRA."""
  variant = get_variant("tiny" if runlocal else "llava-1.5-13b")
  return variant.replace(runtime=dataclasses.replace(policy.runtime, lora=None))


def ppo_programs(config, policy_config: ModelConfig, mesh: Mesh, rules, args) -> list:
  """The PPO update and the rollout forwards as aot.Programs (see the module docstring)."""
  rm_config = reward_model_config(policy_config, args.runlocal)
  lora = policy_config.runtime.lora
  policy_model = Llava(policy_config)
  value_model = Llava(rm_config.with_runtime(lora=lora))
  value_head = ScalarHead(zero_init=config.ppo.value_head_zero_init)
  dp = sharding.data_parallel_size(mesh)
  step_rows, forward_rows = args.ppo_rows_per_device * dp, args.ppo_forward_rows_per_device * dp
  q, n = config.ppo.query_len, config.ppo.max_new_tokens
  reward_len = max(config.ppo.reward_buckets)

  # The state ppo.build_state makes: the policy's and the value backbone's adapters, the head.
  policy = aot.abstract_variables(policy_model, mesh, rules)
  value = aot.abstract_variables(value_model, mesh, rules)
  head, head_shards = aot.abstract_head(value_head, rm_config.text.hidden_size, mesh, rules)
  params = {"policy": policy["lora"][0], "value": {"backbone": value["lora"][0], "head": head}}
  shards = {
    "policy": policy["lora"][1],
    "value": {"backbone": value["lora"][1], "head": head_shards},
  }
  state, state_shards, tx = aot.abstract_train_state(config, params, shards, mesh)
  frozen = {"policy_base": policy["params"][0], "value_base": value["params"][0]}
  frozen_shards = {"policy_base": policy["params"][1], "value_base": value["params"][1]}
  step_fn = jax.tree_util.Partial(
    ppo.ppo_train_step, policy_model=policy_model, value_model=value_model,
    value_head=value_head, tx=tx, trainable=tuple(config.trainable), ppo=config.ppo,
    state_dtype=config.optim.state_dtype,
  )  # fmt: skip
  jitted = state_lib.jit_train_step(
    lambda s, b, f: step_fn(s, b, f), state_shards, mesh, frozen_shards
  )
  batch = aot.sequence_batch(policy_config, mesh, (step_rows,), q + n)
  del batch["labels"]
  batch["response_mask"] = aot.rows(mesh, (step_rows, n), jnp.int32)
  for key in ("old_logps", "old_values", "advantages", "returns"):
    batch[key] = aot.rows(mesh, (step_rows, n), jnp.float32)
  trained = aot.pass_factors({"language_model"}, lora=True)
  flops = aot.model_flops(policy_config, step_rows, q + n, trained) + aot.model_flops(
    rm_config, step_rows, q + n, trained, lm_head=False
  )
  by_hand = {"train state": state, "frozen bases": frozen}
  programs = [aot.Program("ppo_train_step", jitted, (state, batch, frozen), flops, by_hand)]

  # The reward model's backbone is the value model's frozen base (ppo.build_state).
  rm_model, rm_head = Llava(rm_config), ScalarHead()
  rm_head_params, _ = aot.abstract_head(rm_head, rm_config.text.hidden_size, mesh, rules)
  scores = jax.jit(lambda p, h, b: ppo.reward_scores(rm_model, rm_head, p, h, b))
  batch = aot.sequence_batch(rm_config, mesh, (forward_rows,), reward_len)
  del batch["labels"]
  forward = aot.pass_factors(set(), lora=False)
  flops = aot.model_flops(rm_config, forward_rows, reward_len, forward, lm_head=False)
  args_ = (frozen["value_base"], rm_head_params, batch)
  programs.append(
    aot.Program("ppo_reward_scores", scores, args_, flops, {"reward model": args_[:2]})
  )

  variables = {"params": frozen["policy_base"], "lora": state.params["policy"]}
  logps = jax.jit(lambda v, b: ppo.response_logps(ppo.plain_or(policy_model, v), v, b))
  batch = aot.sequence_batch(policy_config, mesh, (forward_rows,), q + n)
  del batch["labels"]
  batch["response_mask"] = aot.rows(mesh, (forward_rows, n), jnp.int32)
  flops = aot.model_flops(policy_config, forward_rows, q + n, forward)
  programs.append(
    aot.Program("ppo_policy_logps", logps, (variables, batch), flops, {"policy": variables})
  )
  return programs


def main(argv: list[str] | None = None) -> int:
  """Plans the PPO programs; returns the exit status of `lmm-align plan` (0 fits, 3 not)."""
  args = parse_args(argv)
  spec = "configs/llava_rlhf/ppo.py" + (":runlocal" if args.runlocal else "")
  config = config_files.load_config(spec, str(REPO))
  if not args.runlocal:
    config.model.variant = "llava-1.5-7b"
    config.model.remat_policy = args.remat
  acc = aot.resolve_accelerator(args.topology)
  aot.prepare_platforms(acc)
  aot.PROGRAMS["ppo"] = lambda c, m, mesh, rules: ppo_programs(c, m, mesh, rules, args)
  fits, table, lines = aot.plan(config, acc, aot.parse_mesh(args.mesh), args.hbm_gib, args.cost)
  print("\n".join(lines), flush=True)
  if args.save:
    aot.save_table(table, args.save)
  return 0 if fits else aot.EXIT_DOES_NOT_FIT


if __name__ == "__main__":
  sys.exit(main())
