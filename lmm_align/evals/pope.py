"""POPE (Li et al. 2023): yes/no object probes, scored exactly as the published scorer does.

The rule (POPE's evaluate.py, identical in LLaVA's eval_pope.py and LLaVA-RLHF): keep the
answer's text before its first '.', drop commas, split on single spaces; the answer means
"no" if one of the words is exactly 'No', 'no' or 'not' (case-sensitive: 'NO' and 'Not' mean
yes), and "yes" otherwise. "yes" is the positive class.
"""

from __future__ import annotations

from collections.abc import Sequence

NO_WORDS = ("No", "no", "not")


def pope_prediction(text: str) -> str:
  """'yes' or 'no' by the published rule."""
  if "." in text:
    text = text.split(".")[0]
  words = text.replace(",", "").split(" ")
  return "no" if any(w in words for w in NO_WORDS) else "yes"


def pope_metrics(answers: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
  """f1, accuracy, precision, recall, yes_ratio (and counts) of answers against 'yes'/'no'."""
  if len(answers) != len(labels):
    raise ValueError(f"{len(answers)} answers for {len(labels)} labels")
  if not labels:
    raise ValueError("no POPE questions to score")
  bad = sorted({label for label in labels if label not in ("yes", "no")})
  if bad:
    raise ValueError(f"POPE labels must be 'yes' or 'no', found {bad}")
  tp = fp = tn = fn = 0
  for answer, label in zip(answers, labels):
    pred_yes, label_yes = pope_prediction(answer) == "yes", label == "yes"
    tp += pred_yes and label_yes
    fp += pred_yes and not label_yes
    tn += not pred_yes and not label_yes
    fn += not pred_yes and label_yes
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {
      "f1": f1,
      "accuracy": (tp + tn) / len(labels),
      "precision": precision,
      "recall": recall,
      "yes_ratio": (tp + fp) / len(labels),
      "tp": tp, "fp": fp, "tn": tn, "fn": fn,
  }  # fmt: skip
