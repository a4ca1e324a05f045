"""The programs of the RL runs, as their trainers jit them: PPO (trainers/ppo.py) and RLAIF-V's
iterative loop (trainers/iterative.py), and the KV-cached sampler both run.

The sampler (`sampling.decode`: a prefill, then a while_loop of decode steps) is two programs:
  *_sampler       `sampling.decode` itself, jitted as `sampling.generate` jits it without a
                  mesh (the settings static; the host's inputs replicated; the params where the
                  run placed them; the KV cache allocated inside and sharded by the cache's
                  logical rules). Its memory is the sampler's. The compiler costs its loop body
                  once, so its FLOPs are the prefill plus one decode step, and so is the model
                  FLOP count it is compared with.
  *_decode_step   the loop body alone: one token per row through the unrolled decoder against
                  the whole KV cache (donated: the loop updates it in place), then the token
                  choice. Its bytes accessed, against the least a step must read (the decoder's
                  weights and the KV cache, each once), say how far a step is from the HBM
                  roofline.

Model sizes come from the HF folders when they are here (config.json), else from variants:
`ppo.reward_model_variant` (the reward model and value, default the policy's) and
`feedback.labeler_variant` (default the policy's). Every model runs with the policy's runtime
(dtype, remat, scan); the loop's samplers and labeler take their params sharded by the
config's rules (the loop itself loads them whole onto one device today, in float32).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lmm_align import hf, optim, sampling, sharding
from lmm_align.aot import programs as programs_lib
from lmm_align.aot.abstract import (
  Program,
  abstract_head,
  abstract_train_state,
  abstract_variables,
  bytes_per_chip,
  decode_step_flops,
  model_flops,
  pass_factors,
  rows,
  split_lora,
  trained_modules,
  with_sharding,
)  # fmt: skip
from lmm_align.data import pipeline
from lmm_align.feedback import labeler as labeler_lib
from lmm_align.models.config import ModelConfig
from lmm_align.models.heads import ScalarHead
from lmm_align.models.hf_config import from_hf_config
from lmm_align.models.llava import Llava, init_cache
from lmm_align.models.lora import merge_lora, model_variables
from lmm_align.models.variants import get_variant
from lmm_align.rl.scoring import reward_scores
from lmm_align.trainers import ppo as ppo_trainer
from lmm_align.trainers import state as state_lib

# Text tokens of a sampled or labelled prompt beside its image placeholders (the template, a
# question or a yes/no claim question): the plan's prompt length is the sampler's length
# bucket of image tokens + this.
PROMPT_TEXT_TOKENS = 64
# The longest request the claim splitter is sent: its instructions and a candidate answer.
SPLITTER_PROMPT_TOKENS = 768
# The critic's judging prompt beside its image and the two answers it compares: LLaVA-Critic's
# pairwise instructions (about 80 tokens, prompts/pairwise.txt), the chat template's markup
# and system message, and the question.
CRITIC_PROMPT_TEXT_TOKENS = 256

# --------------------------------------------------------------------------------------------
# Model sizes.
# --------------------------------------------------------------------------------------------


def sized_model(path: str, variant: str, fallback: ModelConfig, runtime) -> tuple[ModelConfig, str]:
  """(config, how it was sized) of a model the run loads from an HF folder: the folder's
  config.json when it is here, else `variant`, else `fallback` (the policy's)."""
  if path and os.path.exists(os.path.join(path, "config.json")):
    return from_hf_config(hf.read_config(path), runtime), f"{path}/config.json"
  if variant:
    return get_variant(variant).replace(runtime=runtime), f"variant {variant}"
  return fallback.replace(runtime=runtime), "the policy's size"


def _replicated(mesh: Mesh, shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.replicated(mesh))


def _pixels(c: ModelConfig, mesh: Mesh, lead: tuple[int, ...], place=rows):
  v = c.vision
  return None if v is None else place(mesh, (*lead, v.image_size, v.image_size, 3), jnp.float32)


def _forward_flops(c: ModelConfig, n: int, seq: int, lm_head: bool = True) -> float:
  return model_flops(c, n, seq, pass_factors(set(), False), lm_head=lm_head)


# --------------------------------------------------------------------------------------------
# The sampler.
# --------------------------------------------------------------------------------------------


def _cache_shardings(cache: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings of an (unrolled) KVCache by `sampling.shard_cache`'s logical axes."""

  def spec(axes):
    return NamedSharding(mesh, nn.logical_to_mesh_axes(axes, list(rules)))

  key_axes = ("activation_batch", "activation_kv_heads", None, None)
  return cache.replace(
    key=tuple(spec(key_axes) for _ in cache.key),
    value=tuple(spec(key_axes) for _ in cache.value),
    valid=spec(("activation_batch", None)),
    index=sharding.replicated(mesh),
  )


def _decode_step(
  params, cache, token, positions, keys, temperature, min_tail_mass, *, config, choose
):
  """`sampling.decode`'s loop body: one token per row through the unrolled decoder (params:
  its `language_model` tree), the cache updated, the next token chosen."""
  model = Llava(config.with_runtime(scan_layers=False))
  out = model.apply(
    {"params": {"language_model": params}}, token[:, None], None,
    jnp.ones_like(token)[:, None], positions[:, None], cache,
  )  # fmt: skip
  token, logprob = choose(out.logits[:, 0], keys, temperature, min_tail_mass)
  return token, logprob, sampling.shard_cache(out.cache)


def sampler_programs(
  name: str,
  c: ModelConfig,
  params: Any,
  num_rows: int,
  prompt_len: int,
  settings: sampling.SamplingSettings,
  mesh: Mesh,
  rules,
  pixels: str = "flat",
  resident: dict[str, Any] | None = None,
  placement: str = "replicated",
) -> list[Program]:
  """`{name}_sampler` and `{name}_decode_step` (see the module docstring) for `num_rows`
  prompts of `prompt_len` (a length bucket) and `settings.max_new_tokens` new tokens.
  pixels: "flat" [B, H, W, 3] (one image per row in placeholder order), "slots"
  [B, 1, H, W, 3] (row-aligned), "tiles" (anyres: each row's image as every tile its processor
  can give it [B, tiles, H, W, 3] and the pack plan of the image with the most placeholders,
  as `sampling.generate` builds it), or "none".
  placement: "replicated", as `sampling.generate` runs without a mesh (PPO's rollout: the
  host's rows on every chip); "mesh", as `generate(mesh=mesh)` runs (the loop's samplers and
  judge): with fsdp and tensor both > 1 model-sharded (`_model_sharded_decode`, rows over
  data x fsdp, topped up to whole groups), with data > 1 else data-parallel
  (`_data_parallel_decode`), else replicated."""
  if placement not in ("replicated", "mesh"):
    raise ValueError(f"placement={placement!r}: use 'replicated' or 'mesh'")
  resident = resident or {}
  c = c.with_runtime(lora=None)
  static = dict(
    config=c, max_new_tokens=settings.max_new_tokens, greedy=settings.greedy,
    top_k=settings.top_k, use_top_p=settings.top_p < 1.0, unroll_layers=True,
  )  # fmt: skip
  # generate's choice of program and row placement (sampling.generate, `mesh=`).
  model_sharded = mesh.shape["fsdp"] > 1 and mesh.shape["tensor"] > 1
  groups = 1
  if placement == "mesh":
    groups = mesh.shape["data"] * (mesh.shape["fsdp"] if model_sharded else 1)
  if groups == 1:
    jitted = jax.jit(functools.partial(sampling.decode, **static))
    row_spec = PartitionSpec()
  else:
    make = sampling._model_sharded_decode if model_sharded else sampling._data_parallel_decode
    jitted = make(mesh, **static)  # generate's own jitted program (private to the sampler)
    row_spec = PartitionSpec(("data", "fsdp") if model_sharded else "data")
  b = -(-num_rows // groups) * groups  # topped up to whole groups, as generate does
  slots = prompt_len + settings.max_new_tokens
  rep = functools.partial(_replicated, mesh)

  def per_row(shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, row_spec))

  keys = jax.eval_shape(lambda: sampling.row_keys(jax.random.key(0), b))
  image, plan = None, None
  if pixels == "tiles" and c.anyres:
    image, plan = _tiled_images(c, b, per_row)
  elif pixels != "none" and c.vision is not None:
    place = lambda m, s, d: per_row(s, d)
    image = _pixels(c, mesh, (b,) if pixels == "flat" and groups == 1 else (b, 1), place)
  width = len(settings.stop_token_ids or (0,))
  args = (
    params, per_row((b, prompt_len), jnp.int32), per_row((b, prompt_len), jnp.int32), image,
    per_row(keys.shape, keys.dtype), per_row((b, -(-width // 4) * 4), jnp.int32),
    per_row((b,), jnp.int32), rep((), jnp.float32), rep((), jnp.float32), rep((), jnp.int32),
    plan,
  )  # fmt: skip
  prefill = _forward_flops(c, b, prompt_len, lm_head=False) + b * 2.0 * c.text.hidden_size * (
    c.text.vocab_size
  )
  flops = prefill + decode_step_flops(c, b, slots)
  sampler = Program(f"{name}_sampler", jitted, args, flops, {"params": params}, resident=resident)

  # The loop body's arguments: the decoder unrolled (as decode slices it before the loop) and
  # the cache of S = prompt + new slots, both where the sampler leaves them.
  flat = abstract_variables(Llava(c.with_runtime(scan_layers=False)), mesh, rules)["params"]
  lm = flat[0]["language_model"]
  unscanned = c.with_runtime(scan_layers=False)
  # Rows that do not divide data x fsdp are padded, as XLA pads the loop's uneven rows.
  dp = sharding.data_parallel_size(mesh)
  b = -(-b // dp) * dp
  cache = jax.eval_shape(lambda: init_cache(unscanned, b, slots))
  cache = with_sharding(cache, _cache_shardings(cache, mesh, rules))
  choose = functools.partial(
    sampling._choose,  # the loop's own token choice (private to the sampler; mirrored here)
    greedy=settings.greedy, top_k=settings.top_k, use_top_p=settings.top_p < 1.0,
  )  # fmt: skip
  step = jax.jit(functools.partial(_decode_step, config=c, choose=choose), donate_argnums=(1,))
  step_args = (
    lm, cache, rows(mesh, (b,), jnp.int32), rows(mesh, (b,), jnp.int32),
    jax.ShapeDtypeStruct((b,), keys.dtype, sharding=sharding.batch_sharding(mesh, 1)),
    rep((), jnp.float32), rep((), jnp.float32),
  )  # fmt: skip
  # The least a step reads: every decoder weight it multiplies by (not the embedding table,
  # of which it gathers B rows, unless the LM head is tied to it) and the cache's keys and
  # values, each once.
  read = {k: v for k, v in lm.items() if k != "embed_tokens" or c.text.tie_word_embeddings}
  minimal = bytes_per_chip(read) + bytes_per_chip((cache.key, cache.value))
  by_hand = {"decoder params": lm, "KV cache": (cache.key, cache.value)}
  step_program = Program(
    f"{name}_decode_step", step, step_args, decode_step_flops(c, b, slots), by_hand,
    resident={**resident, "sampler params": params}, minimal_bytes=minimal,
  )  # fmt: skip
  return [sampler, step_program]


def most_image_tokens(c: ModelConfig) -> int:
  """The most placeholders one image takes: an anyres model's largest grid (every pinpoint's
  packed count), else its fixed count."""
  if not c.anyres:
    return c.num_image_tokens
  return max(c.image_tokens(tuple(p)) for p in c.packing.image_grid_pinpoints)


def _tiled_images(c: ModelConfig, num_rows: int, place) -> tuple[Any, dict[str, Any]]:
  """Anyres pixel_values [B, tiles, H, W, 3] (every tile an image can take: the processor's
  largest grid and the base tile) and the pack plan over the bucket of the largest image's
  placeholders (`sampling._tiled_pack_plan`'s token budget), each placed by `place`."""
  tiles, side = c.packing.max_tiles_per_image, c.vision.image_size
  budget = sampling.bucket_length(most_image_tokens(c))
  fields = pipeline.anyres_batch_shapes(num_rows, budget, tiles, side)
  prefix = pipeline.PACK_PLAN_PREFIX
  plan = {k[len(prefix) :]: place(*v) for k, v in fields.items() if k.startswith(prefix)}
  return place(*fields["pixel_values"]), plan


# --------------------------------------------------------------------------------------------
# PPO.
# --------------------------------------------------------------------------------------------


def reward_model_config(config, policy: ModelConfig) -> tuple[ModelConfig, str]:
  """The reward model as `ppo.reward_and_value_models` loads it: its folder's size (or
  ppo.reward_model_variant, or the policy's) with the policy's runtime, without LoRA."""
  runtime = dataclasses.replace(policy.runtime, lora=None)
  ppo = config.ppo
  return sized_model(ppo.reward_model, ppo.get("reward_model_variant", ""), policy, runtime)


def _check_divides(field: str, value: int, mesh: Mesh) -> None:
  dp = sharding.data_parallel_size(mesh)
  if value % dp:
    raise ValueError(f"config.{field}={value} must divide by data x fsdp ({dp})")


def ppo_programs(config, policy_config: ModelConfig, mesh: Mesh, rules) -> list[Program]:
  """trainers/ppo.py: the LoRA merge, the rollout sampler, the policy / reference log-probs,
  the values, the reward model's scores (`Rollouts`), and the update step. Each program's
  `resident` is the run's other buffers, alive beside it (`ppo.build_state`)."""
  ppo = config.ppo
  _check_divides("ppo.forward_batch_size", ppo.forward_batch_size, mesh)
  accum = config.optim.grad_accum_steps
  if ppo.step_batch_size % (sharding.data_parallel_size(mesh) * accum):
    raise ValueError(
      f"config.ppo.step_batch_size={ppo.step_batch_size} must divide by data x fsdp "
      f"({sharding.data_parallel_size(mesh)}) x optim.grad_accum_steps ({accum})"
    )
  rm_config, _ = reward_model_config(config, policy_config)
  lora = policy_config.runtime.lora
  policy_model = Llava(policy_config)
  value_model = Llava(rm_config.with_runtime(lora=lora))
  value_head, rm_head = ScalarHead(zero_init=ppo.value_head_zero_init), ScalarHead()
  hidden = rm_config.text.hidden_size

  policy_vars = abstract_variables(policy_model, mesh, rules)
  initial = policy_vars["params"][0]
  policy, p_shards, policy_base, pb_shards = split_lora(policy_vars, lora is not None)
  value_vars = abstract_variables(value_model, mesh, rules)
  backbone, v_shards, value_base, vb_shards = split_lora(value_vars, lora is not None)
  head, head_shards = abstract_head(value_head, hidden, mesh, rules)
  rm_head_params, _ = abstract_head(rm_head, hidden, mesh, rules)
  params = {"policy": policy, "value": {"backbone": backbone, "head": head}}
  shards = {"policy": p_shards, "value": {"backbone": v_shards, "head": head_shards}}
  state, state_shards, tx = abstract_train_state(config, params, shards, mesh)
  # The reward model's backbone is the value's frozen base with LoRA; a full fine-tune trains a
  # copy of it (and keeps a frozen copy of the starting policy as the reference).
  run = {
    "policy params": state.params["policy"],
    "value params": state.params["value"],
    "optimizer state": state.opt_state,
    "reward head": rm_head_params,
  }
  if lora is not None:
    run["policy base (the reference)"] = policy_base
    run["value base (the reward model)"] = value_base
    rm_backbone, rm_label = value_base, "value base (the reward model)"
    reference, reference_label = policy_base, "policy base (the reference)"
  else:
    run["reference"] = initial
    run["reward model"] = value_vars["params"][0]
    rm_backbone, rm_label = run["reward model"], "reward model"
    reference, reference_label = initial, "reference"

  def resident(*taken: str, **extra) -> dict[str, Any]:
    return {**{k: v for k, v in run.items() if k not in taken}, **extra}

  programs = []
  sampling_params = state.params["policy"]
  if lora is not None:
    merge = jax.jit(lambda base, adapters: merge_lora(base, adapters, lora))
    args = (policy_base, state.params["policy"])
    programs.append(
      Program("ppo_merge_lora", merge, args, 0.0, {"policy base": policy_base},
              resident=resident("policy base (the reference)", "policy params"))
    )  # fmt: skip
    sampling_params = initial  # the merged tree: the base's shapes, dtypes and shardings
  settings = sampling.SamplingSettings(
    temperature=ppo.temperature, top_p=ppo.top_p, top_k=ppo.top_k,
    max_new_tokens=ppo.max_new_tokens, stop_token_ids=(policy_config.text.eos_token_id or 2,),
  )  # fmt: skip
  sampler_resident = resident() if lora is not None else resident("policy params")
  programs += sampler_programs(
    "ppo", policy_config, sampling_params, ppo.rollout_batch_size, ppo.query_len, settings,
    mesh, rules, pixels="flat", resident=sampler_resident,
  )  # fmt: skip

  q, n, r = ppo.query_len, ppo.max_new_tokens, ppo.forward_batch_size
  rollout = {
    "input_ids": rows(mesh, (r, q + n), jnp.int32),
    "attention_mask": rows(mesh, (r, q + n), jnp.int32),
    "response_mask": rows(mesh, (r, n), jnp.int32),
  }
  if policy_config.vision is not None:
    rollout["pixel_values"] = _pixels(policy_config, mesh, (r, 1))
  plain_or = ppo_trainer.plain_or
  logps = jax.jit(
    lambda v, b: ppo_trainer.response_logps(plain_or(policy_model, v), v, b, ppo.temperature)
  )
  policy_variables = model_variables(state.params["policy"], policy_base)
  programs.append(
    Program("ppo_policy_logps", logps, (policy_variables, rollout),
            _forward_flops(policy_config, r, q + n), {"policy": policy_variables},
            resident=resident("policy params", "policy base (the reference)"))
  )  # fmt: skip
  reference_vars = {"params": reference}
  programs.append(
    Program("ppo_reference_logps", logps, (reference_vars, rollout),
            _forward_flops(policy_config, r, q + n), {"reference": reference},
            resident=resident(reference_label))
  )  # fmt: skip
  values = jax.jit(lambda v, h, b: ppo_trainer.response_values(value_model, value_head, v, h, b))
  value_variables = model_variables(state.params["value"]["backbone"], value_base)
  args = (value_variables, state.params["value"]["head"], rollout)
  programs.append(
    Program("ppo_values", values, args, _forward_flops(rm_config, r, q + n, lm_head=False),
            {"value": args[:2]},
            resident=resident("value params", "value base (the reward model)"))
  )  # fmt: skip

  # The reward model reads query (with the facts) + response + the evaluation request, right-
  # padded to a reward bucket: the largest is planned.
  length = max(ppo.reward_buckets)
  scored = {
    "input_ids": rows(mesh, (r, length), jnp.int32),
    "attention_mask": rows(mesh, (r, length), jnp.int32),
  }
  if rm_config.vision is not None:
    scored["pixel_values"] = _pixels(rm_config, mesh, (r, 1))
  rm_model = Llava(rm_config)
  scores = jax.jit(lambda p, h, b: reward_scores(rm_model, rm_head, p, h, b))
  args = (rm_backbone, rm_head_params, scored)
  programs.append(
    Program("ppo_reward_scores", scores, args, _forward_flops(rm_config, r, length, False),
            {"reward model": args[:2]}, resident=resident(rm_label, "reward head"))
  )  # fmt: skip

  step_fn = jax.tree_util.Partial(
    ppo_trainer.ppo_train_step, policy_model=policy_model, value_model=value_model,
    value_head=value_head, tx=tx, trainable=tuple(config.trainable), ppo=ppo,
    state_dtype=config.optim.state_dtype, grad_accum_steps=accum,
  )  # fmt: skip
  frozen = {"policy_base": policy_base, "value_base": value_base}
  frozen_shards = {"policy_base": pb_shards, "value_base": vb_shards}
  update = state_lib.jit_train_step(
    lambda s, b, f: step_fn(s, b, f), state_shards, mesh, frozen_shards
  )
  s = ppo.step_batch_size
  batch = {k: rows(mesh, (s, *v.shape[1:]), v.dtype) for k, v in rollout.items()}
  for key in ("old_logps", "old_values", "advantages", "returns"):
    batch[key] = rows(mesh, (s, n), jnp.float32)
  trained, _ = optim.split_trainable(params, tuple(config.trainable))
  lora_on = lora is not None
  policy_factors = pass_factors(trained_modules(trained.get("policy", {})), lora_on)
  value_factors = pass_factors(trained_modules(trained.get("value", {}).get("backbone", {})), lora_on)  # fmt: skip
  flops = model_flops(policy_config, s, q + n, policy_factors) + model_flops(
    rm_config, s, q + n, value_factors, lm_head=False
  )
  taken = ("policy params", "value params", "optimizer state")
  taken += ("policy base (the reference)", "value base (the reward model)") if lora_on else ()
  by_hand = {"train state": state, "frozen bases": frozen}
  programs.append(
    Program("ppo_train_step", update, (state, batch, frozen), flops, by_hand,
            resident=resident(*taken))
  )  # fmt: skip
  return programs


# --------------------------------------------------------------------------------------------
# The iterative loop.
# --------------------------------------------------------------------------------------------


def loop_mesh(config: ml_collections.ConfigDict, mesh: Mesh) -> Mesh:
  """The mesh the loop's models sample, label and judge on (trainers/iterative.py `loop_mesh`):
  config.mesh over the slice's devices when it differs from the DPO config's mesh (e.g. a 72B
  critic over more tensor shards than DPO uses), else `mesh`, the plan's (the DPO mesh, or
  --mesh: the recipes copy the DPO mesh into config.mesh, so both follow it). A one-device
  loop mesh (the shapes loop's tiny models) is planned on `mesh` too."""
  m = config.mesh
  if tuple(m.sizes) == tuple(config.train.mesh.sizes) or m.num_devices == 1:
    return mesh
  devices = list(mesh.devices.flat)
  try:
    return sharding.make_mesh(tuple(m.sizes), devices[: m.num_devices or len(devices)])
  except ValueError as e:
    raise ValueError(f"config.mesh.sizes={tuple(m.sizes)} on {len(devices)} chips: {e}") from e


@dataclasses.dataclass(frozen=True)
class OnMesh:
  """A jitted program traced under another mesh and logical rules than the plan's (the loop's
  mesh, not the DPO one): `lower` and calls enter them, as the loop runs it."""

  jitted: Any
  mesh: Mesh
  rules: tuple

  def lower(self, *args):
    with _on_mesh(self.mesh, self.rules):
      return self.jitted.lower(*args)

  def __call__(self, *args):
    with _on_mesh(self.mesh, self.rules):
      return self.jitted(*args)


@contextlib.contextmanager
def _on_mesh(mesh: Mesh, rules: tuple):
  """`mesh`'s abstract mesh and `rules`, as plan enters its own around every program."""
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(list(rules)):
    yield


def critic_prompt_length(critic: ModelConfig, answer_tokens: int) -> int:
  """The longest request the loop's critic is sent, bucketed as `ModelJudge` buckets it
  (powers of two): its image's most placeholders, the two answers it compares (each at most
  `answer_tokens`, the candidates' sampling.max_new_tokens) and the judging prompt's text."""
  tokens = most_image_tokens(critic) + 2 * answer_tokens + CRITIC_PROMPT_TEXT_TOKENS
  return sampling.bucket_length(tokens)


def iterative_programs(config, policy_config: ModelConfig, mesh: Mesh, rules) -> list[Program]:
  """trainers/iterative.py, one round: the candidate sampler (the round's policy), the claim
  splitter's sampler when it is a model (`feedback.splitter=model:DIR`), the labeler's yes/no
  forward (feedback=rlaifv: feedback.labeler; self: the policy) or the critic's greedy
  verdicts (feedback=critic: feedback.critic, judging ordered pairs of candidates), and the DPO
  programs of config.train. The stages run one after another, each with only its own model
  loaded; the samplers, labeler and critic on the loop's mesh (`loop_mesh`), DPO on `mesh`.
  An anyres policy or critic (LLaVA-NeXT / OneVision) samples with every tile an image can
  take and the pack plan."""
  f = config.feedback
  if f.kind not in ("rlaifv", "self", "critic", "ground_truth", "correction"):
    raise ValueError(
      f"config.feedback.kind={f.kind!r}: plan knows rlaifv, self, critic, ground_truth and "
      "correction"
    )
  inference = loop_mesh(config, mesh)
  inference_rules = tuple(tuple(r) for r in config.mesh.rules)
  with _on_mesh(inference, inference_rules):
    programs = _inference_programs(config, policy_config, inference, inference_rules)
  if inference is not mesh:
    programs = [
      dataclasses.replace(p, jitted=OnMesh(p.jitted, inference, inference_rules)) for p in programs
    ]
  return programs + programs_lib.dpo_programs(config.train, policy_config, mesh, rules)


def _inference_programs(config, policy_config: ModelConfig, mesh: Mesh, rules) -> list[Program]:
  """The loop's sampling, labelling and judging programs (`iterative_programs`) on `mesh`."""
  f, s = config.feedback, config.sampling
  runtime = dataclasses.replace(policy_config.runtime, lora=None)
  policy = policy_config.replace(runtime=runtime)
  params = abstract_variables(Llava(policy), mesh, rules)["params"][0]
  settings = sampling.SamplingSettings(
    temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
    stop_token_ids=(policy.text.eos_token_id or 2,),
  )  # fmt: skip
  prompt = sampling.bucket_length(most_image_tokens(policy) + PROMPT_TEXT_TOKENS)
  # candidates._sample_prompt: one call per prompt, its K samples as the rows.
  programs = sampler_programs(
    "candidates", policy, params, s.num_samples, prompt, settings, mesh, rules,
    pixels="tiles" if policy.anyres else "flat", placement="mesh",
  )  # fmt: skip
  spec = f.get("splitter", "rules")
  if spec.startswith("model:"):
    folder = spec.split(":", 1)[1]
    if not os.path.exists(os.path.join(folder, "config.json")):
      raise ValueError(
        f"config.feedback.splitter={spec!r}: {folder}/config.json is not here (the plan "
        "sizes the splitter from it)"
      )
    splitter, _ = sized_model(folder, "", policy, runtime)
    splitter_params = abstract_variables(Llava(splitter), mesh, rules)["params"][0]
    # judges.model.ModelJudge: greedy, feedback.batch_size rows, its 512-token reply budget.
    greedy = sampling.SamplingSettings(temperature=0.0, max_new_tokens=512, stop_token_ids=(2,))
    programs += sampler_programs(
      "splitter", splitter, splitter_params, f.batch_size,
      sampling.bucket_length(SPLITTER_PROMPT_TOKENS), greedy, mesh, rules, pixels="slots",
      placement="mesh",
    )  # fmt: skip
  if f.kind in ("rlaifv", "self"):
    if f.kind == "self":
      labeler, labeler_params = policy, params
    else:
      labeler, _ = sized_model(f.labeler, f.get("labeler_variant", ""), policy, runtime)
      labeler_params = abstract_variables(Llava(labeler), mesh, rules)["params"][0]
    programs.append(labeler_program(labeler, labeler_params, f.batch_size, mesh))
  if f.kind == "critic":
    critic = critic_config(config, policy)
    critic_params = abstract_variables(Llava(critic), mesh, rules)["params"][0]
    # trainers/iterative.critic_judge: ModelJudge, greedy, feedback.batch_size requests a
    # call (ordered pairs of one prompt's candidates), critic_max_tokens of reply, each
    # request's image as its tiles (anyres) or one slot.
    greedy = sampling.SamplingSettings(
      temperature=0.0, max_new_tokens=f.critic_max_tokens,
      stop_token_ids=(critic.text.eos_token_id or 2,),
    )  # fmt: skip
    programs += sampler_programs(
      "critic", critic, critic_params, f.batch_size,
      critic_prompt_length(critic, s.max_new_tokens), greedy, mesh, rules,
      pixels="tiles" if critic.anyres else "slots", placement="mesh",
    )  # fmt: skip
  return programs


def critic_config(config, policy: ModelConfig) -> ModelConfig:
  """The critic as the loop loads it (feedback.critic): its folder's size when it is here,
  else feedback.critic_variant, else the policy's; the policy's runtime, no LoRA."""
  f = config.feedback
  critic, _ = sized_model(f.critic, f.get("critic_variant", ""), policy, policy.runtime)
  return critic


def labeler_program(c: ModelConfig, params: Any, num_rows: int, mesh: Mesh) -> Program:
  """feedback/labeler.py's `jit_last_position_yes_no` on `num_rows` questions (right-padded
  to the length bucket of the image's placeholders + a question), each with its image slot;
  an anyres labeler (RLAIF-V's LLaVA-NeXT-34B) with every tile its processor can give an image
  and the pack plan of the largest image (its most placeholders), as `YesNoLabeler` batches."""
  rep = functools.partial(_replicated, mesh)
  plan = None
  if c.anyres:
    tokens = most_image_tokens(c)
    length = sampling.bucket_length(tokens + PROMPT_TEXT_TOKENS)
    budget = sampling.bucket_length(tokens)
    tiles, side = c.packing.max_tiles_per_image, c.vision.image_size
    image = rep((num_rows, tiles, side, side, 3), jnp.float32)
    fields = pipeline.anyres_batch_shapes(num_rows, budget, tiles, side)
    prefix = pipeline.PACK_PLAN_PREFIX
    plan = {k[len(prefix) :]: rep(*v) for k, v in fields.items() if k.startswith(prefix)}
  else:
    length = sampling.bucket_length(c.num_image_tokens + PROMPT_TEXT_TOKENS)
    image = _pixels(c, mesh, (num_rows, 1), lambda m, s, d: rep(s, d))
  answers = len(labeler_lib.DEFAULT_YES_WORDS)
  args = (
    params, rep((num_rows, length), jnp.int32), rep((num_rows, length), jnp.int32), image,
    rep((num_rows,), jnp.int32), rep((answers,), jnp.int32), rep((answers,), jnp.int32), plan,
  )  # fmt: skip
  jitted = jax.jit(functools.partial(labeler_lib.last_position_yes_no, config=c))
  flops = _forward_flops(c, num_rows, length, lm_head=False)
  flops += num_rows * 2.0 * c.text.hidden_size * c.text.vocab_size
  return Program("labeler_yes_no", jitted, args, flops, {"labeler params": params})


def config_for_model(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config whose model and batch `plan` reports: the DPO config of an iterative loop."""
  return config.train if config.trainer == "iterative" else config
