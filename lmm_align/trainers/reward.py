"""Reward model (LLaVA-RLHF / Fact-RLHF): the backbone plus a scalar head read at each
sequence's last real token, trained with Bradley-Terry on preference pairs [B, 2, T]
(0 chosen, 1 rejected).

Fact augmentation: each sequence is `conversation + response + evaluation prompt`, where the
prompt lists the image's facts (captions, shuffled per example; a rationale for multiple
choice) when `reward.fact_augmented`; the vanilla RM gets the prompt without facts. The state's
params are {"backbone": ..., "head": ...}; with LoRA the backbone entry holds the adapters and
the frozen base is passed separately, as in the SFT and DPO steps. `lmm-align export` writes
the HF backbone (LoRA merged) plus the head (see lmm_align.hf.reward).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from lmm_align import optim, preference_losses, run_config, sharding
from lmm_align.data import preference, preference_sources, sources
from lmm_align.data import reward_data as reward_data_lib
from lmm_align.hf.reward import save_reward_model
from lmm_align.models.heads import ScalarHead, sequence_scores
from lmm_align.models.llava import Llava
from lmm_align.models.lora import merge_lora, model_variables
from lmm_align.trainers import export, loop, registry, run_setup
from lmm_align.trainers import state as state_lib


def pair_rewards(
  model: Llava, head: ScalarHead, backbone_variables: dict, head_params: Any, batch: dict
) -> jax.Array:
  """Scalar rewards [B, 2] of a pair batch: the head at each sequence's last real token."""
  b = batch["input_ids"].shape[0]
  flat = lambda x: x.reshape(b * 2, *x.shape[2:])
  mask = flat(batch["attention_mask"])
  out = model.apply(
    backbone_variables,
    flat(batch["input_ids"]),
    attention_mask=mask,
    with_logits=False,
    **preference.pair_image_inputs(batch),  # an anyres pair's image is encoded once
  )
  per_position = head.apply({"params": head_params}, out.hidden_states)
  return sequence_scores(per_position, mask).reshape(b, 2)


def reward_train_step(
  state: state_lib.TrainState,
  batch: dict[str, jax.Array],
  base_params: Any,
  *,
  model: Llava,
  head: ScalarHead,
  tx: optax.GradientTransformation,
  trainable: tuple[str, ...],
  centering_coef: float,
  centering: str,
  state_dtype: str,
) -> tuple[state_lib.TrainState, dict[str, jax.Array]]:
  """One step of Bradley-Terry with the centering term (see preference_losses)."""
  trainable_params, frozen_params = optim.split_trainable(state.params, trainable)

  def loss_fn(params):
    merged = optim.merge_params(params, frozen_params)
    rewards = pair_rewards(
      model, head, model_variables(merged["backbone"], base_params), merged["head"], batch
    )
    return preference_losses.bradley_terry_loss(
      rewards[:, 0], rewards[:, 1], centering_coef, centering
    )

  (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable_params)
  new_state = state_lib.apply_gradients(
    state, grads, tx, trainable_params, frozen_params, state_dtype
  )
  return new_state, state_lib.with_step_metrics(metrics, grads, batch)


# --------------------------------------------------------------------------------------------
# Data.
# --------------------------------------------------------------------------------------------


def reward_records(config: ml_collections.ConfigDict) -> tuple[list[dict], Counter]:
  """The configured preference records ({id, image, question, chosen, rejected, facts, ...}),
  from any "pairs" source of `lmm_align.data.registry`, and the skipped counts."""
  from lmm_align.data import registry as data_registry

  return data_registry.read("pairs", config.data)


def fact_lead_in(config: ml_collections.ConfigDict) -> str:
  """config.reward.fact_lead_in, the sentence above the facts; empty or absent (workdirs written
  before it existed): reward_data.DEFAULT_FACT_LEAD_IN."""
  from lmm_align.data import reward_data as rd

  return config.reward.get("fact_lead_in") or rd.DEFAULT_FACT_LEAD_IN


def facts_position(config: ml_collections.ConfigDict) -> str:
  """config.reward.facts_position; workdirs written before it existed read facts after."""
  from lmm_align.data.reward_data import FACTS_POSITIONS

  position = config.reward.get("facts_position", "after_response")
  if position not in FACTS_POSITIONS:
    raise ValueError(f"config.reward.facts_position={position!r}: use one of {FACTS_POSITIONS}")
  return position


def reward_data(
  config: ml_collections.ConfigDict, tokenizer: Any, model_config
) -> tuple[preference.PreferenceData, preference.PreferenceData | None]:
  """(train, held-out) pair data: a seeded split of `reward.eval_pairs` records off the end."""
  from lmm_align.data import reward_data as rd

  position = facts_position(config)  # a bad setting fails before the records are read
  records, skipped = reward_records(config)
  order = np.random.default_rng([config.seed, 7]).permutation(len(records))
  records = [records[i] for i in order]
  n_eval = min(config.reward.eval_pairs, len(records) // 5)
  prompt = rd.load_reward_prompt(config.reward.prompt_path or None, config.reward.fact_augmented)
  kwargs = dict(
    tokenizer=tokenizer, template=config.data.template,
    num_image_tokens=model_config.num_image_tokens, image_token_id=model_config.image_token_id,
    prompt=prompt, fact_augmented=config.reward.fact_augmented, on_error=config.data.on_error,
    facts_position=position, lead_in=fact_lead_in(config),
  )  # fmt: skip
  image_config, tiling = sources.image_batching(config, model_config)

  def build(part: list[dict], seed: int, stats: Counter):
    pairs, part_skipped = rd.encode_reward_pairs(part, rng=np.random.default_rng(seed), **kwargs)
    pairs = [dataclasses.replace(p, image=preference_sources.image_source(p.image)) for p in pairs]
    return preference.PreferenceData(
      pairs, image_config, max_length=config.data.max_length, buckets=tuple(config.data.buckets),
      pad_id=tokenizer.pad_token_id, seed=config.seed, skipped=stats + part_skipped,
      tiling=tiling, image_token_id=model_config.image_token_id,
    )  # fmt: skip

  train_data = build(records[n_eval:], config.seed, skipped)
  eval_data = build(records[:n_eval], config.seed + 1, Counter()) if n_eval else None
  return train_data, eval_data


# --------------------------------------------------------------------------------------------
# Held-out accuracy.
# --------------------------------------------------------------------------------------------


def evaluate_pairs(
  rewards_fn: Callable[[dict], jax.Array],
  data: preference.PreferenceData,
  batch_size: int,
  mesh,
) -> dict[str, float]:
  """Accuracy (chosen scored above rejected), mean margin and mean rewards over every pair.

  rewards_fn: a jitted batch -> [B, 2] rewards. The last batch is padded with repeats (one
  compiled shape per bucket) and the repeats are dropped.
  """
  rewards = np.zeros((len(data), 2), np.float32)
  for start in range(0, len(data), batch_size):
    indices = np.arange(start, min(start + batch_size, len(data)))
    padded = np.concatenate([indices, np.full(batch_size - len(indices), indices[-1])])
    rows = {k: v for k, v in data.rows(padded).items() if k not in ("pair_index", "ref_logps")}
    out = rewards_fn(sharding.global_batch_from_local(rows, mesh))
    rewards[indices] = np.asarray(jax.device_get(out))[: len(indices)]
  margin = rewards[:, 0] - rewards[:, 1]
  return {
    "eval_accuracy": float(np.mean(margin > 0)),
    "eval_margin": float(np.mean(margin)),
    "eval_reward_chosen": float(np.mean(rewards[:, 0])),
    "eval_reward_rejected": float(np.mean(rewards[:, 1])),
    "eval_pairs": len(data),
  }


# --------------------------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------------------------


def build_state(config, run: run_setup.RunSetup, model: Llava, head: ScalarHead, source: str):
  """(state, state shardings, tx, LoRA base or None): the backbone from init_from (or the
  seed), the head from the seed; the workdir / resume restore happens afterwards."""
  backbone = run_setup.split_params(run, model, source)
  head_params, head_shards = state_lib.init_head(
    head, model.config.text.hidden_size, run.mesh, run.rules, jax.random.key(config.seed + 1)
  )
  params = {"backbone": backbone.trained, "head": head_params}
  param_shards = {"backbone": backbone.trained_shardings, "head": head_shards}
  tx = state_lib.make_optimizer(config, params)
  state, state_shards = state_lib.create_train_state(
    params, param_shards, tx, tuple(config.trainable), config.seed, run.mesh,
    config.optim.state_dtype,
  )  # fmt: skip
  return state, state_shards, tx, backbone


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains the reward model as configured; summary.json gets held-out accuracy and margin."""
  if config.optim.grad_accum_steps != 1:
    raise ValueError("the reward trainer does not accumulate gradients; use a smaller batch_size")
  run = run_setup.start_run(config, workdir)
  model, head = Llava(run.model_config), ScalarHead()
  data, eval_data = reward_data(config, run.tokenizer, run.model_config)
  with run.activation_sharding():
    state, state_shards, tx, backbone = build_state(config, run, model, head, run.source)
    state, _ = run_setup.restore_state(run, state, state_shards, data.fingerprint())
    print(
      f"[reward] start at step {int(state.step)} from {run.source}; {len(data)} train pairs, "
      f"{len(eval_data) if eval_data else 0} held out, {dict(data.stats)}; "
      f"fact_augmented={config.reward.fact_augmented}"
    )
    step_fn = jax.tree_util.Partial(
      reward_train_step, model=model, head=head, tx=tx, trainable=tuple(config.trainable),
      centering_coef=config.reward.centering_coef, centering=config.reward.centering,
      state_dtype=config.optim.state_dtype,
    )  # fmt: skip
    train_step = run_setup.jit_step(
      step_fn, state_shards, run.mesh, backbone.base, backbone.base_shardings, ("pair_index",)
    )

    def evaluate(final) -> dict[str, Any]:
      if eval_data is None:
        return {}
      base = backbone.base
      rewards_fn = jax.jit(
        lambda p, b: pair_rewards(model, head, model_variables(p["backbone"], base), p["head"], b)
      )
      return evaluate_pairs(
        lambda b: rewards_fn(final.params, b), eval_data, config.batch_size, run.mesh
      )

    return loop.run_loop(
      config, workdir, run.mesh, state, train_step, data, run.checkpointer, evaluate, "reward"
    )


def export_reward_workdir(workdir: str, out: str, peft: bool = False) -> str:
  """The run's latest checkpoint as an HF backbone (LoRA merged) plus the head."""
  if peft:
    raise ValueError("--peft: a reward model is exported merged, with its head")
  config = run_config.load_workdir_config(workdir)
  tokenizer = sources.tokenizer_for(config, workdir)
  model_config = run_config.model_config_for(config, tokenizer)
  model, head = Llava(model_config), ScalarHead()
  source = "init_from" if config.init_from else "scratch"

  def build(mesh, rules):
    run = run_setup.RunSetup(
      config, workdir, mesh, rules, tokenizer, model_config, None, source, None
    )
    state, state_shards, _, backbone = build_state(config, run, model, head, source)
    return state, state_shards, backbone.base

  state, base, step = export.restore_latest(config, workdir, build)
  backbone = state.params["backbone"]
  if base is not None:
    backbone = merge_lora(base, backbone, model_config.runtime.lora)
  plain = Llava(model_config.with_runtime(lora=None))
  image_config = sources.image_config_for(config, model_config)
  processor = export.hf_processor(tokenizer, plain, image_config)
  prompt = reward_data_lib.load_reward_prompt(
    config.reward.prompt_path or None, config.reward.fact_augmented
  )
  save_reward_model(
    plain, backbone, state.params["head"], out, fact_augmented=config.reward.fact_augmented,
    prompt=prompt, facts_position=facts_position(config), fact_lead_in=fact_lead_in(config),
    tokenizer=None if processor else tokenizer, processor=processor,
  )  # fmt: skip
  print(f"[export] reward model, step {step} of {workdir} -> {out}")
  return out


registry.register(registry.Trainer("reward", train, export=export_reward_workdir))
