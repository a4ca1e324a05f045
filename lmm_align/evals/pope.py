"""POPE (Li et al. 2023): yes/no object probes, scored exactly as the published scorer does.

The rule (POPE's evaluate.py, identical in LLaVA's eval_pope.py and LLaVA-RLHF): keep the
answer's text before its first '.', drop commas, split on single spaces; the answer means
"no" if one of the words is exactly 'No', 'no' or 'not' (case-sensitive: 'NO' and 'Not' mean
yes), and "yes" otherwise. "yes" is the positive class.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from lmm_align.data.jsonl import read_jsonl

NO_WORDS = ("No", "no", "not")
MAIN_METRICS = ("f1", "accuracy", "precision", "recall", "yes_ratio")


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


def split_name(path: str) -> str:
  """'coco_pope_random.json' -> 'random' (as LLaVA names its categories); else the stem."""
  stem = pathlib.Path(path).name.split(".")[0]
  return re.sub(r"^.*pope_", "", stem) or stem


def combine_splits(per_split: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """One split: its metrics as they are. Several: '<split>/<metric>' for each, and the mean
  over splits of each main metric under its bare name."""
  if len(per_split) == 1:
    return dict(next(iter(per_split.values())))
  out = {f"{split}/{k}": v for split, m in per_split.items() for k, v in m.items()}
  out.update({k: float(np.mean([m[k] for m in per_split.values()])) for k in MAIN_METRICS})
  return out


# --------------------------------------------------------------------------------------------
# The published files: questions (JSONL despite the .json name) and LLaVA-style answers.
# --------------------------------------------------------------------------------------------


class PopeDataError(ValueError):
  pass


def _by_id(
  path: str, records: list[dict[str, Any]], fields: tuple[str, ...]
) -> dict[Any, dict[str, Any]]:
  out: dict[Any, dict[str, Any]] = {}
  for number, record in enumerate(records, start=1):
    for field in fields:
      if field not in record:
        raise PopeDataError(f"{path}: record {number}: field {field!r} is missing")
    qid = record["question_id"]
    if qid in out:
      raise PopeDataError(f"{path}: record {number}: duplicate question_id {qid!r}")
    out[qid] = record
  return out


def score_pope_files(questions_path: str, answers_path: str) -> dict[str, float]:
  """Metrics of an answers JSONL ({question_id, text}) against a POPE question file
  ({question_id, image, text, label}), matched by question_id. Every question must have
  exactly one answer; an answer to an unknown question is an error too."""
  questions = _by_id(questions_path, read_jsonl(questions_path), ("question_id", "label"))
  answers = _by_id(answers_path, read_jsonl(answers_path), ("question_id", "text"))
  missing = [qid for qid in questions if qid not in answers]
  unknown = [qid for qid in answers if qid not in questions]
  if missing or unknown:
    raise PopeDataError(
      f"{answers_path} does not cover {questions_path}: {len(missing)} question(s) without an "
      f"answer (first: {missing[:5]}), {len(unknown)} answer(s) to unknown questions (first: {unknown[:5]})"
    )
  for qid, record in questions.items():
    if record["label"] not in ("yes", "no"):
      raise PopeDataError(
        f"{questions_path}: question_id {qid!r}, field 'label': {record['label']!r} is not yes/no"
      )
  order = list(questions)
  return pope_metrics(
    [str(answers[q]["text"]) for q in order], [questions[q]["label"] for q in order]
  )
