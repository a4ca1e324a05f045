"""The optax optimizer a config describes: schedules, clipping, AdamW with a weight-decay mask,
per-group learning rates, and regex freeze masks.

Params are addressed by their '/'-joined path (e.g. `language_model/layers/q_proj/kernel`;
scanned layers have no index). `trainable` regexes select what is trained; everything else is
frozen and never enters the optimizer state or the gradient computation (`split_trainable`).
LLaVA stage 1: ("multi_modal_projector/.*",); stage 2 adds "language_model/.*".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax


def path_str(path: tuple) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def regex_mask(params: Any, patterns: Sequence[str]) -> Any:
  """A bool pytree: True where the param's path fully matches one of the regexes."""
  compiled = [re.compile(p) for p in patterns]
  return jax.tree_util.tree_map_with_path(
    lambda path, _: any(c.fullmatch(path_str(path)) for c in compiled), params
  )


def check_patterns_match(params: Any, patterns: Sequence[str], what: str) -> None:
  """A regex that matches no param is almost always a typo: refuse it."""
  paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  for pattern in patterns:
    if not any(re.fullmatch(pattern, p) for p in paths):
      raise ValueError(f"{what} pattern {pattern!r} matches no parameter; examples: {paths[:5]}")


def split_trainable(params: dict, trainable: Sequence[str]) -> tuple[dict, dict]:
  """(trainable, frozen): two nested dicts that partition the params' leaves."""
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  compiled = [re.compile(p) for p in trainable]
  train = {k: v for k, v in flat.items() if any(c.fullmatch(k) for c in compiled)}
  frozen = {k: v for k, v in flat.items() if k not in train}
  return flax.traverse_util.unflatten_dict(train, sep="/"), flax.traverse_util.unflatten_dict(
    frozen, sep="/"
  )


def merge_params(trainable: dict, frozen: dict) -> dict:
  flat = flax.traverse_util.flatten_dict(frozen)
  flat.update(flax.traverse_util.flatten_dict(trainable))
  return flax.traverse_util.unflatten_dict(flat)


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0, then cosine / linear decay to lr * end_lr_factor, or constant."""
  warmup = optim.warmup_steps if optim.warmup_steps >= 0 else int(optim.warmup_ratio * total_steps)
  decay_steps = max(total_steps - warmup, 1)
  end = optim.lr * optim.end_lr_factor
  if optim.schedule == "cosine":
    decay = optax.cosine_decay_schedule(optim.lr, decay_steps, alpha=optim.end_lr_factor)
  elif optim.schedule == "linear":
    decay = optax.linear_schedule(optim.lr, end, decay_steps)
  elif optim.schedule == "constant":
    decay = optax.constant_schedule(optim.lr)
  else:
    raise ValueError(f"optim.schedule {optim.schedule!r}: use cosine, linear or constant")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), decay], [warmup])


def scale_by_multipliers(multipliers: Any) -> optax.GradientTransformation:
  """Multiplies each update by a static per-param factor (per-group learning rates)."""

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, multipliers), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def lr_multipliers(params: Any, groups: Sequence[tuple[str, float]]) -> Any:
  """Per-param learning-rate factor: the first matching (regex, factor) group, else 1."""
  compiled = [(re.compile(p), float(m)) for p, m in groups]

  def factor(path, _):
    name = path_str(path)
    return next((m for c, m in compiled if c.fullmatch(name)), 1.0)

  return jax.tree_util.tree_map_with_path(factor, params)


def build_optimizer(
  optim: ml_collections.ConfigDict, trainable_params: Any, total_steps: int
) -> optax.GradientTransformation:
  """clip(global norm) -> AdamW(schedule, decay mask) -> per-group lr factors."""
  decay_mask = jax.tree.map(
    lambda excluded: not excluded, regex_mask(trainable_params, optim.weight_decay_exclude)
  )
  parts = []
  if optim.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim.grad_clip_norm))
  parts.append(
    optax.adamw(
      learning_rate_schedule(optim, total_steps),
      b1=optim.b1,
      b2=optim.b2,
      eps=optim.eps,
      weight_decay=optim.weight_decay,
      mask=decay_mask,
    )
  )
  if optim.lr_groups:
    groups = [tuple(g) for g in optim.lr_groups]
    check_patterns_match(trainable_params, [g[0] for g in groups], "optim.lr_groups")
    parts.append(scale_by_multipliers(lr_multipliers(trainable_params, groups)))
  return optax.chain(*parts)


def default_optim_config() -> ml_collections.ConfigDict:
  """The optimizer fields every trainer config carries (override per experiment)."""
  return ml_collections.ConfigDict(
    dict(
      lr=2e-5,
      schedule="cosine",
      warmup_steps=-1,  # -1: use warmup_ratio
      warmup_ratio=0.03,
      end_lr_factor=0.0,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.0,
      weight_decay_exclude=(".*bias", ".*norm.*", ".*scale", ".*embedding", ".*class_embedding"),
      grad_clip_norm=1.0,
      grad_accum_steps=1,
      lr_groups=(),  # ((regex, factor), ...)
      state_dtype="float32",  # Adam moments (and the update math) in fp32, even for bf16 params
    )
  )


def _cast(tree: Any, dtype: str) -> Any:
  return jax.tree.map(
    lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
  )


def init_optimizer_state(tx: optax.GradientTransformation, trainable: Any, state_dtype: str) -> Any:
  """Optimizer state in `state_dtype` (fp32 moments for bf16 params)."""
  return tx.init(_cast(trainable, state_dtype))


def apply_optimizer(
  tx: optax.GradientTransformation, grads: Any, opt_state: Any, trainable: Any, state_dtype: str
):
  """One optimizer update done in `state_dtype`; the new params keep their own dtype."""
  updates, opt_state = tx.update(
    _cast(grads, state_dtype), opt_state, _cast(trainable, state_dtype)
  )
  new = jax.tree.map(lambda p, u: (p.astype(u.dtype) + u).astype(p.dtype), trainable, updates)
  return new, opt_state
