"""The shapes oracle ("scene" in `rl.oracles`): PPO's reward_source=scene and its monitor,
against hand-worked scores."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest

from lmm_align.rl import oracles, rewards
from lmm_align.shapes import world as shapes
from lmm_align.trainers import ppo


def test_scene_scores_are_the_ground_truth_on_descriptions_only():
  """-(hallucinated mentions) + w * (objects recalled), worked by hand; yes/no answers +-1
  by POPE's reading against the truth."""
  scene = shapes.Scene(
    (
      shapes.SceneObject("circle", "red", "small", 0, 0),
      shapes.SceneObject("star", "blue", "large", 1, 1),
    )
  ).to_dict()
  prompt = lambda caption_type, scene=scene: ppo.Prompt(
    "p", "q", np.zeros(1, np.int32), None, caption_type, 1.0, [], None,
    {"scene": scene} if scene else {},
  )  # fmt: skip
  texts = [
    "A red circle and a green square.",  # 1 hallucinated, 1 recalled
    "A red circle and a blue star.",  # 0 hallucinated, 2 recalled
    "Yes, there is a red circle.",
    "No.",
    "No, there is not.",
  ]
  yes, no = rewards.YES_IN_YESNO, rewards.NO_IN_YESNO
  prompts = [prompt(rewards.GENERAL), prompt(rewards.GENERAL), prompt(yes), prompt(yes), prompt(no)]
  knobs = ml_collections.ConfigDict({"scene_recall_weight": 0.5})
  oracle = oracles.get("scene")
  expected = [-0.5, 1.0, 1.0, -1.0, 1.0]
  np.testing.assert_allclose(oracles.score(oracle, prompts, texts, knobs), expected)
  assert oracles.monitor_for(prompts) == oracle
  # The monitor beside a reward model: the mean of those scores and Pearson's r against it.
  rm = np.array([2.0, 1.0, 0.0, 3.0, -1.0])
  monitor = oracles.monitor(oracle, prompts, texts, rm, knobs)
  assert monitor["reward/scene"] == pytest.approx(np.mean(expected))
  assert monitor["reward/rm_scene_corr"] == pytest.approx(np.corrcoef(rm, expected)[0, 1])
  flat = oracles.monitor(oracle, prompts, texts, np.ones(5), knobs)
  assert flat["reward/rm_scene_corr"] == 0.0  # an RM that scores all alike: no correlation
  # Two prompts of two samples each (rows 0-1 and 2-3):
  # the scene orders (0, 1) and (2, 3); the RM agrees on (2, 3) only.
  rm = np.array([2.0, 1.0, 4.0, 3.0])
  grouped = oracles.monitor(oracle, prompts[:4], texts[:4], rm, knobs, group_size=2)
  assert grouped["reward/rm_pair_agreement"] == 0.5
  with pytest.raises(ValueError, match="'p' has no scene"):
    oracles.score(oracle, [prompt(rewards.GENERAL, None)], texts[:1], knobs)
  assert oracles.monitor_for([prompts[0], prompt(rewards.GENERAL, None)]) is None
