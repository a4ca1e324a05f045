"""The train state every trainer carries, its sharded creation, and the jitted step wrapper.

Sharded init never materialises full weights on one device: the param tree's shapes come
from `jax.eval_shape`, their shardings from the logical rules, and the params are created by
`jax.jit(init, out_shardings=...)` (or loaded straight into those shardings from HF).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from lmm_align import optim, sharding
from lmm_align.models.heads import ScalarHead
from lmm_align.models.llava import Llava, dummy_inputs


@flax.struct.dataclass
class TrainState:
  """step: int32 []; params: every param (the trainable subset is chosen by regex in the step);
  opt_state: over the trainable subset only; rng: uint32 key data (orbax stores it as is)."""

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array

  def key(self) -> jax.Array:
    """A fresh key for this step."""
    return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


def param_shardings(model: Llava, mesh: Mesh, rules, collection: str = "params") -> Any:
  """Shardings of one variable collection ("params", or "lora" for the adapters)."""
  boxed = jax.eval_shape(model.init, jax.random.key(0), *dummy_inputs(model.config))[collection]
  return sharding.logical_shardings(boxed, mesh, rules)


def init_params_sharded(
  model: Llava, rng: jax.Array, shardings: Any, collection: str = "params"
) -> Any:
  """One collection's initial values, created in place on their shards by a jitted init."""
  init = lambda key: nn.unbox(model.init(key, *dummy_inputs(model.config))[collection])
  return jax.jit(init, out_shardings=shardings)(rng)


def opt_state_shardings(
  tx: optax.GradientTransformation,
  trainable_abstract: Any,
  trainable_shardings: Any,
  mesh: Mesh,
  state_dtype: str,
) -> Any:
  """Shardings of the optimizer state: moments follow their params, counters are replicated."""
  abstract_state = jax.eval_shape(
    lambda p: optim.init_optimizer_state(tx, p, state_dtype), trainable_abstract
  )
  return optax.tree_map_params(
    tx,
    lambda _, s: s,
    abstract_state,
    trainable_shardings,
    transform_non_params=lambda _: sharding.replicated(mesh),
    is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct),
  )


def create_train_state(
  params: Any,
  param_shards: Any,
  tx: optax.GradientTransformation,
  trainable: tuple[str, ...],
  seed: int,
  mesh: Mesh,
  state_dtype: str,
) -> tuple[TrainState, TrainState]:
  """(state, shardings of the state): the optimizer state created under jit in its shardings."""
  trainable_params, _ = optim.split_trainable(params, trainable)
  trainable_shards, _ = optim.split_trainable(param_shards, trainable)
  opt_shards = opt_state_shardings(
    tx, jax.eval_shape(lambda: trainable_params), trainable_shards, mesh, state_dtype
  )
  opt_state = jax.jit(
    lambda p: optim.init_optimizer_state(tx, p, state_dtype), out_shardings=opt_shards
  )(trainable_params)
  rep = sharding.replicated(mesh)
  rng = jax.device_put(jax.random.key_data(jax.random.key(seed)), rep)
  state = TrainState(
    step=jax.device_put(jnp.zeros((), jnp.int32), rep), params=params, opt_state=opt_state, rng=rng
  )
  shardings = TrainState(step=rep, params=param_shards, opt_state=opt_shards, rng=rep)
  return state, shardings


def jit_train_step(
  step_fn: Callable, state_shardings: TrainState, mesh: Mesh, frozen_shardings: Any = None
) -> Callable:
  """The step jitted once with explicit shardings and the state donated.

  step_fn(state, batch, frozen) -> (state, metrics); the batch's arrays arrive already placed
  (batch-sharded global arrays); `frozen` holds params that are never trained (a LoRA base,
  a reference policy): not donated, never in the optimizer state. Metrics come back replicated.
  """
  return jax.jit(
    step_fn,
    in_shardings=(state_shardings, None, frozen_shardings),
    out_shardings=(state_shardings, sharding.replicated(mesh)),
    donate_argnums=(0,),
  )


def apply_gradients(
  state: TrainState,
  grads: Any,
  tx: optax.GradientTransformation,
  trainable_params: Any,
  frozen_params: Any,
  state_dtype: str,
) -> TrainState:
  """The next state: one optimizer update of the trainable params, the frozen ones kept."""
  new_trainable, opt_state = optim.apply_optimizer(
    tx, grads, state.opt_state, trainable_params, state_dtype
  )
  return state.replace(
    step=state.step + 1,
    params=optim.merge_params(new_trainable, frozen_params),
    opt_state=opt_state,
  )


def with_step_metrics(metrics: dict, grads: Any, batch: dict) -> dict:
  """A step's loss metrics plus the gradient norm and the batch's real-token count."""
  return dict(
    metrics,
    grad_norm=optax.global_norm(grads),
    input_tokens=jnp.sum(batch["attention_mask"]).astype(jnp.float32),
  )


def make_optimizer(config: ml_collections.ConfigDict, params: Any) -> optax.GradientTransformation:
  trainable_params, _ = optim.split_trainable(params, tuple(config.trainable))
  optim.check_patterns_match(params, tuple(config.trainable), "config.trainable")
  return optim.build_optimizer(config.optim, trainable_params, config.total_steps)


def init_head(head: ScalarHead, hidden: int, mesh, rules, key: jax.Array) -> tuple[Any, Any]:
  """(params, shardings) of a scalar head over hidden states of width `hidden`."""
  boxed = jax.eval_shape(head.init, jax.random.key(0), jnp.zeros((1, 1, hidden)))["params"]
  shardings = sharding.logical_shardings(boxed, mesh, rules)
  params = jax.jit(
    lambda k: nn.unbox(head.init(k, jnp.zeros((1, 1, hidden))))["params"], out_shardings=shardings
  )(key)
  return params, shardings
