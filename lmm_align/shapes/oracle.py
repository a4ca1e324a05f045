"""The shapes world's oracle reward: PPO's `ppo.reward_source=scene`, and the monitor PPO logs
beside a reward model on shapes prompts (`reward/scene`, `reward/rm_scene_corr`,
`reward/rm_pair_agreement`; `lmm_align.rl.oracles`)."""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections
import numpy as np

from lmm_align.rl import oracles, rewards
from lmm_align.shapes import metrics


@oracles.register("scene", fields=("scene",), monitor=True)
def scene_scores(
  prompts: Sequence[oracles.OraclePrompt],
  texts: Sequence[str],
  ppo_config: ml_collections.ConfigDict,
) -> np.ndarray:
  """The ground truth in the reward model's place, float32 [R]. A description scores
  -(hallucinated object mentions) + ppo.scene_recall_weight * (scene objects recalled), the
  iterative loop's ground-truth score. A yes/no answer scores +1 when POPE's reading of it
  matches the truth and -1 when not: both answers count, where the published correctness rule
  pays only for "no" and so, alone, teaches "always no". Multiple-choice prompts score 0 (the
  symbolic correctness reward scores them)."""
  recall_weight = ppo_config.scene_recall_weight
  out = np.zeros(len(prompts), np.float32)
  for i, (prompt, text) in enumerate(zip(prompts, texts)):
    scene = prompt.truth["scene"]
    if prompt.caption_type == rewards.GENERAL:
      counts = metrics.response_hallucination_counts(text, scene)
      out[i] = metrics.ground_truth_score(counts, recall_weight)
    elif prompt.caption_type in (rewards.YES_IN_YESNO, rewards.NO_IN_YESNO):
      label = "yes" if prompt.caption_type == rewards.YES_IN_YESNO else "no"
      out[i] = 1.0 if metrics.score_yes_no(text, label) else -1.0
  return out
