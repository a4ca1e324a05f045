"""LLaVA-Bench (Liu et al. 2023): a text-only judge compares a model's answer with a reference
answer (GPT-4's) given a description of the image, and the model is scored relative to the
reference.

Files, in the published layouts (JSON Lines):
  questions          {question_id, image, text, category}   category: conv | detail | complex
  reference answers  {question_id, text, ...}
  model answers      {question_id, text, ...}                (LLaVA's model_vqa output)
  context            COCO "qa90": {image, captions: [5 str], instances: [{category, bbox}]};
                     in-the-wild: {image, caption: str or list of str}
`read_llava_bench` joins them by question_id (and the context by image), stricter than the
published script, which pairs the three files line by line: a missing, repeated or unknown
id is an error naming the file and line.

Judging (`judge_llava_bench`): the judge sees the context (captions one per line; for COCO a
blank line and then one "category: [x1, y1, x2, y2]" line per box), the question, the
reference answer as assistant 1 and the model answer as assistant 2, and writes the two
scores (1-10) on its first line. The wording is our own unless `rules_path` names the
published rule.json; then the prompt is built exactly as the published scripts build it,
with the rule of key <category> (COCO) or llava_bench_<category> (in the wild). Pass the
published system prompt as `system_prompt` to reproduce it too.

Scoring, as published (`parse_score`, `summarize_gpt_review.py`): the first line of a reply,
commas turned into spaces, split on single spaces, must give exactly two numbers, else the
pair is (-1, -1), which stays in the means (`drop_invalid=True` leaves those items out
instead). A reply the backend could not get counts as invalid too. For each category and
'all', relative score = 100 * mean(model scores) / mean(reference scores): the ratio of the
means, not the mean of ratios. `published_rounding` gives the printed numbers.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from lmm_align.data.jsonl import read_jsonl
from lmm_align.judges.base import Judge, JudgeReply, JudgeRequest

LLAVA_BENCH_CATEGORIES = ("conv", "detail", "complex")
INVALID_PAIR = (-1.0, -1.0)  # the published fallback for a reply it cannot read


class LlavaBenchDataError(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class LlavaBenchItem:
  question_id: Any
  category: str
  image: str
  question: str
  context: str  # captions, and for COCO the object boxes, as the judge sees them
  reference_answer: str
  model_answer: str
  has_boxes: bool = False  # the context lists object boxes (COCO)


# --------------------------------------------------------------------------------------------
# Files.
# --------------------------------------------------------------------------------------------


def _require(path: str, number: int, record: dict[str, Any], fields: Sequence[str]) -> None:
  for field in fields:
    if field not in record:
      raise LlavaBenchDataError(f"{path}: line {number}: field {field!r} is missing")


def _texts_by_id(path: str, question_ids: Sequence[Any]) -> dict[Any, str]:
  """{question_id: text} of an answers file that answers each question exactly once."""
  out: dict[Any, str] = {}
  for number, record in enumerate(read_jsonl(path), start=1):
    _require(path, number, record, ("question_id", "text"))
    qid = record["question_id"]
    if qid in out:
      raise LlavaBenchDataError(f"{path}: line {number}: a second answer to question_id {qid!r}")
    if qid not in question_ids:
      raise LlavaBenchDataError(f"{path}: line {number}: question_id {qid!r} is no question")
    out[qid] = str(record["text"])
  missing = [q for q in question_ids if q not in out]
  if missing:
    raise LlavaBenchDataError(f"{path}: no answer to question_id(s) {missing[:10]}")
  return out


def format_context(record: dict[str, Any]) -> str:
  """The image description the judge reads, from a COCO or an in-the-wild context record."""
  if "captions" in record:
    text = "\n".join(record["captions"])
    boxes = "\n".join(f"{box['category']}: {box['bbox']}" for box in record.get("instances", []))
    return f"{text}\n\n{boxes}" if "instances" in record else text
  caption = record["caption"]
  # A string is one caption (the published in-the-wild script joins a str's characters).
  return caption if isinstance(caption, str) else "\n".join(caption)


def _contexts(path: str) -> dict[str, tuple[str, bool]]:
  """{image: (context text, whether it lists boxes)}."""
  out: dict[str, tuple[str, bool]] = {}
  for number, record in enumerate(read_jsonl(path), start=1):
    _require(path, number, record, ("image",))
    if "captions" not in record and "caption" not in record:
      raise LlavaBenchDataError(f"{path}: line {number}: needs field 'captions' or 'caption'")
    if record["image"] in out:
      raise LlavaBenchDataError(f"{path}: line {number}: image {record['image']!r} repeats")
    try:
      out[record["image"]] = (format_context(record), "instances" in record)
    except (KeyError, TypeError) as error:
      raise LlavaBenchDataError(f"{path}: line {number}: bad context ({error!r})") from None
  return out


def read_llava_bench(
  questions_path: str, reference_answers_path: str, model_answers_path: str, context_path: str
) -> list[LlavaBenchItem]:
  """One item per question, in question-file order, joined by question_id and image."""
  questions = read_jsonl(questions_path)
  ids: list[Any] = []
  for number, record in enumerate(questions, start=1):
    _require(questions_path, number, record, ("question_id", "image", "text", "category"))
    if record["question_id"] in ids:
      raise LlavaBenchDataError(
        f"{questions_path}: line {number}: question_id {record['question_id']!r} repeats"
      )
    ids.append(record["question_id"])
  references = _texts_by_id(reference_answers_path, ids)
  answers = _texts_by_id(model_answers_path, ids)
  contexts = _contexts(context_path)
  items = []
  for number, record in enumerate(questions, start=1):
    if record["image"] not in contexts:
      raise LlavaBenchDataError(
        f"{questions_path}: line {number}: image {record['image']!r} is not in {context_path}"
      )
    qid = record["question_id"]
    context, has_boxes = contexts[record["image"]]
    items.append(
      LlavaBenchItem(
        question_id=qid,
        category=str(record["category"]),
        image=record["image"],
        question=str(record["text"]),
        context=context,
        reference_answer=references[qid],
        model_answer=answers[qid],
        has_boxes=has_boxes,
      )
    )
  return items


# --------------------------------------------------------------------------------------------
# Judge prompts.
# --------------------------------------------------------------------------------------------

DEFAULT_SYSTEM_PROMPT = "You grade answers to questions about images, carefully and fairly."

_DEFAULT_PROMPT = """\
Two assistants answered a question about an image. You cannot see the image, but here is a
description of it{boxes}:

{context}

Question: {question}

Assistant 1's answer:
{answer_1}

Assistant 2's answer:
{answer_2}

Score each answer from 1 to 10 for how helpful, relevant, accurate and detailed it is, judged
against the description; a higher score is better. Write the two scores, assistant 1's first,
separated by one space, alone on the first line of your reply. From the second line on,
explain the scores. The order in which the answers appear must not affect your scores."""

_BOX_NOTE = (
  " (sentences by people who saw it, then each object's box as (x1, y1, x2, y2): its top-left"
  " and bottom-right corners, as fractions of the image width and height)"
)


def load_rules(path: str) -> dict[str, tuple[str, str]]:
  """{rule key: (role, prompt)} from a rule.json file."""
  with open(path) as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as error:
      raise LlavaBenchDataError(f"{path}: not JSON ({error.msg})") from None
  rules = {}
  for key, rule in data.items():
    if not isinstance(rule, dict) or not {"role", "prompt"} <= rule.keys():
      raise LlavaBenchDataError(f"{path}: rule {key!r} needs fields 'role' and 'prompt'")
    rules[key] = (rule["role"], rule["prompt"])
  return rules


def published_prompt(item: LlavaBenchItem, role: str, rule_prompt: str) -> str:
  """The user message exactly as LLaVA's eval_gpt_review_{visual,bench}.py build it."""
  return (
    f"[Context]\n{item.context}\n\n[Question]\n{item.question}\n\n"
    f"[{role} 1]\n{item.reference_answer}\n\n[End of {role} 1]\n\n"
    f"[{role} 2]\n{item.model_answer}\n\n[End of {role} 2]\n\n[System]\n{rule_prompt}\n\n"
  )


def default_prompt(item: LlavaBenchItem) -> str:
  """Our own wording of the comparison request; the box note only where boxes are listed."""
  return _DEFAULT_PROMPT.format(
    boxes=_BOX_NOTE if item.has_boxes else "",
    context=item.context,
    question=item.question,
    answer_1=item.reference_answer,
    answer_2=item.model_answer,
  )


def judge_llava_bench(
  items: Sequence[LlavaBenchItem],
  judge: Judge,
  *,
  rules_path: str | None = None,
  variant: str = "coco",
  system_prompt: str = DEFAULT_SYSTEM_PROMPT,
  max_tokens: int = 1024,
) -> list[JudgeReply]:
  """The judge's reply for each item, in order. With `rules_path` the prompts are the
  published ones; `variant` ('coco' or 'wild') picks the rule key."""
  if variant not in ("coco", "wild"):
    raise ValueError(f"variant must be 'coco' or 'wild', got {variant!r}")
  rules = load_rules(rules_path) if rules_path else None
  prompts = []
  for item in items:
    if rules is None:
      prompts.append(default_prompt(item))
      continue
    key = item.category if variant == "coco" else f"llava_bench_{item.category}"
    if key not in rules:
      raise LlavaBenchDataError(
        f"{rules_path}: no rule {key!r} for question_id {item.question_id!r}"
      )
    prompts.append(published_prompt(item, *rules[key]))
  requests = [
    JudgeRequest(
      p, system=system_prompt, max_tokens=max_tokens, request_id=f"llava-bench-{i.question_id}"
    )
    for p, i in zip(prompts, items)
  ]
  replies = judge.complete(requests)
  if len(replies) != len(requests):
    raise RuntimeError(f"judge {judge.name!r} returned {len(replies)} replies for {len(requests)}")
  return replies


# --------------------------------------------------------------------------------------------
# Scores.
# --------------------------------------------------------------------------------------------


def parse_score_pair(reply: str) -> tuple[float, float] | None:
  """(reference score, model score) from a reply's first line, or None where the published
  parser falls back to (-1, -1)."""
  parts = reply.split("\n")[0].replace(",", " ").split(" ")
  if len(parts) != 2:
    return None
  try:
    return float(parts[0]), float(parts[1])
  except ValueError:
    return None


def published_rounding(reference_mean: float, model_mean: float) -> tuple[float, float, float]:
  """(relative score, reference x10, model x10) as summarize_gpt_review.py prints them: the
  means rounded to 3 decimals first, each result to 1."""
  reference_mean, model_mean = round(reference_mean, 3), round(model_mean, 3)
  return (
    round(model_mean / reference_mean * 100, 1),
    round(reference_mean * 10, 1),
    round(model_mean * 10, 1),
  )


def score_llava_bench(
  items: Sequence[LlavaBenchItem],
  replies: Sequence[JudgeReply | str | None],
  *,
  drop_invalid: bool = False,
) -> tuple[dict[str, float], list[tuple[float, float]]]:
  """(metrics, each item's (reference, model) score pair) from one reply per item. Metrics,
  for each category present and for 'all' (bare keys): relative_score, reference_mean,
  model_mean, questions; plus invalid (replies that gave no pair)."""
  if len(replies) != len(items):
    raise LlavaBenchDataError(f"{len(replies)} judge replies for {len(items)} items")
  pairs, valid = [], []
  for reply in replies:
    text = reply.text if isinstance(reply, JudgeReply) else reply
    pair = None if text is None else parse_score_pair(text)
    pairs.append(INVALID_PAIR if pair is None else pair)
    valid.append(pair is not None)
  groups: dict[str, list[tuple[float, float]]] = {"": []}
  for item, pair, ok in zip(items, pairs, valid):
    if ok or not drop_invalid:
      groups[""].append(pair)
      groups.setdefault(f"/{item.category}", []).append(pair)
  metrics: dict[str, float] = {"invalid": valid.count(False)}
  for suffix, group in sorted(groups.items()):
    if not group:
      raise LlavaBenchDataError("no valid judge reply to score")
    reference_mean = sum(p[0] for p in group) / len(group)
    model_mean = sum(p[1] for p in group) / len(group)
    metrics[f"relative_score{suffix}"] = (
      100 * model_mean / reference_mean if reference_mean else float("nan")
    )
    metrics[f"reference_mean{suffix}"] = reference_mean
    metrics[f"model_mean{suffix}"] = model_mean
    metrics[f"questions{suffix}"] = len(group)
  return metrics, pairs
