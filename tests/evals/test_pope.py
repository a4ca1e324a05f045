"""POPE scoring equals the published scorer (re-implemented here from its rule) on the
published question files, with edge-case answers; bad answer files are refused."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from lmm_align.data.jsonl import read_jsonl
from lmm_align.evals import pope

REPO = pathlib.Path(__file__).resolve().parents[2]
EDGE_ANSWERS = ["Yes", "No", "No,", "NO", "Not", "not sure", "", "Yes, there is no car.", "There is not.",
                "no.", "I think so. No.", "yes it is", "No, there isn't."]  # fmt: skip


def reference_scorer(
  answers: list[str], labels: list[str]
) -> tuple[float, float, float, float, float]:
  """POPE's evaluate.py, answers aligned by order with the label lines."""
  preds = []
  for text in answers:
    if text.find(".") != -1:
      text = text.split(".")[0]
    text = text.replace(",", "")
    words = text.split(" ")
    preds.append(0 if ("No" in words or "not" in words or "no" in words) else 1)
  labels01 = [0 if label == "no" else 1 for label in labels]
  tp = sum(p == 1 and y == 1 for p, y in zip(preds, labels01))
  fp = sum(p == 1 and y == 0 for p, y in zip(preds, labels01))
  tn = sum(p == 0 and y == 0 for p, y in zip(preds, labels01))
  fn = sum(p == 0 and y == 1 for p, y in zip(preds, labels01))
  precision, recall = tp / (tp + fp), tp / (tp + fn)
  f1 = 2 * precision * recall / (precision + recall)
  return f1, (tp + tn) / len(labels), precision, recall, sum(preds) / len(preds)


def test_edge_cases_of_the_rule():
  expected = ["yes", "no", "no", "yes", "yes", "no", "yes", "no", "no", "no", "yes", "yes", "no"]
  assert [pope.pope_prediction(a) for a in EDGE_ANSWERS] == expected


@pytest.mark.parametrize("split", ["random", "popular", "adversarial"])
def test_published_files_equal_the_reference_scorer(tmp_path, shared_reference_data, split):
  questions = shared_reference_data / "pope_coco_e3e3926" / f"coco_pope_{split}.json"
  records = read_jsonl(str(questions))
  rng = np.random.default_rng(0)
  answers = [EDGE_ANSWERS[i] for i in rng.integers(len(EDGE_ANSWERS), size=len(records))]
  answer_file = tmp_path / "answers.jsonl"
  shuffled = rng.permutation(len(records))  # matching is by question_id, not by line order
  answer_file.write_text(
    "".join(
      json.dumps({"question_id": records[i]["question_id"], "text": answers[i]}) + "\n"
      for i in shuffled
    )
  )
  got = pope.score_pope_files(str(questions), str(answer_file))
  expected = reference_scorer(answers, [r["label"] for r in records])
  np.testing.assert_allclose(
    [got["f1"], got["accuracy"], got["precision"], got["recall"], got["yes_ratio"]],
    expected,
    rtol=0,
    atol=1e-12,
  )
  assert len(records) == {"random": 2910, "popular": 3000, "adversarial": 3000}[split]


def _write(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


QUESTIONS = [
  {"question_id": i, "image": "x.jpg", "text": "Is there a cat?", "label": "yes" if i % 2 else "no"}
  for i in range(4)
]


@pytest.mark.parametrize(
  "answers, message",
  [
    (
      [{"question_id": i, "text": "Yes"} for i in range(3)],
      r"1 question\(s\) without an answer \(first: \[3\]\)",
    ),
    (
      [{"question_id": i, "text": "Yes"} for i in (0, 1, 2, 3, 3)],
      r"record 5: duplicate question_id 3",
    ),
    (
      [{"question_id": i, "text": "Yes"} for i in range(5)],
      r"1 answer\(s\) to unknown questions \(first: \[4\]\)",
    ),
    ([{"question_id": 0, "answer": "Yes"}], r"record 1: field 'text' is missing"),
  ],
)
def test_bad_answer_files_are_refused(tmp_path, answers, message):
  with pytest.raises(pope.PopeDataError, match=message):
    pope.score_pope_files(
      _write(tmp_path / "q.jsonl", QUESTIONS), _write(tmp_path / "a.jsonl", answers)
    )


def test_cli_prints_the_metrics(tmp_path):
  answers = [{"question_id": i, "text": "Yes" if i % 2 else "No"} for i in range(4)]
  cmd = [sys.executable, "-m", "lmm_align.main", "eval", "pope", f"--questions={_write(tmp_path / 'q.jsonl', QUESTIONS)}",
         f"--answers={_write(tmp_path / 'a.jsonl', answers)}"]  # fmt: skip
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  metrics = json.loads(result.stdout)
  assert metrics["f1"] == 1.0 and metrics["accuracy"] == 1.0 and metrics["yes_ratio"] == 0.5
