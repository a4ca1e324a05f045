"""Agreement metrics against scipy.stats on fixed data with ties, and accuracies by hand."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from lmm_align.judges import agreement
from lmm_align.judges.verdicts import PairwiseVerdict

# Judge scores with many ties (a 1-10 scale) against reference scores with ties of their own.
JUDGE = [7, 8, 8, 3, 5, 7, 9, 2, 8, 5, 6, 7, 1, 10, 4, 7]
REFERENCE = [6.5, 8, 9, 2, 5, 6.5, 9, 3, 7, 4, 6.5, 8, 2, 9, 5, 6]


def test_correlations_equal_scipy_with_ties():
  assert agreement.pearson(JUDGE, REFERENCE) == pytest.approx(
    stats.pearsonr(JUDGE, REFERENCE)[0], abs=1e-12
  )
  assert agreement.spearman(JUDGE, REFERENCE) == pytest.approx(
    stats.spearmanr(JUDGE, REFERENCE)[0], abs=1e-12
  )
  assert agreement.kendall_tau_b(JUDGE, REFERENCE) == pytest.approx(
    stats.kendalltau(JUDGE, REFERENCE, variant="b")[0], abs=1e-12
  )


def test_kendall_blocks_and_larger_random_data_equal_scipy():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 6, size=300)
  y = x + rng.integers(-2, 3, size=300)
  expected = stats.kendalltau(x, y)[0]
  for block in (1, 7, 1024):
    assert agreement.kendall_tau_b(x, y, block=block) == pytest.approx(expected, abs=1e-12)
  assert agreement.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)


def test_average_ranks_equal_scipy_rankdata():
  values = np.array([3.0, 1.0, 3.0, 2.0, 3.0, 1.0])
  np.testing.assert_array_equal(agreement.average_ranks(values), stats.rankdata(values))
  np.testing.assert_array_equal(agreement.average_ranks(values), [5, 1.5, 5, 3, 5, 1.5])


def test_constant_side_gives_nan_and_bad_input_raises():
  for metric in (agreement.pearson, agreement.spearman, agreement.kendall_tau_b):
    assert np.isnan(metric([1, 2, 3], [4, 4, 4]))
  with pytest.raises(ValueError, match=r"x\[1\] = nan"):
    agreement.pearson([1, float("nan"), 3], [1, 2, 3])
  with pytest.raises(ValueError, match="one length"):
    agreement.kendall_tau_b([1, 2, 3], [1, 2])
  with pytest.raises(ValueError, match="at least 2"):
    agreement.spearman([1], [1])


PREDICTIONS = ["first", "second", "tie", "first", "tie", "invalid", "second", "first"]
LABELS = ["first", "first", "tie", "tie", "second", "second", "second", "first"]


def test_pairwise_accuracy_with_and_without_ties_by_hand():
  with_ties = agreement.pairwise_accuracy(PREDICTIONS, LABELS)
  # Right: 0 (first), 2 (tie=tie), 6, 7; the invalid prediction counts wrong.
  assert (with_ties.correct, with_ties.total, with_ties.invalid) == (4, 8, 1)
  assert with_ties.accuracy == 0.5
  without = agreement.pairwise_accuracy(PREDICTIONS, LABELS, ties="drop")
  # Dropped: 2, 3, 4 (a tie on either side); left: 0 right, 1 wrong, 5 invalid, 6 right, 7 right.
  assert (without.correct, without.total, without.dropped) == (3, 5, 3)
  label_only = agreement.pairwise_accuracy(PREDICTIONS, LABELS, ties="drop_label", invalid="drop")
  # Dropped for the label: 2, 3; item 5 is left out as invalid; 4 ("tie" vs "second") is wrong.
  assert (label_only.correct, label_only.total, label_only.dropped) == (3, 5, 2)


def test_pairwise_accuracy_reads_verdicts_and_refuses_bad_labels():
  verdicts = [PairwiseVerdict(w) for w in PREDICTIONS]
  assert agreement.pairwise_accuracy(verdicts, LABELS) == agreement.pairwise_accuracy(
    PREDICTIONS, LABELS
  )
  with pytest.raises(ValueError, match=r"labels\[1\] = 'B'"):
    agreement.pairwise_accuracy(["first", "first"], ["first", "B"])
  with pytest.raises(ValueError, match="ties="):
    agreement.pairwise_accuracy([], [], ties="ignore")
  assert np.isnan(agreement.pairwise_accuracy(["tie"], ["tie"], ties="drop").accuracy)


def test_position_consistency_by_hand():
  # Pair i judged as (a, b) then (b, a): the swapped verdict must flip to agree.
  original = ["first", "first", "second", "tie", "first", "invalid"]
  swapped = ["second", "first", "first", "tie", "tie", "first"]
  result = agreement.position_consistency(original, swapped)
  # 0: consistent; 1: picked position one twice; 2: consistent; 3: tie both times;
  # 4: inconsistent (no position bias); 5: left out.
  assert (result.consistent, result.total, result.invalid) == (3, 5, 1)
  assert result.rate == 3 / 5 and result.first_bias == 1 / 5 and result.second_bias == 0
