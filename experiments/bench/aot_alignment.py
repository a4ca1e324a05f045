"""Per-device memory of the DPO and PPO steps at 7B / 13B, compiled ahead of time on fake devices.

  python experiments/bench/aot_alignment.py --devices=32 [--mesh=1,-1,1] [--which=dpo,ppo]
      [--dpo_pairs_per_device=1] [--dpo_seq=2048] [--dpo_reference=precomputed]
      [--ppo_rows_per_device=8] [--ppo_forward_rows_per_device=1] [--chip=v4]
  python experiments/bench/aot_alignment.py --runlocal --mesh=2,2,2   # tiny models, seconds

The companion of aot_memory.py (the SFT step), whose helpers this script imports rather than
repeats: the same fake CPU devices (XLA_FLAGS set before JAX is imported), abstract params from
`jax.eval_shape` with shardings from the config's logical rules, the optimizer state's from
`opt_state_shardings`, `ShapeDtypeStruct` batches, and the same peak estimate per device:
argument + output - alias + temp of `compiled.memory_analysis()`.

What is compiled, each exactly as its trainer jits it:
  dpo_train_step       `trainers.dpo.dpo_train_step` by `state.jit_train_step` (state donated).
                       configs/shapes_dpo.py's dpo block with 7B overrides: llava-1.5-7b, bf16
                       params and compute, remat full, pure FSDP, projector + LLM trained (the
                       CLIP tower frozen), pairs [B, 2, 2048] (RLAIF-V: max_len 2048, one pair
                       per device), reference log-probs precomputed (`ref_logps` in the batch)
                       or, with --dpo_reference=frozen_copy, a frozen copy of the 7B as an input.
  dpo_reference_logps  the forward that precomputes the reference log-probs (`pair_logps`).
  ppo_train_step       `trainers.ppo.ppo_train_step` as ppo.train jits it: policy = LoRA r=64 over
                       a frozen llava-1.5-7b, value = LoRA r=64 over the frozen llava-1.5-13b
                       reward-model backbone plus a scalar head (configs/llava_rlhf_ppo.py), rows
                       of Q + N = 128 + 896 tokens.
  ppo_reward_scores    the 13B reward model's scoring forward (`ppo.reward_scores`) on rows of
                       the largest reward bucket (2048), as Rollouts._score runs it.
  ppo_policy_logps     the policy's `ppo.response_logps` (LoRA over the 7B base), as
                       Rollouts.collect runs it for the old log-probs.
The sampler (KV cache) is not compiled here.

The last lines compare every function's peak with one chip's HBM (--chip). Caveats are
aot_memory.py's: XLA:CPU's buffer assignment, not the TPU compiler's; an estimate with a margin.
With --runlocal the models are the configs' tiny ones (shapes_dpo.py:runlocal and
llava_rlhf_ppo.py:runlocal, the reward model tiny too), for tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
import time
from typing import Any

# aot_memory.py's helpers are imported, not repeated; experiments/ is not a package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
GIB = 1024**3
# HBM per chip, GiB (Cloud TPU system architecture pages).
CHIPS_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
FUNCTIONS = {
  "dpo": ("dpo_train_step", "dpo_reference_logps"),
  "ppo": ("ppo_train_step", "ppo_reward_scores", "ppo_policy_logps"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--which", default="dpo,ppo", help="comma list of dpo, ppo")
  p.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor sizes (one may be -1)")
  p.add_argument("--devices", type=int, default=0, help="fake devices (default: the mesh's)")
  p.add_argument("--runlocal", action="store_true", help="tiny models (tests)")
  p.add_argument("--remat", default="full", help="remat policy of every model")
  p.add_argument("--dpo_pairs_per_device", type=int, default=1)
  p.add_argument("--dpo_seq", type=int, default=0, help="tokens per answer (default 2048)")
  p.add_argument("--dpo_reference", default="precomputed", choices=("precomputed", "frozen_copy"))
  p.add_argument("--ppo_rows_per_device", type=int, default=8, help="update minibatch rows")
  p.add_argument("--ppo_forward_rows_per_device", type=int, default=1, help="rollout forwards")
  p.add_argument("--chip", default="v4", choices=sorted(CHIPS_GIB))
  p.add_argument("--max_rss_gib", type=float, default=12.0, help="abort above this host RSS")
  args = p.parse_args(argv)
  args.mesh = tuple(int(s) for s in args.mesh.split(","))
  args.which = tuple(filter(None, args.which.split(",")))
  unknown = set(args.which) - set(FUNCTIONS)
  if unknown:
    raise SystemExit(f"--which: unknown {sorted(unknown)}; use {sorted(FUNCTIONS)}")
  if not args.devices:
    if -1 in args.mesh:
      raise SystemExit("--mesh has a -1: give --devices")
    args.devices = 1
    for s in args.mesh:
      args.devices *= s
  return args


if __name__ == "__main__":
  _ARGS = parse_args()
  _flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
  _flags.append(f"--xla_force_host_platform_device_count={_ARGS.devices}")
  os.environ["XLA_FLAGS"] = " ".join(_flags)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import aot_memory as aot  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from lmm_align import optim, sharding  # noqa: E402
from lmm_align.models.config import ModelConfig, get_variant  # noqa: E402
from lmm_align.models.heads import ScalarHead  # noqa: E402
from lmm_align.models.llava import Llava, dummy_inputs  # noqa: E402
from lmm_align.trainers import dpo, ppo  # noqa: E402
from lmm_align.trainers import state as state_lib  # noqa: E402

# --------------------------------------------------------------------------------------------
# Configs: the trainers' config files with the 7B / 13B overrides.
# --------------------------------------------------------------------------------------------


def dpo_config(runlocal: bool, remat: str) -> ml_collections.ConfigDict:
  """configs/shapes_dpo.py's DPO block; unless runlocal, a 7B full fine-tune around it."""
  config = aot.load_config(
    "configs/shapes_dpo.py:runlocal" if runlocal else "configs/shapes_dpo.py"
  )
  config.mesh.sizes = (1, -1, 1)
  if runlocal:
    return config
  config.model.variant = "llava-1.5-7b"
  config.model.dtype = "bfloat16"
  config.model.param_dtype = "bfloat16"
  config.model.remat_policy = remat
  config.model.image_size = 0  # the variant's 336 px, not the shapes world's
  # RLAIF-V trains the LLM and the projector; the CLIP tower stays frozen as in LLaVA-1.5.
  config.trainable = ("multi_modal_projector/.*", "language_model/.*")
  config.data.max_length = 2048
  return config


def ppo_config(runlocal: bool, remat: str) -> ml_collections.ConfigDict:
  """configs/llava_rlhf_ppo.py (LoRA r=64, bf16, Q=128, N=896); the policy is llava-1.5-7b."""
  config = aot.load_config(
    "configs/llava_rlhf_ppo.py:runlocal" if runlocal else "configs/llava_rlhf_ppo.py"
  )
  if not runlocal:
    config.model.variant = "llava-1.5-7b"
    config.model.remat_policy = remat
  return config


def reward_model_config(policy: ModelConfig, runlocal: bool) -> ModelConfig:
  """The reward model as ppo.train loads it: the policy's runtime without LoRA."""
  variant = get_variant("tiny" if runlocal else "llava-1.5-13b")
  return variant.replace(runtime=dataclasses.replace(policy.runtime, lora=None))


# --------------------------------------------------------------------------------------------
# Abstract inputs.
# --------------------------------------------------------------------------------------------


def abstract_params(model: Llava, mesh: Mesh, rules, collection: str = "params") -> Any:
  """One variable collection as ShapeDtypeStructs carrying their shardings."""
  shards = state_lib.param_shardings(model, mesh, rules, collection)
  shapes = jax.eval_shape(
    lambda key: nn.unbox(model.init(key, *dummy_inputs(model.config))[collection]),
    jax.random.key(0),
  )
  return aot.with_sharding(shapes, shards)


def abstract_head(head: ScalarHead, hidden: int, mesh: Mesh, rules) -> Any:
  boxed = jax.eval_shape(head.init, jax.random.key(0), jnp.zeros((1, 1, hidden)))["params"]
  shapes = jax.tree.map(lambda x: x.value, boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  return aot.with_sharding(shapes, sharding.logical_shardings(boxed, mesh, rules))


def rows(mesh: Mesh, shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
  """A batch field: leading axis over (data, fsdp)."""
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))


def pair_batch(model_config: ModelConfig, mesh: Mesh, pairs: int, seq: int, ref: bool) -> dict:
  """aot_memory's batch with a (chosen, rejected) axis: [B, 2, T], pixels [B, 2, 1, H, W, 3]."""
  flat = aot.abstract_batch(model_config, mesh, pairs, seq)
  out = {k: rows(mesh, (pairs, 2, *x.shape[1:]), x.dtype) for k, x in flat.items()}
  if ref:
    out["ref_logps"] = rows(mesh, (pairs, 2), jnp.float32)
  return out


def rollout_batch(model_config: ModelConfig, mesh: Mesh, batch: int, query: int, new: int) -> dict:
  """The PPO minibatch: [B, Q + N] ids / mask, [B, N] response fields, [B, 1, H, W, 3] pixels."""
  out = aot.abstract_batch(model_config, mesh, batch, query + new)
  del out["labels"]
  out["response_mask"] = rows(mesh, (batch, new), jnp.int32)
  for key in ("old_logps", "old_values", "advantages", "returns"):
    out[key] = rows(mesh, (batch, new), jnp.float32)
  return out


@dataclasses.dataclass(frozen=True)
class PPOParamsInit:
  """Stands in for a model in `aot_memory.abstract_train_state`: `init` builds the PPO state's
  params {"policy": adapters, "value": {"backbone": adapters, "head": head}}, as ppo.build_state
  lays them out, so the optimizer state and shardings come from the SFT path unchanged."""

  policy_model: Llava
  value_model: Llava
  value_head: ScalarHead

  @property
  def config(self) -> ModelConfig:
    return self.policy_model.config

  def init(self, key: jax.Array, *unused_inputs) -> dict:
    hidden = self.value_model.config.text.hidden_size
    lora = lambda m: m.init(key, *dummy_inputs(m.config))["lora"]
    head = self.value_head.init(key, jnp.zeros((1, 1, hidden)))["params"]
    value = {"backbone": lora(self.value_model), "head": head}
    return {"params": {"policy": lora(self.policy_model), "value": value}}


# --------------------------------------------------------------------------------------------
# Compile and report.
# --------------------------------------------------------------------------------------------


def peak_bytes(stats) -> int:
  """argument + output - alias + temp (aot_memory.py explains why not peak_memory_in_bytes)."""
  return (
    stats.argument_size_in_bytes
    + stats.output_size_in_bytes
    - stats.alias_size_in_bytes
    + stats.temp_size_in_bytes
  )


def compile_and_report(name: str, jitted, args: tuple, by_hand: dict[str, Any]) -> int:
  """Lowers and compiles `jitted(*args)`; prints its memory per device; returns the peak bytes.

  by_hand: {label: abstract tree}, each printed as its bytes per device (they add up to the
  compiled `argument` when the labels cover every input)."""
  print(f"== {name}", flush=True)
  t0 = time.perf_counter()
  lowered = jitted.lower(*args)
  t1 = time.perf_counter()
  stats = lowered.compile().memory_analysis()
  print(f"lower {t1 - t0:.1f} s, compile {time.perf_counter() - t1:.1f} s")
  measured = {
    "argument": stats.argument_size_in_bytes,
    "output": stats.output_size_in_bytes,
    "alias": stats.alias_size_in_bytes,
    "temp": stats.temp_size_in_bytes,
    "generated code": stats.generated_code_size_in_bytes,
  }
  measured.update({f"{k} by hand": aot.tree_bytes_per_device(v) for k, v in by_hand.items()})
  peak = peak_bytes(stats)
  measured["peak = argument + output - alias + temp"] = peak
  for label, value in measured.items():
    print(f"  {label:42s} {value / GIB:9.3f} GiB {value:16d} bytes")
  print(f"peak_gib {name}: {aot.format_gib(peak)}", flush=True)
  return peak


def run_dpo(args: argparse.Namespace, mesh: Mesh) -> dict[str, int]:
  config = dpo_config(args.runlocal, args.remat)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  model_config, source = aot.model_config_for(config)
  model = Llava(model_config)
  pairs = args.dpo_pairs_per_device * sharding.data_parallel_size(mesh)
  seq = args.dpo_seq or config.data.max_length
  precomputed = args.dpo_reference == "precomputed"
  r = model_config.runtime
  print(
    f"[dpo] model {source}: dtype {r.dtype}, params {r.param_dtype}, remat {r.remat_policy}; "
    f"trainable {tuple(config.trainable)}; {pairs} pairs x 2 x {seq} tokens "
    f"({args.dpo_pairs_per_device} per device); loss {config.dpo.loss}, beta {config.dpo.beta}; "
    f"reference {args.dpo_reference}"
  )
  peaks = {}
  with sharding.activation_sharding(mesh, rules):
    state, shards, tx = aot.abstract_train_state(config, model, mesh)
    trainable, _ = optim.split_trainable(state.params, tuple(config.trainable))
    print(f"[dpo] params {aot.num_params(state.params):,} ({aot.num_params(trainable):,} trained)")
    frozen = {"base": None, "reference": None if precomputed else state.params}
    frozen_shards = {"base": None, "reference": None if precomputed else shards.params}
    step_fn = jax.tree_util.Partial(
      dpo.dpo_train_step, model=model, reference_model=model, tx=tx,
      trainable=tuple(config.trainable), dpo=config.dpo, state_dtype=config.optim.state_dtype,
    )  # fmt: skip
    jitted = state_lib.jit_train_step(lambda s, b, f: step_fn(s, b, f), shards, mesh, frozen_shards)
    batch = pair_batch(model_config, mesh, pairs, seq, ref=precomputed)
    peaks["dpo_train_step"] = compile_and_report(
      "dpo_train_step", jitted, (state, batch, frozen),
      {"train state": state, "frozen reference": frozen, "batch": batch},
    )  # fmt: skip

    forward = jax.jit(lambda v, b: dpo.pair_logps(model, v, b, config.dpo.average_logps))
    batch = pair_batch(model_config, mesh, pairs, seq, ref=False)
    variables = {"params": state.params}
    peaks["dpo_reference_logps"] = compile_and_report(
      "dpo_reference_logps", forward, (variables, batch), {"params": variables, "batch": batch}
    )
  return peaks


def run_ppo(args: argparse.Namespace, mesh: Mesh) -> dict[str, int]:
  config = ppo_config(args.runlocal, args.remat)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  policy_config, source = aot.model_config_for(config)
  rm_config = reward_model_config(policy_config, args.runlocal)
  policy_model = Llava(policy_config)
  value_model = Llava(rm_config.with_runtime(lora=policy_config.runtime.lora))
  value_head = ScalarHead(zero_init=config.ppo.value_head_zero_init)
  dp = sharding.data_parallel_size(mesh)
  step_rows = args.ppo_rows_per_device * dp
  forward_rows = args.ppo_forward_rows_per_device * dp
  q, n = config.ppo.query_len, config.ppo.max_new_tokens
  reward_len = max(config.ppo.reward_buckets)
  r, lora = policy_config.runtime, policy_config.runtime.lora
  print(
    f"[ppo] policy {source}, reward / value model {rm_config.text.hidden_size}-wide x "
    f"{rm_config.text.num_layers} layers; dtype {r.dtype}, params {r.param_dtype}, remat "
    f"{r.remat_policy}; LoRA r={lora.rank} on {lora.targets}; update minibatch {step_rows} rows "
    f"x {q}+{n} tokens ({args.ppo_rows_per_device} per device); rollout forwards {forward_rows} "
    f"rows ({args.ppo_forward_rows_per_device} per device), reward rows {reward_len} tokens"
  )
  peaks = {}
  with sharding.activation_sharding(mesh, rules):
    state, shards, tx = aot.abstract_train_state(
      config, PPOParamsInit(policy_model, value_model, value_head), mesh
    )
    frozen = {
      "policy_base": abstract_params(policy_model, mesh, rules),
      "value_base": abstract_params(value_model, mesh, rules),
    }
    print(
      f"[ppo] trained {aot.num_params(state.params):,}; frozen policy base "
      f"{aot.num_params(frozen['policy_base']):,}, value / reward base "
      f"{aot.num_params(frozen['value_base']):,}"
    )
    step_fn = jax.tree_util.Partial(
      ppo.ppo_train_step, policy_model=policy_model, value_model=value_model,
      value_head=value_head, tx=tx, trainable=tuple(config.trainable), ppo=config.ppo,
      state_dtype=config.optim.state_dtype,
    )  # fmt: skip
    frozen_shards = jax.tree.map(lambda x: x.sharding, frozen)
    jitted = state_lib.jit_train_step(lambda s, b, f: step_fn(s, b, f), shards, mesh, frozen_shards)
    batch = rollout_batch(policy_config, mesh, step_rows, q, n)
    peaks["ppo_train_step"] = compile_and_report(
      "ppo_train_step", jitted, (state, batch, frozen),
      {"train state": state, "frozen bases": frozen, "batch": batch},
    )  # fmt: skip

    # The reward model's backbone is the value model's frozen base (ppo.build_state).
    rm_model, rm_head = Llava(rm_config), ScalarHead()
    head = abstract_head(rm_head, rm_config.text.hidden_size, mesh, rules)
    scores = jax.jit(lambda p, h, b: ppo.reward_scores(rm_model, rm_head, p, h, b))
    batch = aot.abstract_batch(rm_config, mesh, forward_rows, reward_len)
    del batch["labels"]
    peaks["ppo_reward_scores"] = compile_and_report(
      "ppo_reward_scores", scores, (frozen["value_base"], head, batch),
      {"reward model": (frozen["value_base"], head), "batch": batch},
    )  # fmt: skip

    variables = {"params": frozen["policy_base"], "lora": state.params["policy"]}
    logps = jax.jit(lambda v, b: ppo.response_logps(ppo.plain_or(policy_model, v), v, b))
    batch = rollout_batch(policy_config, mesh, forward_rows, q, n)
    batch = {k: batch[k] for k in ("input_ids", "attention_mask", "response_mask", "pixel_values")}
    peaks["ppo_policy_logps"] = compile_and_report(
      "ppo_policy_logps", logps, (variables, batch), {"policy": variables, "batch": batch}
    )
  return peaks


def verdict_for(fraction: float) -> str:
  """An XLA:CPU estimate is not the TPU compiler's: under 80% of HBM counts as fitting."""
  if fraction < 0.8:
    return "fits"
  return "tight (under a 20% margin)" if fraction < 1.0 else "DOES NOT FIT"


def main(args: argparse.Namespace) -> dict[str, float]:
  """Compiles the chosen functions; returns {function: per-device peak GiB}."""
  aot._watch_rss(args.max_rss_gib)
  devices = jax.devices()[: args.devices]
  mesh = sharding.make_mesh(args.mesh, devices)
  print(f"mesh (data, fsdp, tensor) = {tuple(mesh.shape.values())} on {len(devices)} devices")
  peaks = {}
  if "dpo" in args.which:
    peaks.update(run_dpo(args, mesh))
  if "ppo" in args.which:
    peaks.update(run_ppo(args, mesh))
  hbm = CHIPS_GIB[args.chip]
  print(f"host max RSS {aot.max_rss_gib():.2f} GiB")
  print(f"per-device peak vs TPU {args.chip} ({hbm} GiB HBM per chip):")
  for name, peak in peaks.items():
    verdict = verdict_for(peak / (hbm * GIB))
    print(
      f"  {name:22s} {aot.format_gib(peak):>9s} GiB  {100 * peak / (hbm * GIB):5.1f}%  {verdict}"
    )
  return {name: peak / GIB for name, peak in peaks.items()}


if __name__ == "__main__":
  main(_ARGS)
