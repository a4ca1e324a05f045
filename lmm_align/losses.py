"""Token-level losses shared by the trainers. Log-softmax is always in float32.

Conventions: logits [B, T, V] predict the *next* token, so position t scores targets[t + 1];
labels use IGNORE_INDEX (-100) for positions without loss. Losses come back as a sum with its
denominator so that token-weighted means stay exact across micro-batches and hosts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100
Array = jax.Array


def shifted_targets(labels: Array) -> tuple[Array, Array]:
  """labels [B, T] -> (targets [B, T], mask [B, T]) aligned with logits: position t holds the
  label of t + 1; the last position has no target."""
  targets = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE_INDEX)], axis=1)
  mask = targets != IGNORE_INDEX
  return jnp.where(mask, targets, 0), mask


def token_logprobs(logits: Array, targets: Array) -> Array:
  """log p(targets) under logits: [B, T, V], [B, T] -> float32 [B, T]."""
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)


def next_token_nll(logits: Array, labels: Array) -> tuple[Array, Array]:
  """Summed next-token negative log-likelihood over labelled positions, and their count."""
  targets, mask = shifted_targets(labels)
  nll = -token_logprobs(logits, targets)
  return jnp.sum(jnp.where(mask, nll, 0.0)), jnp.sum(mask).astype(jnp.float32)


def sequence_logprobs(logits: Array, labels: Array) -> tuple[Array, Array]:
  """Per-row summed log-probs of the labelled tokens [B], and per-row token counts [B]."""
  targets, mask = shifted_targets(labels)
  logp = jnp.where(mask, token_logprobs(logits, targets), 0.0)
  return jnp.sum(logp, axis=-1), jnp.sum(mask, axis=-1).astype(jnp.float32)
