"""LLaVA-Bench: the score-pair parser against the published one, the relative score by hand
on four questions in two categories judged by a FunctionJudge, the published prompt layout,
the published qa90 files, bad input."""

from __future__ import annotations

import json

import pytest

from lmm_align.evals import llava_bench as lb
from lmm_align.judges.base import FunctionJudge, JudgeReply


def published_parse_score(review: str) -> list[float]:
  """LLaVA's parse_score (eval_gpt_review_visual.py)."""
  try:
    sp = review.split("\n")[0].replace(",", " ").split(" ")
    if len(sp) == 2:
      return [float(sp[0]), float(sp[1])]
    return [-1, -1]
  except Exception:
    return [-1, -1]


@pytest.mark.parametrize(
  "reply, expected",
  [("8 9\nAssistant 2 is more detailed.", (8.0, 9.0)), ("8,9", (8.0, 9.0)),
   ("7.5 10", (7.5, 10.0)), ("8, 9", None), ("8  9", None), ("Assistant 1: 8", None),
   ("8 nine", None), ("\n8 9", None), ("", None), ("9 8 7", None)],
)  # fmt: skip
def test_parse_score_pair_matches_the_published_parser(reply, expected):
  assert lb.parse_score_pair(reply) == expected
  assert published_parse_score(reply) == list(expected or lb.INVALID_PAIR)


def _write(path, records) -> str:
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


QUESTIONS = [
  {"question_id": 0, "image": "a.jpg", "text": "What is on the table?", "category": "conv"},
  {"question_id": 1, "image": "a.jpg", "text": "Describe the image.", "category": "detail"},
  {"question_id": 2, "image": "b.jpg", "text": "What colour is the bus?", "category": "conv"},
  {"question_id": 3, "image": "b.jpg", "text": "Describe the scene.", "category": "detail"},
]
CONTEXTS = [
  {"id": "a", "image": "a.jpg", "captions": ["A cup on a table.", "A mug and a plate."],
   "instances": [{"category": "cup", "bbox": [0.1, 0.2, 0.3, 0.4]}]},
  {"id": "b", "image": "b.jpg", "captions": ["A red bus."], "instances": []},
]  # fmt: skip
JUDGE_REPLIES = {0: "8 6\nReason.", 1: "7 7", 2: "9,7\nBoth fine.", 3: "Assistant 1 wins.\n9 3"}


@pytest.fixture
def files(tmp_path):
  references = [
    {"question_id": q["question_id"], "text": f"ref {q['question_id']}"} for q in QUESTIONS
  ]
  answers = [
    {"question_id": q["question_id"], "text": f"model {q['question_id']}"} for q in QUESTIONS
  ]
  return (
    _write(tmp_path / "questions.jsonl", QUESTIONS),
    _write(tmp_path / "references.jsonl", references[::-1]),  # matched by id, not by line
    _write(tmp_path / "answers.jsonl", [answers[i] for i in (2, 0, 3, 1)]),
    _write(tmp_path / "context.jsonl", CONTEXTS),
  )


def _judge(requests_seen: list) -> FunctionJudge:
  def reply(request):
    requests_seen.append(request)
    return JUDGE_REPLIES[int(request.request_id.rsplit("-", 1)[1])]

  return FunctionJudge(reply)


def test_relative_score_by_hand(files):
  items = lb.read_llava_bench(*files)
  assert [(i.question_id, i.reference_answer, i.model_answer) for i in items] == [
    (q, f"ref {q}", f"model {q}") for q in range(4)
  ]
  seen = []
  replies = lb.judge_llava_bench(items, _judge(seen))
  metrics, pairs = lb.score_llava_bench(items, replies)
  assert pairs == [(8, 6), (7, 7), (9, 7), (-1, -1)]  # question 3's first line has no pair
  # By hand, the invalid pair kept as (-1, -1) as published: conv means 8.5 / 6.5, detail
  # 3 / 3, all 23/4 / 19/4; relative score = 100 * model mean / reference mean.
  assert metrics == pytest.approx(
    {"invalid": 1,
     "relative_score": 100 * 19 / 23, "reference_mean": 23 / 4, "model_mean": 19 / 4, "questions": 4,
     "relative_score/conv": 100 * 6.5 / 8.5, "reference_mean/conv": 8.5, "model_mean/conv": 6.5,
     "questions/conv": 2,
     "relative_score/detail": 100.0, "reference_mean/detail": 3.0, "model_mean/detail": 3.0,
     "questions/detail": 2}
  )  # fmt: skip
  dropped, _ = lb.score_llava_bench(items, replies, drop_invalid=True)
  assert dropped["relative_score"] == pytest.approx(100 * 20 / 24)
  assert dropped["relative_score/detail"] == pytest.approx(100.0)
  assert dropped["questions/detail"] == 1 and dropped["invalid"] == 1


def test_default_prompt_shows_everything(files):
  items = lb.read_llava_bench(*files)
  seen = []
  lb.judge_llava_bench(items, _judge(seen))
  first = seen[0]
  assert first.system == lb.DEFAULT_SYSTEM_PROMPT and first.image is None
  for part in ("A cup on a table.\nA mug and a plate.\n\ncup: [0.1, 0.2, 0.3, 0.4]",
               "What is on the table?", "ref 0", "model 0", "(x1, y1, x2, y2)"):  # fmt: skip
    assert part in first.prompt
  assert first.prompt.index("ref 0") < first.prompt.index("model 0")  # reference is assistant 1


def test_published_prompt_layout(files, tmp_path):
  rules = tmp_path / "rule.json"
  rules.write_text(
    json.dumps({k: {"role": "Assistant", "prompt": f"Rule {k}."} for k in ("conv", "detail")})
  )
  items = lb.read_llava_bench(*files)
  seen = []
  lb.judge_llava_bench(items, _judge(seen), rules_path=str(rules), system_prompt="Sys.")
  assert seen[0].system == "Sys."
  assert seen[0].prompt == (
    "[Context]\nA cup on a table.\nA mug and a plate.\n\ncup: [0.1, 0.2, 0.3, 0.4]\n\n"
    "[Question]\nWhat is on the table?\n\n[Assistant 1]\nref 0\n\n[End of Assistant 1]\n\n"
    "[Assistant 2]\nmodel 0\n\n[End of Assistant 2]\n\n[System]\nRule conv.\n\n"
  )
  assert seen[3].prompt.startswith("[Context]\nA red bus.\n\n\n\n[Question]")  # no boxes
  with pytest.raises(
    lb.LlavaBenchDataError, match="rule.json: no rule 'llava_bench_conv' for question_id 0"
  ):
    lb.judge_llava_bench(items, _judge([]), rules_path=str(rules), variant="wild")


def test_context_layouts():
  assert (
    lb.format_context(CONTEXTS[0])
    == "A cup on a table.\nA mug and a plate.\n\ncup: [0.1, 0.2, 0.3, 0.4]"
  )
  # In the wild: a string is one caption, a list is joined one per line.
  assert (
    lb.format_context({"image": "a.jpg", "caption": "A single caption."}) == "A single caption."
  )
  assert lb.format_context({"image": "b.jpg", "caption": ["One.", "Two."]}) == "One.\nTwo."


def test_published_rounding():
  assert lb.published_rounding(8.5, 6.5) == (76.5, 85.0, 65.0)
  # The means are rounded to 3 decimals before the ratio: 0.0015 -> 0.002, 0.001 -> 0.001.
  assert lb.published_rounding(0.0015, 0.001) == (50.0, 0.0, 0.0)


def test_published_qa90_files(shared_reference_data, tmp_path):
  root = shared_reference_data / "llava_bench_coco"
  items = lb.read_llava_bench(
    str(root / "qa90_questions.jsonl"), str(root / "qa90_gpt4_answer.jsonl"),
    str(root / "qa90_gpt4_answer.jsonl"), str(root / "caps_boxes_coco2014_val_80.jsonl"),
  )  # fmt: skip
  assert len(items) == 90
  assert {c: sum(i.category == c for i in items) for c in lb.LLAVA_BENCH_CATEGORIES} == {
    "conv": 30, "detail": 30, "complex": 30}  # fmt: skip
  assert all(i.has_boxes for i in items)
  seen = []
  replies = lb.judge_llava_bench(
    items, FunctionJudge(lambda r: seen.append(r) or "8 8"), rules_path=str(root / "rule.json")
  )
  assert seen[0].prompt.startswith("[Context]\nTwo antique suitcases sit stacked")
  assert "bounding box coordinates" in seen[0].prompt  # the COCO 'conv' rule
  metrics, _ = lb.score_llava_bench(items, replies)
  assert metrics["relative_score"] == pytest.approx(100.0) and metrics["invalid"] == 0


@pytest.mark.parametrize(
  "which, records, message",
  [(2, [{"question_id": q, "text": "a"} for q in (0, 1, 2)], r"answers.jsonl: no answer to question_id\(s\) \[3\]"),
   (2, [{"question_id": q, "text": "a"} for q in (0, 1, 2, 3, 3)], "answers.jsonl: line 5: a second answer to question_id 3"),
   (1, [{"question_id": q, "text": "a"} for q in (0, 1, 2, 3, 9)], "references.jsonl: line 5: question_id 9 is no question"),
   (1, [{"question_id": 0}], "references.jsonl: line 1: field 'text' is missing"),
   (3, CONTEXTS[:1], "questions.jsonl: line 3: image 'b.jpg' is not in"),
   (3, [*CONTEXTS, CONTEXTS[0]], "context.jsonl: line 3: image 'a.jpg' repeats"),
   (0, [*QUESTIONS, QUESTIONS[0]], "questions.jsonl: line 5: question_id 0 repeats"),
   (0, [{"question_id": 0, "image": "a.jpg", "text": "q"}], "questions.jsonl: line 1: field 'category' is missing")],
)  # fmt: skip
def test_bad_files(files, tmp_path, which, records, message):
  paths = list(files)
  _write(tmp_path / paths[which].rsplit("/", 1)[1], records)
  with pytest.raises(lb.LlavaBenchDataError, match=message):
    lb.read_llava_bench(*paths)


def test_score_needs_one_reply_per_item(files):
  items = lb.read_llava_bench(*files)
  with pytest.raises(lb.LlavaBenchDataError, match="3 judge replies for 4 items"):
    lb.score_llava_bench(items, ["8 8"] * 3)
  metrics, pairs = lb.score_llava_bench(items, [JudgeReply(None, "down")] + ["8 4"] * 3)
  assert pairs[0] == lb.INVALID_PAIR and metrics["invalid"] == 1
  with pytest.raises(lb.LlavaBenchDataError, match="no valid judge reply"):
    lb.score_llava_bench(items, [None] * 4, drop_invalid=True)
