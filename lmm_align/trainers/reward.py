"""Bradley-Terry reward-model training step (LLaVA-RLHF): the backbone plus a scalar head,
read at each sequence's last real token, on preference pairs [B, 2, T] (0 chosen, 1 rejected).

The state's params are {"backbone": ..., "head": ...}; with LoRA the backbone entry holds the
adapters and the frozen base is passed separately, as in the SFT and DPO steps.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from lmm_align import optim, preference_losses
from lmm_align.models.heads import ScalarHead, sequence_scores
from lmm_align.models.llava import Llava
from lmm_align.trainers import state as state_lib
from lmm_align.trainers.sft import model_variables


def pair_rewards(
  model: Llava, head: ScalarHead, backbone_variables: dict, head_params: Any, batch: dict
) -> jax.Array:
  """Scalar rewards [B, 2] of a pair batch: the head at each sequence's last real token."""
  b = batch["input_ids"].shape[0]
  flat = lambda x: x.reshape(b * 2, *x.shape[2:])
  pixels = flat(batch["pixel_values"]) if "pixel_values" in batch else None
  mask = flat(batch["attention_mask"])
  out = model.apply(
    backbone_variables,
    flat(batch["input_ids"]),
    pixel_values=pixels,
    attention_mask=mask,
    with_logits=False,
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
