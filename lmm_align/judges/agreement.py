"""How well a judge agrees with reference judgments: correlations, accuracies, consistency.

Pointwise judges (a score per response) are compared with reference scores (GPT-4o's or
humans') by Pearson r, Spearman rho and Kendall tau-b, as LLaVA-Critic reports (Pearson and
tau on MLLM-as-a-Judge and its in-domain sets). Pairwise judges (first / second / tie) are
compared by accuracy, in the two forms LLaVA-Critic and MT-Bench report:

  with ties     3-way: a tie prediction is right only against a tie label;
  without ties  pairs where the prediction or the label is a tie are dropped (MT-Bench's
                `compute_agreement.py` with ban=["tie"]); `ties="drop_label"` drops only
                pairs whose label is a tie (LLaVA-Critic's wording of the same table).

Position consistency (MT-Bench's position-bias study) is the rate at which a judge gives the
same verdict when the two responses swap places.

Everything is numpy, no scipy at run time; ties in scores get average ranks (Spearman) and
tau-b's tie correction, so the numbers equal `scipy.stats` on the same data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from lmm_align.judges.verdicts import WINNERS, PairwiseVerdict

_FLIP = {"first": "second", "second": "first", "tie": "tie"}


def _paired(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.ndim != 1 or x.shape != y.shape:
    raise ValueError(f"need two 1-D sequences of one length, got shapes {x.shape} and {y.shape}")
  if len(x) < 2:
    raise ValueError(f"need at least 2 paired scores, got {len(x)}")
  for name, v in (("x", x), ("y", y)):
    bad = np.flatnonzero(~np.isfinite(v))
    if bad.size:
      raise ValueError(f"{name}[{bad[0]}] = {v[bad[0]]} is not finite: drop invalid scores first")
  return x, y


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
  """Pearson's r of paired scores [N]; nan when either side is constant."""
  x, y = _paired(x, y)
  dx, dy = x - x.mean(), y - y.mean()
  denominator = np.sqrt(np.sum(dx * dx) * np.sum(dy * dy))
  return float(np.sum(dx * dy) / denominator) if denominator > 0 else float("nan")


def average_ranks(values: np.ndarray) -> np.ndarray:
  """1-based ranks of values [N], tied values sharing the mean of their ranks."""
  order = np.argsort(values, kind="stable")
  sorted_values = values[order]
  # Each run of equal values [start, end) gets rank (start + 1 + end) / 2.
  new_run = np.concatenate([[True], sorted_values[1:] != sorted_values[:-1]])
  starts = np.flatnonzero(new_run)
  ends = np.append(starts[1:], len(values))
  run_ranks = (starts + 1 + ends) / 2.0
  ranks = np.empty(len(values), np.float64)
  ranks[order] = np.repeat(run_ranks, ends - starts)
  return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
  """Spearman's rho: Pearson's r of the average ranks; nan when either side is constant."""
  x, y = _paired(x, y)
  return pearson(average_ranks(x), average_ranks(y))


def kendall_tau_b(x: Sequence[float], y: Sequence[float], block: int = 1024) -> float:
  """Kendall's tau-b of paired scores [N]; nan when either side is constant.

  tau_b = (C - D) / sqrt((n0 - n1) (n0 - n2)), with C - D = sum over pairs i < j of
  sign(x_i - x_j) sign(y_i - y_j), n0 = N (N - 1) / 2 and n1, n2 the pairs tied in x, in y.
  Exact integer counts, O(N^2) time in row blocks of `block` (memory O(block N)): fine for the
  thousands of items a judge benchmark holds.
  """
  x, y = _paired(x, y)
  n = len(x)
  concordance = 0  # C - D over ordered pairs (i, j), i != j: twice the unordered sum
  for start in range(0, n, block):
    sx = np.sign(x[start : start + block, None] - x[None, :]).astype(np.int64)
    sy = np.sign(y[start : start + block, None] - y[None, :]).astype(np.int64)
    concordance += int(np.sum(sx * sy))
  n0 = n * (n - 1) // 2
  n1 = _tied_pairs(x)
  n2 = _tied_pairs(y)
  denominator = np.sqrt(float(n0 - n1) * float(n0 - n2))
  return concordance / 2 / denominator if denominator > 0 else float("nan")


def _tied_pairs(values: np.ndarray) -> int:
  _, counts = np.unique(values, return_counts=True)
  return int(np.sum(counts * (counts - 1) // 2))


@dataclasses.dataclass(frozen=True)
class PairwiseAccuracy:
  """accuracy = correct / total; dropped: pairs left out for ties; invalid: predictions with no
  verdict (counted wrong with invalid="wrong", left out with invalid="drop")."""

  accuracy: float
  correct: int
  total: int
  dropped: int
  invalid: int


def _winner(item: str | PairwiseVerdict) -> str:
  return item.winner if isinstance(item, PairwiseVerdict) else item


def pairwise_accuracy(
  predictions: Sequence[str | PairwiseVerdict],
  labels: Sequence[str | PairwiseVerdict],
  *,
  ties: str = "keep",
  invalid: str = "wrong",
) -> PairwiseAccuracy:
  """Agreement of predicted winners with reference winners ("first" / "second" / "tie").

  ties: "keep" (3-way accuracy with ties), "drop" (drop pairs where either side is a tie:
    accuracy without ties), "drop_label" (drop pairs whose label is a tie).
  invalid: a prediction that is no winner (e.g. an unparsed verdict) counts "wrong" or is
    "drop"ped; either way it is counted in `invalid`. Labels must all be valid winners.
  accuracy is nan when no pair is left.
  """
  if ties not in ("keep", "drop", "drop_label"):
    raise ValueError(f"ties={ties!r}: use 'keep', 'drop' or 'drop_label'")
  if invalid not in ("wrong", "drop"):
    raise ValueError(f"invalid={invalid!r}: use 'wrong' or 'drop'")
  if len(predictions) != len(labels):
    raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
  correct = total = dropped = n_invalid = 0
  for i, (pred, label) in enumerate(zip(map(_winner, predictions), map(_winner, labels))):
    if label not in WINNERS:
      raise ValueError(f"labels[{i}] = {label!r} is not one of {WINNERS}")
    if pred not in WINNERS:
      n_invalid += 1
      if invalid == "drop":
        continue
    if (ties == "drop" and "tie" in (pred, label)) or (ties == "drop_label" and label == "tie"):
      dropped += 1
      continue
    total += 1
    correct += pred == label
  return PairwiseAccuracy(
    correct / total if total else float("nan"), correct, total, dropped, n_invalid
  )


@dataclasses.dataclass(frozen=True)
class PositionConsistency:
  """Over pairs judged in both orders with valid verdicts both times (`total`):

  rate: the share whose verdicts agree once the swap is undone (tie with tie included);
  first_bias / second_bias: the share where the judge picked the same position both times,
    i.e. preferred whatever came first (second), MT-Bench's "biased toward first/second";
  invalid: pairs left out because either verdict was invalid.
  """

  rate: float
  first_bias: float
  second_bias: float
  consistent: int
  total: int
  invalid: int


def position_consistency(
  original_order: Sequence[str | PairwiseVerdict], swapped_order: Sequence[str | PairwiseVerdict]
) -> PositionConsistency:
  """original_order[i]: the verdict on (a_i, b_i); swapped_order[i]: on (b_i, a_i)."""
  if len(original_order) != len(swapped_order):
    raise ValueError(f"{len(original_order)} verdicts in one order, {len(swapped_order)} swapped")
  consistent = first = second = total = n_invalid = 0
  for ab, ba in zip(map(_winner, original_order), map(_winner, swapped_order)):
    if ab not in WINNERS or ba not in WINNERS:
      n_invalid += 1
      continue
    total += 1
    consistent += ab == _FLIP[ba]
    first += ab == ba == "first"
    second += ab == ba == "second"
  share = lambda k: k / total if total else float("nan")
  return PositionConsistency(
    share(consistent), share(first), share(second), consistent, total, n_invalid
  )
