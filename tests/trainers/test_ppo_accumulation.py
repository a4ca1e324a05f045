"""trainers/ppo.py's update with gradient accumulation: micro-batches give the update and the
metrics of the whole minibatch (masked token means and means over every column alike)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from lmm_align.models.heads import ScalarHead
from lmm_align.models.llava import Llava, init_params
from lmm_align.models.variants import get_variant
from lmm_align.trainers import ppo
from lmm_align.trainers import state as state_lib

ROWS, QUERY, NEW = 4, 6, 5


def _batch(rng: np.random.Generator) -> dict:
  mask = np.ones((ROWS, NEW), np.int32)
  mask[1, 3:] = 0  # ragged responses: micro-batches hold different token counts
  mask[2, 1:] = 0
  return {
    "input_ids": jnp.asarray(rng.integers(5, 500, (ROWS, QUERY + NEW)), jnp.int32),
    "attention_mask": jnp.ones((ROWS, QUERY + NEW), jnp.int32),
    "response_mask": jnp.asarray(mask),
    "old_logps": jnp.asarray(rng.normal(-6.0, 0.5, (ROWS, NEW)), jnp.float32),
    "old_values": jnp.asarray(rng.normal(0.0, 0.1, (ROWS, NEW)), jnp.float32),
    "advantages": jnp.asarray(rng.normal(0.0, 1.0, (ROWS, NEW)), jnp.float32),
    "returns": jnp.asarray(rng.normal(0.0, 1.0, (ROWS, NEW)), jnp.float32),
  }


@pytest.mark.parametrize("mean_over_padding", [False, True])
def test_accumulated_update_equals_one_minibatch(mean_over_padding):
  config = get_variant("tiny", scan_layers=False)
  model, head = Llava(config), ScalarHead(zero_init=False)
  params = {
    "policy": init_params(config, jax.random.key(0)),
    "value": {
      "backbone": init_params(config, jax.random.key(1)),
      "head": head.init(jax.random.key(2), jnp.zeros((1, 1, config.text.hidden_size)))["params"],
    },
  }
  tx = optax.sgd(0.5)
  state = state_lib.TrainState(
    step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
    rng=jax.random.key_data(jax.random.key(3)),
  )  # fmt: skip
  knobs = ml_collections.ConfigDict(
    dict(temperature=1.0, clip_eps=0.2, clip_value=0.2, vf_coef=0.1,
         mean_over_padding=mean_over_padding)
  )  # fmt: skip
  frozen = {"policy_base": None, "value_base": None}
  batch = _batch(np.random.default_rng(0))

  def step(accum):
    return jax.jit(
      lambda s, b: ppo.ppo_train_step(
        s, b, frozen, policy_model=model, value_model=model, value_head=head, tx=tx,
        trainable=(".*",), ppo=knobs, state_dtype="float32", grad_accum_steps=accum,
      )
    )(state, batch)  # fmt: skip

  (one, one_metrics), (two, two_metrics) = step(1), step(2)
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params), strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  assert set(one_metrics) == set(two_metrics)
  for name in one_metrics:
    np.testing.assert_allclose(one_metrics[name], two_metrics[name], rtol=2e-5, err_msg=name)
  moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in
              zip(jax.tree.leaves(one.params), jax.tree.leaves(params)))  # fmt: skip
  assert moved > 1e-4  # the step did update something
