"""The programs of the supervised trainers (SFT, DPO, reward model), as their trainers jit them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from lmm_align import optim
from lmm_align.aot.abstract import (
  Program,
  abstract_head,
  abstract_train_state,
  abstract_variables,
  check_rows,
  model_flops,
  pass_factors,
  rows,
  sequence_batch,
  split_lora,
  trained_modules,
)  # fmt: skip
from lmm_align.data import pipeline, sources
from lmm_align.models.config import ModelConfig
from lmm_align.models.heads import ScalarHead
from lmm_align.models.llava import Llava
from lmm_align.models.lora import model_variables
from lmm_align.trainers import dpo, reward, sft
from lmm_align.trainers import state as state_lib


def anyres_fields(config, model_config: ModelConfig, mesh: Mesh, num_rows: int, seq: int) -> dict:
  """An anyres batch's image fields as the pipeline gives them (`pipeline.anyres_batch_shapes`):
  each row's tiles (the largest of data.tile_buckets, else the most an image can take), its
  image size and its pack plan over `seq` tokens; a row is a sequence (SFT) or a preference
  pair (DPO, reward model: one image for both sequences, `preference.pair_image_inputs`)."""
  tiles = max(sources.tile_buckets(config, model_config))
  fields = pipeline.anyres_batch_shapes(num_rows, seq, tiles, model_config.vision.image_size)
  return {k: rows(mesh, shape, dtype) for k, (shape, dtype) in fields.items()}


def pair_batch(config, model_config: ModelConfig, mesh: Mesh, pairs: int, seq: int) -> dict:
  """A preference batch as `preference.PreferenceData` serves it: ids, labels and mask
  [L, 2, T]; pixel_values [L, 2, 1, H, W, 3] with a single-image tower, or for an anyres model
  (LLaVA-NeXT / OneVision) the pair's one tiled image and pack plan per pair (L rows)."""
  batch = sequence_batch(model_config, mesh, (pairs, 2), seq)
  if model_config.anyres:
    del batch["pixel_values"]
    batch.update(anyres_fields(config, model_config, mesh, pairs, seq))
  return batch


def sft_programs(config, model_config: ModelConfig, mesh: Mesh, rules) -> list[Program]:
  """trainers/sft.py: the train step."""
  model = Llava(model_config)
  lora = model_config.runtime.lora is not None
  accum = config.optim.grad_accum_steps
  batch_rows, seq = check_rows(config, mesh, accum), config.data.max_length
  params, shards, base, base_shards = split_lora(abstract_variables(model, mesh, rules), lora)
  state, state_shards, tx = abstract_train_state(config, params, shards, mesh)
  step_fn = jax.tree_util.Partial(
    sft.sft_train_step, model=model, tx=tx, trainable=tuple(config.trainable),
    grad_accum_steps=accum, state_dtype=config.optim.state_dtype,
  )  # fmt: skip
  jitted = state_lib.jit_train_step(
    lambda s, b, f: step_fn(s, b, f), state_shards, mesh, base_shards
  )
  batch = sequence_batch(model_config, mesh, (batch_rows,), seq)
  if model_config.anyres:
    batch.update(anyres_fields(config, model_config, mesh, batch_rows, seq))
  trained, _ = optim.split_trainable(params, tuple(config.trainable))
  factors = pass_factors(trained_modules(trained), lora)
  flops = model_flops(model_config, batch_rows, seq, factors)
  by_hand = {"params": params, "optimizer state": state.opt_state, "frozen base": base}
  return [Program("sft_train_step", jitted, (state, batch, base), flops, by_hand)]


def dpo_programs(config, model_config: ModelConfig, mesh: Mesh, rules) -> list[Program]:
  """trainers/dpo.py: the reference log-prob pass (when precomputed) and the train step."""
  if config.optim.grad_accum_steps != 1:
    raise ValueError("optim.grad_accum_steps: the DPO trainer does not accumulate gradients")
  model = Llava(model_config)
  reference_model = Llava(model_config.with_runtime(lora=None))
  lora = model_config.runtime.lora is not None
  pairs, seq = check_rows(config, mesh), config.data.max_length
  variables = abstract_variables(model, mesh, rules)
  initial, initial_shards = variables["params"]
  params, shards, base, base_shards = split_lora(variables, lora)
  d = config.dpo
  batch = pair_batch(config, model_config, mesh, pairs, seq)
  if d.get("token_weight", 1.0) != 1.0:
    batch["token_weights"] = rows(mesh, (pairs, 2, seq), jnp.float32)
  forward = pass_factors(set(), False)
  programs = []
  reference, reference_shards = None, None
  if d.precompute_reference:
    fn = jax.jit(lambda v, b: dpo.pair_logps(reference_model, v, b, d.average_logps))
    ref_args = ({"params": initial}, dict(batch))
    flops = model_flops(model_config, 2 * pairs, seq, forward)
    programs.append(Program("dpo_reference_logps", fn, ref_args, flops, {"params": ref_args[0]}))
    batch["ref_logps"] = rows(mesh, (pairs, 2), jnp.float32)
  elif base is None:
    reference, reference_shards = initial, initial_shards  # a frozen copy of the start
  state, state_shards, tx = abstract_train_state(config, params, shards, mesh)
  step_fn = jax.tree_util.Partial(
    dpo.dpo_train_step, model=model, reference_model=reference_model, tx=tx,
    trainable=tuple(config.trainable), dpo=d, state_dtype=config.optim.state_dtype,
  )  # fmt: skip
  frozen = {"base": base, "reference": reference}
  frozen_shards = {"base": base_shards, "reference": reference_shards}
  jitted = state_lib.jit_train_step(
    lambda s, b, f: step_fn(s, b, f), state_shards, mesh, frozen_shards
  )
  trained, _ = optim.split_trainable(params, tuple(config.trainable))
  flops = model_flops(model_config, 2 * pairs, seq, pass_factors(trained_modules(trained), lora))
  if not d.precompute_reference:
    flops += model_flops(model_config, 2 * pairs, seq, forward)
  by_hand = {"params": params, "optimizer state": state.opt_state, "frozen": frozen}
  programs.append(Program("dpo_train_step", jitted, (state, batch, frozen), flops, by_hand))
  return programs


def reward_programs(config, model_config: ModelConfig, mesh: Mesh, rules) -> list[Program]:
  """trainers/reward.py: the train step and the held-out scoring forward."""
  if config.optim.grad_accum_steps != 1:
    raise ValueError("optim.grad_accum_steps: the reward trainer does not accumulate gradients")
  model, head = Llava(model_config), ScalarHead()
  lora = model_config.runtime.lora is not None
  pairs, seq = check_rows(config, mesh), config.data.max_length
  backbone, backbone_shards, base, base_shards = split_lora(
    abstract_variables(model, mesh, rules), lora
  )
  head_params, head_shards = abstract_head(head, model_config.text.hidden_size, mesh, rules)
  params = {"backbone": backbone, "head": head_params}
  shards = {"backbone": backbone_shards, "head": head_shards}
  state, state_shards, tx = abstract_train_state(config, params, shards, mesh)
  step_fn = jax.tree_util.Partial(
    reward.reward_train_step, model=model, head=head, tx=tx, trainable=tuple(config.trainable),
    centering_coef=config.reward.centering_coef, centering=config.reward.centering,
    state_dtype=config.optim.state_dtype,
  )  # fmt: skip
  jitted = state_lib.jit_train_step(
    lambda s, b, f: step_fn(s, b, f), state_shards, mesh, base_shards
  )
  batch = pair_batch(config, model_config, mesh, pairs, seq)
  trained, _ = optim.split_trainable(params, tuple(config.trainable))
  factors = pass_factors(trained_modules(trained.get("backbone", {})), lora)
  flops = model_flops(model_config, 2 * pairs, seq, factors, lm_head=False)
  by_hand = {"params": params, "optimizer state": state.opt_state, "frozen base": base}
  programs = [Program("reward_train_step", jitted, (state, batch, base), flops, by_hand)]
  # The trainer closes over the LoRA base; here it is an argument (the same bytes on the chip).
  scores = jax.jit(
    lambda p, frozen, b: reward.pair_rewards(
      model, head, model_variables(p["backbone"], frozen), p["head"], b
    )
  )
  flops = model_flops(model_config, 2 * pairs, seq, pass_factors(set(), False), lm_head=False)
  by_hand = {"params": params, "frozen base": base}
  programs.append(Program("reward_eval_scores", scores, (params, base, batch), flops, by_hand))
  return programs
