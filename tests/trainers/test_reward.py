"""Reward model: scalar head at the last real token, Bradley-Terry step on pair batches."""

from __future__ import annotations

import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.shapes import reward as shapes_reward
from lmm_align import optim
from lmm_align.models import Llava, get_variant
from lmm_align.models.heads import ScalarHead, last_token_index, sequence_scores
from lmm_align.models.llava import dummy_inputs
from lmm_align.trainers import state as state_lib
from lmm_align.trainers.reward import facts_position, pair_rewards, reward_train_step


def test_last_token_index_for_either_padding_side():
  mask = jnp.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(last_token_index(mask), [2, 4, 0])
  values = jnp.arange(15.0).reshape(3, 5)
  np.testing.assert_array_equal(sequence_scores(values, mask), [2.0, 9.0, 10.0])


def _setup():
  config = get_variant("tiny")
  model = Llava(config)
  backbone = flax.linen.unbox(
    jax.jit(model.init)(jax.random.key(0), *dummy_inputs(config))["params"]
  )
  head = ScalarHead()
  head_params = flax.linen.unbox(
    head.init(jax.random.key(1), jnp.zeros((1, 1, config.text.hidden_size)))
  )["params"]
  rng = np.random.default_rng(0)
  ids = rng.integers(5, config.text.vocab_size, size=(4, 2, 12)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[:, 1, 9:] = 0  # the rejected answers are shorter: right padding
  batch = {"input_ids": ids, "attention_mask": mask, "labels": np.where(mask > 0, ids, -100)}
  return config, model, head, backbone, head_params, batch


def test_rewards_are_the_head_at_the_last_real_token():
  config, model, head, backbone, head_params, batch = _setup()
  rewards = pair_rewards(model, head, {"params": backbone}, head_params, batch)
  for side, last in ((0, 11), (1, 8)):
    hidden = model.apply(
      {"params": backbone},
      batch["input_ids"][:, side],
      attention_mask=batch["attention_mask"][:, side],
    ).hidden_states
    expected = np.asarray(hidden[:, last]) @ np.asarray(head_params["kernel"]) + float(
      head_params["bias"]
    )
    np.testing.assert_allclose(rewards[:, side], expected, atol=1e-5)


def test_bradley_terry_step_raises_the_margin():
  config, model, head, backbone, head_params, batch = _setup()
  params = {"backbone": backbone, "head": head_params}
  tx = optax.adam(1e-3)
  state = state_lib.TrainState(
    step=jnp.zeros((), jnp.int32), params=params, opt_state=optim.init_optimizer_state(tx, params, "float32"),
    rng=jax.random.key_data(jax.random.key(0)),
  )  # fmt: skip
  step = jax.jit(lambda s, b: reward_train_step(
    s, b, None, model=model, head=head, tx=tx, trainable=(".*",), centering_coef=1e-3,
    centering="abs_mean", state_dtype="float32",
  ))  # fmt: skip
  margins = []
  for _ in range(5):
    state, metrics = step(state, batch)
    margins.append(float(metrics["margin"]))
  assert margins[-1] > margins[0] and float(metrics["accuracy"]) == 1.0
  assert int(state.step) == 5


def test_pairs_jsonl_reward_records_keep_facts_and_load_images_lazily(tmp_path):
  from PIL import Image

  from configs.shapes import reward as shapes_reward
  from lmm_align import main
  from lmm_align.trainers.reward import reward_records

  Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "a.png")
  pair = {"id": "p#0|p#1", "image": "a.png", "question": "Describe the image.",
          "chosen": "A red circle.", "rejected": "A red star.", "facts": ["A red circle."]}  # fmt: skip
  (tmp_path / "pairs.jsonl").write_text(json.dumps(pair) + "\n")
  config = main.apply_overrides(
    shapes_reward.get_config("runlocal"),
    {"data.source": "pairs_jsonl", "data.path": str(tmp_path / "pairs.jsonl"),
     "data.image_folder": str(tmp_path)},
  )  # fmt: skip
  (record,), skipped = reward_records(config)
  assert (
    not skipped and record["facts"] == ["A red circle."] and record["rejected"] == "A red star."
  )
  assert record["image"]().getpixel((0, 0)) == (255, 0, 0)


def test_facts_position_is_read_from_the_config_and_a_bad_one_is_named():
  config = shapes_reward.get_config("runlocal")
  assert facts_position(config) == "after_response"
  config.reward.facts_position = "before_response"
  assert facts_position(config) == "before_response"
  config.reward.facts_position = "inside"
  with pytest.raises(ValueError, match=r"config.reward.facts_position='inside'"):
    facts_position(config)
  del config.reward["facts_position"]  # a workdir's config written before the setting
  assert facts_position(config) == "after_response"


def test_fact_lead_in_is_read_from_the_config():
  from lmm_align.data.reward_data import DEFAULT_FACT_LEAD_IN
  from lmm_align.trainers.reward import fact_lead_in

  config = shapes_reward.get_config("runlocal")
  assert fact_lead_in(config) == DEFAULT_FACT_LEAD_IN  # "" = the default
  config.reward.fact_lead_in = "Facts:\n"
  assert fact_lead_in(config) == "Facts:\n"
  del config.reward["fact_lead_in"]  # a workdir's config written before the setting
  assert fact_lead_in(config) == DEFAULT_FACT_LEAD_IN
