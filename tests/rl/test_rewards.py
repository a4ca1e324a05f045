"""LLaVA-RLHF's symbolic rewards and response truncation, against the published rules."""

from __future__ import annotations

import numpy as np
import pytest

from lmm_align.rl import rewards


@pytest.mark.parametrize(
  "response, caption_type, expected",
  [
    ("A. A red circle.", rewards.A_IN_ABCD, 1.0),
    ("  B. two", rewards.B_IN_ABCD, 1.0),
    ("So the correct option is C.", rewards.C_IN_ABCD, 1.0),
    ("The correct option is C", rewards.C_IN_ABCD, 0.0),  # no period: no match, as published
    ("D.", rewards.A_IN_ABCD, 0.0),
    ("No, there is none.", rewards.NO_IN_YESNO, 0.5),
    ("Yes, there is.", rewards.NO_IN_YESNO, -0.5),
    ("There is no dog.", rewards.NO_IN_YESNO, 0.0),
    ("no", rewards.NO_IN_YESNO, 0.0),  # case-sensitive startswith("No")
    ("Yes.", rewards.YES_IN_YESNO, 0.0),  # the published code never rewards "Yes"
    ("A. anything", rewards.GENERAL, 0.0),
  ],
)
def test_correctness_follows_the_published_rule(response, caption_type, expected):
  assert rewards.correctness(response, caption_type) == expected


def test_unknown_answer_type_is_an_error():
  with pytest.raises(ValueError, match="caption_type 9"):
    rewards.correctness("A.", 9)


def test_truncation_at_stop_and_at_question_mark():
  eos, q = 2, 7
  assert rewards.truncate_response([5, 6, eos, 0, 0], (eos,)) == rewards.Truncated(
    [5, 6, eos], True
  )
  assert rewards.truncate_response([5, 6, 8], (eos,)) == rewards.Truncated([5, 6, 8], False)
  # The '?' cut wins even after the stop token, and the cut response has no stop token.
  assert rewards.truncate_response([5, q, 6, eos], (eos,), (q,)) == rewards.Truncated([5, q], False)
  assert rewards.truncate_response([5, eos, q], (eos,), (q,)) == rewards.Truncated(
    [5, eos, q], True
  )


def test_sequence_scores_by_hand():
  config = rewards.SymbolicRewardConfig(
    correct_coef=2.0, length_coef=-10.0, stop_penalty=-8.0, relative_stop_penalty=True,
    reward_bias=0.5,
  )  # fmt: skip
  parts = rewards.sequence_scores(
    rm_scores=np.array([1.0, -1.0, 0.25]),
    responses=["No.", "A. yes", "blah"],
    num_tokens=np.array([10, 40, 20]),
    has_stop=np.array([True, False, True]),
    caption_types=np.array([rewards.NO_IN_YESNO, rewards.A_IN_ABCD, rewards.GENERAL]),
    length_bonus=np.array([1.0, 1.0, 2.0]),
    response_len=40,
    config=config,
  )
  expected = [
    1.0 - 10 * (10 / 40) + 2 * 0.5 + 0.5,
    -1.0 - 8.0 - 10 * 1.0 + 2 * 1.0 + 0.5,
    0.25 - 10 * (20 / 40 * 2.0) + 0.5,
  ]
  np.testing.assert_allclose(parts["score"], expected, rtol=1e-6)
  absolute = rewards.sequence_scores(
    np.array([3.0, 3.0]), ["x", "y"], np.array([1, 1]), np.array([True, False]),
    np.array([1, 1]), np.array([1.0, 1.0]), 10,
    rewards.SymbolicRewardConfig(stop_penalty=-8.0, relative_stop_penalty=False),
  )  # fmt: skip
  np.testing.assert_allclose(absolute["score"], [3.0, -8.0])


class _WordTokenizer:
  """Token i decodes to WORDS[i] (byte-level BPE decodes a leading space the same way)."""

  WORDS = ["<pad>", " a", " red", " star", ",", " and", " blue", " circle", ".", "</s>", "band"]

  def __len__(self):
    return len(self.WORDS)

  def decode(self, ids):
    return "".join(self.WORDS[i] for i in ids)


def test_segments_end_before_each_separator_and_at_the_last_token():
  ids = rewards.separator_token_ids(_WordTokenizer(), (",", ".", "and"))
  assert ids == frozenset({4, 5, 8})  # "band" is not "and"
  #          a  red star ,  a  blue circle and a  red star .  </s>
  tokens = [1, 2, 3, 4, 1, 6, 7, 5, 1, 2, 3, 8, 9]
  assert rewards.segment_ends(tokens, ids) == [2, 6, 10, 12]
  assert rewards.segment_ends([1, 2], ids) == [1]
  assert rewards.segment_ends([4, 4], ids) == [0, 1]  # back-to-back separators: an empty step
  assert rewards.segment_ends([], ids) == []


def test_segment_rewards_pay_each_increment_where_its_segment_ends():
  dense = rewards.segment_rewards([[0.5, -0.5, 0.0], [1.0]], [[2, 6, 9], [0]], width=10)
  expected = np.zeros((2, 10), np.float32)
  expected[0, [2, 6, 9]] = [0.5, -1.0, 0.5]
  expected[1, 0] = 1.0
  np.testing.assert_allclose(dense, expected)
  np.testing.assert_allclose(dense.sum(1), [0.0, 1.0])  # each row sums to its last prefix
  with pytest.raises(ValueError, match="row 0: 2 prefix scores for 3 segment ends"):
    rewards.segment_rewards([[0.5, 1.0]], [[1, 2, 3]], width=4)
