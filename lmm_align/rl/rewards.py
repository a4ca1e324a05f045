"""Sequence-level rewards of a PPO rollout besides the reward model: LLaVA-RLHF's symbolic
rewards (correctness on multiple-choice and yes/no prompts, a length term, a penalty for a
missing stop token) and its response truncation. Host-side numpy and strings: they run once
per rollout on decoded text, between the jitted sampler and the jitted update.

Answer types follow LLaVA-RLHF's `AnswerType` (RL prompt data field `caption_type`):
1 general, 2-5 the correct option is A-D of a multiple-choice question, 6 the answer is
"no", 7 the answer is "yes".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

GENERAL, A_IN_ABCD, B_IN_ABCD, C_IN_ABCD, D_IN_ABCD, NO_IN_YESNO, YES_IN_YESNO = range(1, 8)
_OPTION = {A_IN_ABCD: "A", B_IN_ABCD: "B", C_IN_ABCD: "C", D_IN_ABCD: "D"}


def correctness(response: str, caption_type: int) -> float:
  """LLaVA-RLHF's symbolic correctness reward (`ppo_trainer.rollout`):

  general          0
  option X of A-D  1 if the stripped answer starts with "X." or says "correct option is X."
  answer "no"      +0.5 if it starts with "No", -0.5 if it starts with "Yes", else 0
  answer "yes"     0 (the published code gives no reward for saying yes)
  """
  text = response.strip()
  if caption_type == GENERAL or caption_type == YES_IN_YESNO:
    return 0.0
  if caption_type in _OPTION:
    x = _OPTION[caption_type]
    return 1.0 if text.startswith(f"{x}.") or f"correct option is {x}." in response else 0.0
  if caption_type == NO_IN_YESNO:
    return 0.5 if text.startswith("No") else -0.5 if text.startswith("Yes") else 0.0
  raise ValueError(f"caption_type {caption_type} is not an answer type (1-7)")


@dataclasses.dataclass(frozen=True)
class Truncated:
  tokens: list[int]  # the response as scored and trained on, the stop token included if kept
  has_stop: bool


def truncate_response(
  tokens: Sequence[int],
  stop_ids: Sequence[int],
  cut_ids: Sequence[int] = (),
) -> Truncated:
  """A sampled row cut after its first stop token, or after its first `cut_ids` token.

  LLaVA-RLHF cuts after the first "?" token (`cut_ids`) even where it comes after the stop
  token, and the cut response then has no stop token (so it also pays the missing-stop
  penalty): the published quirk, kept when `cut_ids` is given.
  """
  tokens = list(tokens)
  end = next((i for i, t in enumerate(tokens) if t in stop_ids), len(tokens) - 1)
  cut = next((i for i, t in enumerate(tokens) if t in cut_ids), None)
  if cut is not None:
    end = cut
  kept = tokens[: end + 1]
  return Truncated(kept, any(t in stop_ids for t in kept))


@dataclasses.dataclass(frozen=True)
class SymbolicRewardConfig:
  correct_coef: float = 0.0  # LLaVA-RLHF: 2.0
  length_coef: float = 0.0  # LLaVA-RLHF: -10.0, times (tokens / response_len) * length_bonus
  stop_penalty: float = 0.0  # LLaVA-RLHF: -8.0 when the response has no stop token
  relative_stop_penalty: bool = True  # add the penalty (True) or replace the score with it
  reward_bias: float = 0.0


def sequence_scores(
  rm_scores: np.ndarray,
  responses: Sequence[str],
  num_tokens: np.ndarray,
  has_stop: np.ndarray,
  caption_types: np.ndarray,
  length_bonus: np.ndarray,
  response_len: int,
  config: SymbolicRewardConfig,
) -> dict[str, np.ndarray]:
  """The score of each rollout, with its parts:

  s = stop(rm) + length_coef * (n / response_len) * length_bonus + correct_coef * c + bias
  stop(rm) = rm + penalty if no stop token (relative), penalty (absolute), else rm
  """
  rm = np.asarray(rm_scores, np.float32)
  missing = ~np.asarray(has_stop, bool)
  if config.relative_stop_penalty:
    stopped = rm + missing * np.float32(config.stop_penalty)
  else:
    stopped = np.where(missing, np.float32(config.stop_penalty), rm)
  correct = np.array([correctness(r, int(t)) for r, t in zip(responses, caption_types)], np.float32)
  length = np.asarray(num_tokens, np.float32) / response_len * np.asarray(length_bonus, np.float32)
  score = stopped + config.length_coef * length + config.correct_coef * correct
  return {
    "score": (score + config.reward_bias).astype(np.float32),
    "rm_score": rm,
    "correct": correct,
    "length_term": length,
    "missing_stop": missing.astype(np.float32),
  }


# --------------------------------------------------------------------------------------------
# Segment-level rewards: a sequence-level scorer turned dense by scoring the response's
# prefixes (potential-based shaping, Ng et al. 1999: the increments sum to the full score).
# --------------------------------------------------------------------------------------------


def separator_token_ids(tokenizer, separators: Sequence[str]) -> frozenset[int]:
  """Ids of the tokens whose decoded text, stripped, is one of `separators` (",", "and"...)."""
  wanted = set(separators)
  return frozenset(i for i in range(len(tokenizer)) if tokenizer.decode([i]).strip() in wanted)


def segment_ends(tokens: Sequence[int], separator_ids: frozenset[int]) -> list[int]:
  """Indices of the last token of each segment: every token followed by a separator token,
  and the response's last token (so the last prefix is the whole response). A separator
  itself opens the next segment, so a prefix ends on the words before it ("a red star", not
  "a red star and")."""
  if not tokens:
    return []
  ends = [i for i in range(len(tokens) - 1) if tokens[i + 1] in separator_ids]
  return [*ends, len(tokens) - 1]


def segment_rewards(
  prefix_scores: Sequence[Sequence[float]], ends: Sequence[Sequence[int]], width: int
) -> np.ndarray:
  """Dense rewards [B, width]: row b gets prefix_scores[b][k] - prefix_scores[b][k - 1] at
  ends[b][k] (the empty prefix scores 0), so a row sums to the score of its whole response and
  a segment that lowers the score (a wrong object named) is charged where it was said."""
  out = np.zeros((len(ends), width), np.float32)
  for b, (scores, where) in enumerate(zip(prefix_scores, ends)):
    if len(scores) != len(where):
      raise ValueError(f"row {b}: {len(scores)} prefix scores for {len(where)} segment ends")
    previous = 0.0
    for score, t in zip(scores, where):
      out[b, t] += float(score) - previous
      previous = float(score)
  return out
