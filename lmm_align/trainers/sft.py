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

from lmm_align import checkpoint, losses, optim, sharding
from lmm_align.data import sources
from lmm_align.models.llava import Llava
from lmm_align.trainers import loop, modelling
from lmm_align.trainers import state as state_lib

# --------------------------------------------------------------------------------------------
# The step.
# --------------------------------------------------------------------------------------------


def model_variables(trained: Any, base_params: Any) -> dict[str, Any]:
  """{"params": ...} for a full fine-tune; {"params": base, "lora": adapters} for LoRA."""
  if base_params is None:
    return {"params": trained}
  return {"params": base_params, "lora": trained}


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
        pixel_values=micro.get("pixel_values"),
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
  loop.write_config(config, workdir)
  mesh = sharding.mesh_from_config(config.mesh)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  tokenizer = sources.tokenizer_for(config, workdir)
  model_config = modelling.model_config_for(config, tokenizer)
  model = Llava(model_config)
  data = sources.sft_data(config, tokenizer, model_config)
  global_batch = config.batch_size
  if global_batch % (sharding.data_parallel_size(mesh) * config.optim.grad_accum_steps):
    raise ValueError(
      f"batch_size {global_batch} must divide by data x fsdp ({sharding.data_parallel_size(mesh)}) "
      f"x grad_accum_steps ({config.optim.grad_accum_steps})"
    )

  checkpointer = checkpoint.Checkpointer.for_workdir(workdir, keep=config.keep_checkpoints)
  source, where = checkpoint.restore_precedence(
    workdir, config.resume, config.init_from, checkpointer
  )
  with sharding.activation_sharding(mesh, rules):
    param_shards = state_lib.param_shardings(model, mesh, rules)
    params = modelling.initial_params(model, config, source, where, param_shards)
    params, param_shards, base_params, base_shards = modelling.with_lora_split(
      model, params, param_shards, mesh, rules, jax.random.key(config.seed)
    )
    tx = state_lib.make_optimizer(config, params)
    state, state_shards = state_lib.create_train_state(
      params, param_shards, tx, tuple(config.trainable), config.seed, mesh, config.optim.state_dtype
    )
    data_state = {"step": 0, **data.fingerprint()}
    if source in ("workdir", "resume"):
      state, data_state = checkpoint.restore_from(
        source, where, checkpointer, checkpoint.abstract_like(state, state_shards)
      )
      modelling.check_data_fingerprint(data_state, data.fingerprint(), source)
    start_step = int(state.step)
    print(
      f"[sft] start at step {start_step} from {source}; {len(data)} examples, data stats {dict(data.stats)}"
    )

    step_fn = jax.tree_util.Partial(
      sft_train_step,
      model=model,
      tx=tx,
      trainable=tuple(config.trainable),
      grad_accum_steps=config.optim.grad_accum_steps,
      state_dtype=config.optim.state_dtype,
    )
    jitted = state_lib.jit_train_step(
      lambda s, b, f: step_fn(s, b, f), state_shards, mesh, base_shards
    )
    train_step = lambda s, b: jitted(s, b, base_params)
    evaluate = lambda final: _evaluate(config, workdir, final, base_params)
    summary = loop.run_loop(
      config, workdir, mesh, state, train_step, data, checkpointer, evaluate, "sft"
    )
  return summary


def _evaluate(config, workdir, state, base_params) -> dict[str, Any]:
  if not config.eval.enabled:
    return {}
  from lmm_align.evals import shapes_eval
  from lmm_align.models.lora import merge_lora

  params = state.params
  if base_params is not None:  # evaluate the merged model: one matmul per layer, as exported
    params = merge_lora(base_params, state.params, modelling.lora_for(config))
  return shapes_eval.evaluate_workdir_model(config, workdir, params)
