"""Supervised fine-tuning: LLaVA label masking, stage-1 / stage-2 freezing by regex, sharded.

Read top to bottom: the pure train step, then `train`, which builds the mesh, the data, the
model (from scratch or an HF folder), restores by the written-down precedence, runs the loop
and evaluates.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from lmm_align import losses, optim, run_config, sharding
from lmm_align.data import pipeline, sources
from lmm_align.evals import registry as eval_registry
from lmm_align.models.llava import Llava
from lmm_align.models.lora import model_variables
from lmm_align.trainers import export, loop, registry, run_setup
from lmm_align.trainers import state as state_lib

# --------------------------------------------------------------------------------------------
# The step.
# --------------------------------------------------------------------------------------------


def _micro_batches(batch: dict, accum: int) -> dict:
  """[G, ...] -> [accum, G / accum, ...]; each device keeps its own rows in every micro-batch."""

  def split(x):
    x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:])
    return jnp.moveaxis(x, 1, 0)

  return jax.tree.map(split, batch)


def sft_train_step(
  state: state_lib.TrainState,
  batch: dict[str, jax.Array],
  base_params: Any,
  *,
  model: Llava,
  tx: optax.GradientTransformation,
  trainable: tuple[str, ...],
  grad_accum_steps: int,
  state_dtype: str,
) -> tuple[state_lib.TrainState, dict[str, jax.Array]]:
  """One optimizer step on a global batch: token-weighted mean NLL over the labelled tokens of
  all micro-batches (so accumulation gives the same update as one big batch).

  state.params are the model's params, or with LoRA its adapters; then `base_params` holds
  the frozen base (never differentiated, never in the optimizer state), else it is None.
  """
  trainable_params, frozen_params = optim.split_trainable(state.params, trainable)
  _, mask = losses.shifted_targets(batch["labels"])
  total_tokens = jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)

  def micro_step(grads, indexed):
    micro_index, micro = indexed

    def loss_fn(params):
      out = model.apply(
        model_variables(optim.merge_params(params, frozen_params), base_params),
        micro["input_ids"],
        **pipeline.image_inputs(micro),  # pixel_values, and an anyres batch's pack plan
        attention_mask=micro["attention_mask"],
        rngs={"dropout": jax.random.fold_in(state.key(), micro_index)},
      )
      nll_sum, count = losses.next_token_nll(out.logits, micro["labels"])
      return nll_sum / total_tokens, (nll_sum, count)

    (_, (nll_sum, count)), micro_grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable_params)
    return jax.tree.map(jnp.add, grads, micro_grads), (nll_sum, count)

  zeros = jax.tree.map(jnp.zeros_like, trainable_params)
  micro = (jnp.arange(grad_accum_steps), _micro_batches(batch, grad_accum_steps))
  grads, (nll_sums, counts) = jax.lax.scan(micro_step, zeros, micro)
  grad_norm = optax.global_norm(grads)
  new_state = state_lib.apply_gradients(
    state, grads, tx, trainable_params, frozen_params, state_dtype
  )
  metrics = {
    "loss_sum": jnp.sum(nll_sums),
    "tokens": jnp.sum(counts),
    "input_tokens": jnp.sum(batch["attention_mask"]).astype(jnp.float32),
    "grad_norm": grad_norm,
  }
  return new_state, metrics


# --------------------------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------------------------


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs SFT as configured; returns (and writes to workdir/summary.json) the final summary."""
  run = run_setup.start_run(config, workdir)
  model = Llava(run.model_config)
  data = sources.sft_data(config, run.tokenizer, run.model_config)
  global_batch = config.batch_size
  if global_batch % (sharding.data_parallel_size(run.mesh) * config.optim.grad_accum_steps):
    raise ValueError(
      f"batch_size {global_batch} must divide by data x fsdp "
      f"({sharding.data_parallel_size(run.mesh)}) x grad_accum_steps "
      f"({config.optim.grad_accum_steps})"
    )
  with run.activation_sharding():
    params = run_setup.split_params(run, model)
    tx = state_lib.make_optimizer(config, params.trained)
    state, state_shards = state_lib.create_train_state(
      params.trained, params.trained_shardings, tx, tuple(config.trainable), config.seed,
      run.mesh, config.optim.state_dtype,
    )  # fmt: skip
    state, _ = run_setup.restore_state(run, state, state_shards, data.fingerprint())
    print(
      f"[sft] start at step {int(state.step)} from {run.source}; {len(data)} examples, "
      f"data stats {dict(data.stats)}"
    )
    step_fn = jax.tree_util.Partial(
      sft_train_step,
      model=model,
      tx=tx,
      trainable=tuple(config.trainable),
      grad_accum_steps=config.optim.grad_accum_steps,
      state_dtype=config.optim.state_dtype,
    )
    train_step = run_setup.jit_step(
      step_fn, state_shards, run.mesh, params.base, params.base_shardings
    )
    evaluate = lambda final: _evaluate(config, workdir, final, params.base)
    return loop.run_loop(
      config, workdir, run.mesh, state, train_step, data, run.checkpointer, evaluate, "sft"
    )


def _evaluate(config, workdir, state, base_params) -> dict[str, Any]:
  if eval_registry.active_kind(config) == eval_registry.NONE:
    return {}  # before merging LoRA: nothing to evaluate
  from lmm_align.models.lora import merge_lora

  params = state.params
  if base_params is not None:  # evaluate the merged model: one matmul per layer, as exported
    params = merge_lora(base_params, state.params, run_config.lora_for(config))
  return eval_registry.evaluate(config, workdir, params)


registry.register(registry.Trainer("sft", train, restore_policy=export.restore_params))
