"""Scalar heads on the backbone's final hidden states: the reward model and the value model.

One backbone, many heads: the LLaVA module returns `hidden_states` [B, T, D] (after the final
norm); a head maps them to one scalar per position. The reward model reads it at the last
real token of each row; the value model (PPO) reads every position. LLaVA-RLHF starts the
value model from the reward model with a zero-initialised head, so `zero_init` is a switch.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmm_align.models.layers import partitioned

Array = jax.Array


class ScalarHead(nn.Module):
  """hidden [B, T, D] -> float32 [B, T]: a bias-carrying linear map, computed in float32."""

  zero_init: bool = False

  @nn.compact
  def __call__(self, hidden: Array) -> Array:
    init = (
      nn.initializers.zeros if self.zero_init else nn.initializers.normal(hidden.shape[-1] ** -0.5)
    )
    kernel = self.param("kernel", partitioned(init, ("embed",)), (hidden.shape[-1],), jnp.float32)
    bias = self.param("bias", partitioned(nn.initializers.zeros, ()), (), jnp.float32)
    return jnp.einsum("btd,d->bt", hidden.astype(jnp.float32), kernel) + bias


def last_token_index(attention_mask: Array) -> Array:
  """Index of each row's last real token, for right- or left-padded rows: int32[B]."""
  positions = jnp.arange(attention_mask.shape[1])
  return jnp.max(jnp.where(attention_mask > 0, positions, -1), axis=1).astype(jnp.int32)


def sequence_scores(per_position: Array, attention_mask: Array) -> Array:
  """The head's value at each row's last real token: [B, T], [B, T] -> [B]."""
  index = last_token_index(attention_mask)
  return jnp.take_along_axis(per_position, index[:, None], axis=1)[:, 0]
