"""The oracle registry: an unknown name is named with the registered ones, a registered oracle's
scores are what `score` returns, and the monitor's pair agreement is counted by hand."""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np
import pytest

from lmm_align.rl import oracles


@dataclasses.dataclass
class _Prompt:
  record_id: str
  caption_type: int
  truth: dict


@oracles.register("test_answer_length", fields=("target_words",))
def _answer_length(prompts, texts, config):
  """-|words - target| * config.scale: a toy oracle reading one record field."""
  return [
    -abs(len(t.split()) - p.truth["target_words"]) * config.scale for p, t in zip(prompts, texts)
  ]


def test_a_registered_oracle_scores_and_an_unknown_one_is_named():
  oracle = oracles.get("test_answer_length")
  assert "test_answer_length" in oracles.names() and "scene" in oracles.names()  # the plugin's
  prompts = [_Prompt("a", 1, {"target_words": 2}), _Prompt("b", 1, {"target_words": 4})]
  config = ml_collections.ConfigDict({"scale": 0.5})
  scores = oracles.score(oracle, prompts, ["one two three", "one"], config)
  assert scores.dtype == np.float32 and scores.tolist() == [-0.5, -1.5]
  with pytest.raises(ValueError, match="'b' has no target_words"):
    oracles.score(oracle, [prompts[0], _Prompt("b", 1, {})], ["x", "y"], config)
  with pytest.raises(ValueError, match=r"no oracle named 'nope': use one of \[.*'scene'"):
    oracles.get("nope")
  with pytest.raises(ValueError, match="already registered"):
    oracles.register("test_answer_length")(lambda p, t, c: np.zeros(len(t)))
  assert oracles.monitor_for(prompts) is None  # registered without a monitor


def test_same_order_pairs_count_ties_in_the_rm_as_disagreement():
  # truth [2, 1, 0] orders all three pairs; the RM [3, 1, 1] agrees on (0, 1) and (0, 2)
  # and ties on (1, 2); equal truths order no pair.
  assert oracles.same_order_pairs(np.array([2.0, 1.0, 0.0]), np.array([3.0, 1.0, 1.0])) == (2, 3)
  assert oracles.same_order_pairs(np.array([1.0, 1.0]), np.array([0.0, 5.0])) == (0, 0)
