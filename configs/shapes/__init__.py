"""Configs of the synthetic shapes world (the test bed): SFT, reward model, PPO, DPO, iterative DPO.

Each starts from `base_config()`: `configs.common.base_config()` with the world's data block
(`data.shapes`, which the shapes sources of `lmm_align.shapes.data` read) and its held-out-scene
evaluation (`eval.kind="shapes"`).
"""

import ml_collections

from configs import common


def data_config() -> ml_collections.ConfigDict:
  """config.data.shapes: the world (`lmm_align.shapes.data.world_config`) and its record counts."""
  return ml_collections.ConfigDict(
    dict(
      num_train=4000,
      seed=0,
      image_size=48,
      hallucination_rate=0.3,
      max_objects=3,
      vocab_size=600,
      tokenizer_records=2000,
      eval_seed=12345,
      # Ground-truth preference / reward pairs: the share whose rejected caption leaves an
      # object out, or has a binding error (a colour or shape moved to another present
      # object); the rest carry an injected hallucination (shapes.caption_pair).
      omission_fraction=0.3,
      binding_fraction=0.0,
      # shapes_pairs: "reward" (captions and yes/no questions, with facts: the reward model's
      # ground truth) or "captions" (caption pairs only: DPO's).
      pair_set="reward",
    )
  )


def base_config() -> ml_collections.ConfigDict:
  """`common.base_config()` on the shapes world: data.shapes and the evaluation kind "shapes"
  (still off until a recipe sets eval.enabled)."""
  config = common.base_config()
  config.data.shapes = data_config()
  config.eval.kind = "shapes"
  return config
