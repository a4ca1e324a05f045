"""Optimizer pieces against hand-computed expectations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lmm_align import optim


def _config(**overrides):
  config = optim.default_optim_config()
  config.update(overrides)
  return config


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedules_by_hand(schedule):
  lr = optim.learning_rate_schedule(
    _config(lr=1.0, schedule=schedule, warmup_steps=10, end_lr_factor=0.1), 110
  )
  np.testing.assert_allclose(float(lr(0)), 0.0)
  np.testing.assert_allclose(float(lr(5)), 0.5)
  np.testing.assert_allclose(float(lr(10)), 1.0)
  progress = 0.5  # step 60: half-way through the 100 decay steps
  expected = {
    "cosine": 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * progress)),
    "linear": 1.0 - 0.9 * progress,
    "constant": 1.0,
  }[schedule]
  np.testing.assert_allclose(float(lr(60)), expected, rtol=1e-5)


def test_warmup_ratio():
  lr = optim.learning_rate_schedule(
    _config(lr=2.0, warmup_steps=-1, warmup_ratio=0.1, schedule="constant"), 200
  )
  np.testing.assert_allclose(float(lr(10)), 1.0)  # 20 warmup steps


PARAMS = {
  "vision_tower": {"fc1": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}},
  "multi_modal_projector": {"linear_1": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)}},
  "language_model": {"norm": {"scale": jnp.ones(4)}, "lm_head": {"kernel": jnp.ones((4, 5))}},
}


def test_split_and_merge_by_regex():
  train, frozen = optim.split_trainable(PARAMS, ("multi_modal_projector/.*",))
  assert set(train) == {"multi_modal_projector"}
  assert set(frozen) == {"vision_tower", "language_model"}
  merged = optim.merge_params(train, frozen)
  assert jax.tree.structure(merged) == jax.tree.structure(PARAMS)
  with pytest.raises(ValueError, match="matches no parameter"):
    optim.check_patterns_match(PARAMS, ("projector_typo/.*",), "config.trainable")


def test_adamw_decay_mask_and_lr_groups_by_hand():
  config = _config(
    lr=0.1, schedule="constant", warmup_steps=0, weight_decay=0.5, grad_clip_norm=0.0,
    lr_groups=(("language_model/lm_head/.*", 2.0),),
  )  # fmt: skip
  tx = optim.build_optimizer(config, PARAMS, 10)
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  state = optim.init_optimizer_state(tx, PARAMS, "float32")
  new, _ = optim.apply_optimizer(tx, grads, state, PARAMS, "float32")
  # First Adam step with constant gradients: the normalised update is 1 (bias-corrected).
  adam = 1.0 / (1.0 + 1e-8)
  np.testing.assert_allclose(
    new["vision_tower"]["fc1"]["bias"], 1 - 0.1 * adam, rtol=1e-5
  )  # no decay
  np.testing.assert_allclose(
    new["vision_tower"]["fc1"]["kernel"], 1 - 0.1 * (adam + 0.5), rtol=1e-5
  )
  np.testing.assert_allclose(new["language_model"]["norm"]["scale"], 1 - 0.1 * adam, rtol=1e-5)
  np.testing.assert_allclose(
    new["language_model"]["lm_head"]["kernel"], 1 - 2 * 0.1 * (adam + 0.5), rtol=1e-5
  )


def test_bfloat16_params_get_float32_moments():
  params = {"w": jnp.ones((3,), jnp.bfloat16)}
  tx = optax.adam(0.1)
  state = optim.init_optimizer_state(tx, params, "float32")
  assert state[0].mu["w"].dtype == jnp.float32 and state[0].nu["w"].dtype == jnp.float32
  new, state = optim.apply_optimizer(
    tx, {"w": jnp.full((3,), 0.5, jnp.bfloat16)}, state, params, "float32"
  )
  assert new["w"].dtype == jnp.bfloat16 and state[0].mu["w"].dtype == jnp.float32


def test_clipping_by_global_norm():
  config = _config(
    lr=1.0, schedule="constant", warmup_steps=0, grad_clip_norm=1.0, b1=0.0, b2=0.0, eps=0.0
  )
  params = {"a": jnp.zeros(2)}
  tx = optim.build_optimizer(config, params, 1)
  clipped, _ = tx.update({"a": jnp.array([3.0, 4.0])}, tx.init(params), params)
  # b1 = b2 = 0: the Adam update is sign(g) whatever the scale; the clip is checked in isolation.
  np.testing.assert_allclose(clipped["a"], [-1.0, -1.0], rtol=1e-6)
  only_clip, _ = optax.clip_by_global_norm(1.0).update({"a": jnp.array([3.0, 4.0])}, None)
  np.testing.assert_allclose(only_clip["a"], [0.6, 0.8], rtol=1e-6)
