"""DPO-family preference training (RLHF-V / RLAIF-V / LLaVA-Critic's reward stage), sharded.

The reference policy is the starting policy. Its sequence log-probs are either precomputed
once over the whole dataset before training (RLAIF-V's way: the step then runs one model,
not two) or computed on the fly from frozen params passed to the step; with LoRA the
reference is the base without adapters, so policy and reference share one set of weights.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lmm_align import optim, preference_losses, sharding
from lmm_align.data import preference, sources
from lmm_align.evals import registry as eval_registry
from lmm_align.models.llava import Llava
from lmm_align.models.lora import merge_lora, model_variables
from lmm_align.trainers import export, loop, registry, run_setup
from lmm_align.trainers import state as state_lib

# --------------------------------------------------------------------------------------------
# The step.
# --------------------------------------------------------------------------------------------


def pair_logps(model: Llava, variables: dict, batch: dict, average: bool) -> jax.Array:
  """Sequence log-probs [B, 2] (chosen, rejected) of a pair batch [B, 2, T] under `variables`."""
  b = batch["input_ids"].shape[0]
  flat = lambda x: x.reshape(b * 2, *x.shape[2:])
  logits = model.apply(
    variables,
    flat(batch["input_ids"]),
    attention_mask=flat(batch["attention_mask"]),
    **preference.pair_image_inputs(batch),  # an anyres pair's image is encoded once
  ).logits
  weights = flat(batch["token_weights"]) if "token_weights" in batch else None
  return preference_losses.sequence_logps(
    logits, flat(batch["labels"]), average=average, token_weights=weights
  ).reshape(b, 2)


def dpo_train_step(
  state: state_lib.TrainState,
  batch: dict[str, jax.Array],
  frozen: dict[str, Any],
  *,
  model: Llava,
  reference_model: Llava,
  tx: optax.GradientTransformation,
  trainable: tuple[str, ...],
  dpo: ml_collections.ConfigDict,
  state_dtype: str,
) -> tuple[state_lib.TrainState, dict[str, jax.Array]]:
  """One DPO step. frozen = {"base": LoRA base or None, "reference": reference params or None}.

  The reference log-probs come from the batch (`ref_logps`, precomputed), else from the
  reference params, else (LoRA) from the base without adapters.
  """
  trainable_params, frozen_params = optim.split_trainable(state.params, trainable)
  if "ref_logps" in batch:
    ref = batch["ref_logps"]
  else:
    ref_params = frozen["reference"] if frozen["reference"] is not None else frozen["base"]
    ref = jax.lax.stop_gradient(
      pair_logps(reference_model, {"params": ref_params}, batch, dpo.average_logps)
    )

  def loss_fn(params):
    variables = model_variables(optim.merge_params(params, frozen_params), frozen["base"])
    logps = pair_logps(model, variables, batch, dpo.average_logps)
    return preference_losses.dpo_loss(
      dpo.loss,
      logps[:, 0],
      logps[:, 1],
      ref[:, 0],
      ref[:, 1],
      dpo.beta,
      dpo.label_smoothing,
      dpo.sft_weight,
      sft_example_weights=batch.get("sft_weights"),
    )

  (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable_params)
  new_state = state_lib.apply_gradients(
    state, grads, tx, trainable_params, frozen_params, state_dtype
  )
  return new_state, state_lib.with_step_metrics(metrics, grads, batch)


def precompute_reference_logps(
  model: Llava,
  variables: dict,
  data: preference.PreferenceData,
  batch_size: int,
  average: bool,
  mesh,
) -> np.ndarray:
  """[N, 2] reference log-probs of every pair, one jitted forward per batch (few shapes: the
  last batch is padded with repeats, lengths come from the buckets). With several processes
  each feeds its share of a batch's rows and all get the whole [N, 2] back."""
  from jax.experimental import multihost_utils

  fn = jax.jit(lambda v, b: pair_logps(model, v, b, average))
  out = np.zeros((len(data), 2), np.float32)
  local = batch_size // jax.process_count()
  mine = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
  for start in range(0, len(data), batch_size):
    indices = np.arange(start, min(start + batch_size, len(data)))
    padded = np.concatenate([indices, np.full(batch_size - len(indices), indices[-1])])
    rows = {
      k: v
      for k, v in data.rows(padded[mine]).items()
      if k not in ("pair_index", "ref_logps", "sft_weights")
    }
    logps = fn(variables, sharding.global_batch_from_local(rows, mesh))
    if jax.process_count() > 1:
      logps = multihost_utils.process_allgather(logps, tiled=True)
    out[indices] = np.asarray(jax.device_get(logps))[: len(indices)]
  return out


# --------------------------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------------------------


def preference_records(config: ml_collections.ConfigDict) -> tuple[list[dict[str, Any]], Counter]:
  """The configured pairs, from any "pairs" source of `lmm_align.data.registry` (shapes_pairs,
  llava_rlhf, rlaifv_parquet, pairs_jsonl, the TFDS builders), and the skipped counts. Cached
  reference log-probs (RLAIF-V's `logps` column) are the summed ones, or with
  dpo.average_logps the averaged ones (records without those have none)."""
  from lmm_align.data import registry as data_registry

  records, skipped = data_registry.read("pairs", config.data)
  if config.dpo.average_logps:
    for r in records:
      r["ref_logps"] = r.get("ref_avg_logps")
  return records, skipped


def preference_data(
  config: ml_collections.ConfigDict, tokenizer: Any, model_config
) -> preference.PreferenceData:
  records, skipped = preference_records(config)
  pairs = []
  for r in records:
    try:
      pairs.append(
        preference.encode_pair(
          r, tokenizer, config.data.template, model_config.num_image_tokens,
          model_config.image_token_id,
        )
      )  # fmt: skip
    except preference.PreferenceError:
      if config.data.on_error != "skip":
        raise
      skipped["skipped_bad_pair"] += 1
  image_config, tiling = sources.image_batching(config, model_config)
  return preference.PreferenceData(
    pairs, image_config, max_length=config.data.max_length,
    buckets=tuple(config.data.buckets), pad_id=tokenizer.pad_token_id, seed=config.seed,
    token_weight=config.dpo.get("token_weight", 1.0), skipped=skipped, tiling=tiling,
    image_token_id=model_config.image_token_id,
  )  # fmt: skip


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs DPO as configured; returns (and writes to workdir/summary.json) the summary."""
  if not config.init_from:
    raise ValueError(
      "DPO starts from a policy: set config.init_from to an HF folder (e.g. an exported SFT run)"
    )
  if config.optim.grad_accum_steps != 1:
    raise ValueError("the DPO trainer does not accumulate gradients; use a smaller batch_size")
  run = run_setup.start_run(config, workdir)
  model = Llava(run.model_config)
  reference_model = Llava(run.model_config.with_runtime(lora=None))
  data = preference_data(config, run.tokenizer, run.model_config)

  with run.activation_sharding():
    # The policy always starts from init_from: a restore then replaces what it trains.
    params = run_setup.split_params(run, model, source="init_from")
    trained, reference, reference_shards = params.trained, None, None
    if data.ref_logps is not None:
      # Every pair carries the reference log-probs (RLAIF-V's `logps` column): no reference pass.
      print(f"[dpo] reference log-probs from the data ({len(data)} pairs); no reference pass")
    elif config.dpo.precompute_reference:
      # Always from the starting policy, also on a restart: the reference never moves.
      data.set_reference_logps(
        precompute_reference_logps(
          reference_model,
          {"params": params.initial},
          data,
          config.batch_size,
          config.dpo.average_logps,
          run.mesh,
        )
      )
    elif params.base is None:
      # A frozen copy of the starting policy; the state's params move.
      reference, reference_shards = params.initial, params.trained_shardings
      trained = jax.tree.map(jnp.copy, params.initial)
    tx = state_lib.make_optimizer(config, trained)
    state, state_shards = state_lib.create_train_state(
      trained, params.trained_shardings, tx, tuple(config.trainable), config.seed, run.mesh,
      config.optim.state_dtype,
    )  # fmt: skip
    state, _ = run_setup.restore_state(run, state, state_shards, data.fingerprint())
    print(
      f"[dpo] start at step {int(state.step)} from {run.source}; {len(data)} pairs, "
      f"{dict(data.stats)}"
    )
    step_fn = jax.tree_util.Partial(
      dpo_train_step, model=model, reference_model=reference_model, tx=tx,
      trainable=tuple(config.trainable), dpo=config.dpo, state_dtype=config.optim.state_dtype,
    )  # fmt: skip
    train_step = run_setup.jit_step(
      step_fn,
      state_shards,
      run.mesh,
      frozen={"base": params.base, "reference": reference},
      frozen_shardings={"base": params.base_shardings, "reference": reference_shards},
      drop_keys=("pair_index",),
    )

    def evaluate(final):
      if eval_registry.active_kind(config) == eval_registry.NONE:
        return {}  # before merging LoRA: nothing to evaluate
      policy = final.params
      if params.base is not None:
        policy = merge_lora(params.base, final.params, run.model_config.runtime.lora)
      return eval_registry.evaluate(config, workdir, policy)

    return loop.run_loop(
      config, workdir, run.mesh, state, train_step, data, run.checkpointer, evaluate, "dpo"
    )


registry.register(registry.Trainer("dpo", train, restore_policy=export.restore_params))
