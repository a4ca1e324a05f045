"""`python -m lmm_align.evaluate BENCHMARK ...`: a model's answers to a benchmark, scored, reported.

  python -m lmm_align.evaluate pope --model=HF_DIR --questions=coco_pope_random.json,...
      --images=val2014/ --out=DIR [--suffix] [--limit=N]
  python -m lmm_align.evaluate pope --questions=FILE --answers=FILE        (score only)
  python -m lmm_align.evaluate mmhal --model=HF_DIR --template=FILE --images=DIR
      --judge=openai:gpt-4o [--judge_base_url=URL --judge_api_key_env=NAME] --out=DIR
  python -m lmm_align.evaluate chair --model=HF_DIR --questions=FILE --images=DIR
      --coco_instances=A.json,B.json --coco_captions=C.json,D.json [--synonyms=FILE] --out=DIR
  python -m lmm_align.evaluate llava_bench --model=HF_DIR --questions=Q --reference_answers=R
      --context=C --images=DIR --judge=model:HF_DIR [--rules=rule.json] --out=DIR
  python -m lmm_align.evaluate KIND --model=HF_DIR [--workdir=RUN] --out=DIR [--eval_seed=S]
      (KIND: an evaluation kind of `lmm_align.evals.registry`, e.g. the shapes world's "shapes")

Design. Every benchmark runs the same three steps: answers (generated from `--model`, a local
HF folder such as `lmm-align export` writes, or read from `--answers` to score only), the
benchmark's own scorer in `lmm_align.evals` (its file errors name the file, record and field),
and `--out`: answers*.jsonl, metrics.json and report.html / report.md (a metrics table per split
or question type, a bar plot of the main metrics, 8 example answers with image thumbnails).
Metrics are flat: several POPE splits give `<split>/<metric>` and their mean under the bare
names; one split gives exactly the scorer's dict, as `lmm-align eval pope` always printed.

An evaluation kind (`evals.registry`, which plugins add to) asks its own questions: it runs as
a training run's final evaluation does, with that run's config (`--workdir`) or the kind's
default config, and reports the same way.

Generation is greedy and batched on the KV-cached sampler (`evals.answers.answer_questions`),
questions sorted by prompt length so a batch shares a prompt-length bucket (one compilation per
bucket). It runs on the process's default local device with the params on it: it is not
sharded over a training mesh, so the model must fit one accelerator (`--dtype=bfloat16` halves
it), and it is single-process. Answers are appended to the answers file after every batch; a
rerun with the same `--out` keeps the answers already there (same model_id and prompt, else it
refuses) and asks only the rest, so a killed evaluation continues. No question suffix is added
unless `--suffix` is given (alone it is LLaVA's short-answer instruction, which LLaVA's POPE
script appends). Judges come from `--judge=openai:MODEL` (cached on disk in OUT/judge_cache, so
a rerun is not billed twice) or `--judge=model:HF_DIR` (in-process); `JUDGE_BACKENDS` is the
registry (tests add a scripted judge there).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import dataclasses
import io
import json
import math
import os
import pathlib
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from PIL import Image
from tqdm import tqdm

from lmm_align.data import jsonl
from lmm_align.data.images import load_image, to_rgb
from lmm_align.evals import chair, llava_bench, mmhal, pope
from lmm_align.evals import registry as eval_registry
from lmm_align.evals.answers import answer_questions
from lmm_align.evals.report import Report
from lmm_align.inference import (
  DEFAULT_CONV_TEMPLATE,
  LoadedModel,
  load_model_folder,
)
from lmm_align.judges.base import Judge, JudgeReply, JudgeRequest

# LLaVA's eval scripts append this to every POPE question (`--suffix` with no value).
LLAVA_SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."
# LLaVA's model_vqa default (128) for POPE; long answers for the free-form benchmarks.
DEFAULT_MAX_NEW_TOKENS = {"pope": 128, "mmhal": 512, "chair": 512, "llava_bench": 1024}
DEFAULT_BATCH_SIZE = 8
NUM_EXAMPLES = 8
JUDGE_CHUNK = 32  # requests per judge call: the progress bar's step
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
_IMAGE_FILE_NAME = re.compile(r"[^\n]{1,255}\.(?:jpe?g|png|bmp|gif|webp)", re.IGNORECASE)

# --------------------------------------------------------------------------------------------
# Questions and answers files: incremental writes, resume.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Question:
  question_id: Any
  prompt: str  # what the model is asked (suffix included); written as the answer's "prompt"
  image: str | Image.Image  # a file path, or the image itself (a file that embeds images)
  where: str  # "FILE: record N", for error messages
  fields: dict[str, Any] = dataclasses.field(default_factory=dict)  # copied into the answer


AnswerFn = Callable[[Sequence[Question]], list[str]]


@dataclasses.dataclass(frozen=True)
class Answerer:
  """Answers batches of questions under one model id (a model, or in tests any function)."""

  answer_batch: AnswerFn
  model_id: str
  batch_size: int


def image_file(images_dir: str | None, name: str, where: str) -> str:
  """IMAGES_DIR/name, which must exist; errors name the record and the path."""
  if not images_dir:
    raise ValueError(f"{where}: image {name!r} needs --images=DIR")
  path = os.path.join(images_dir, name)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{where}: image file {path!r} does not exist")
  return path


def model_answerer(loaded: LoadedModel, *, batch_size: int, max_new_tokens: int) -> Answerer:
  """Greedy answers from a loaded model, `batch_size` rows per sampler call."""
  if loaded.image_config is None:
    raise ValueError(f"{loaded.model_id}: a text-only model cannot answer questions about images")

  def answer_batch(questions: Sequence[Question]) -> list[str]:
    images = []
    for q in questions:
      try:
        images.append(q.image if isinstance(q.image, Image.Image) else load_image(q.image))
      except ValueError as e:
        raise ValueError(f"{q.where}: {e}") from None
    texts, _ = answer_questions(
        loaded.model, loaded.params, loaded.tokenizer, loaded.image_config,
        [q.prompt for q in questions], images,
        template=loaded.template, batch_size=batch_size, max_new_tokens=max_new_tokens,
    )  # fmt: skip
    return texts

  return Answerer(answer_batch, loaded.model_id, batch_size)


def read_partial_answers(
  path: str, questions: dict[Any, Question], model_id: str
) -> dict[Any, dict[str, Any]]:
  """{question_id: answer record} already in `path` (empty if it does not exist). A last line
  cut off mid-write is dropped; an answer by another model, to another prompt or to a question
  not asked, or a repeated id, is an error naming the line."""
  if not os.path.exists(path):
    return {}
  done: dict[Any, dict[str, Any]] = {}
  for number, record in jsonl.numbered_records(path, tolerate_cut_tail=True):
    where = f"{path}: line {number}"
    if not isinstance(record.get("text"), str):
      raise ValueError(f"{where}: an answer needs 'question_id' and a string 'text'")
    qid = record.get("question_id")
    if qid in done:
      raise ValueError(f"{where}: a second answer to question_id {qid!r}")
    if qid not in questions:
      raise ValueError(f"{where}: question_id {qid!r} is not asked in this run; use another --out")
    if record.get("model_id") != model_id:
      raise ValueError(
        f"{where}: answered by {record.get('model_id')!r}, not {model_id!r}; use another --out"
      )
    if record.get("prompt") != questions[qid].prompt:
      raise ValueError(f"{where}: question_id {qid!r} was asked another prompt (--suffix?)")
    done[qid] = record
  return done


def generate_answers(
  questions: Sequence[Question], answerer: Answerer, path: str, desc: str = "answering"
) -> list[dict[str, Any]]:
  """Answer records {question_id, prompt, text, model_id, **fields}, one per question, in
  question order, in the JSONL file `path`: those already there are kept, the rest appended
  batch by batch, and the file is rewritten in question order at the end."""
  by_id: dict[Any, Question] = {}
  for q in questions:
    if q.question_id in by_id:
      raise ValueError(
        f"{q.where}: question_id {q.question_id!r} repeats {by_id[q.question_id].where}"
      )
    by_id[q.question_id] = q
  done = read_partial_answers(path, by_id, answerer.model_id)
  pending = sorted((q for q in questions if q.question_id not in done), key=lambda q: len(q.prompt))
  jsonl.write_jsonl(path, list(done.values()))  # without a cut-off last line, before appending
  with (
    open(path, "a", encoding="utf-8") as f,
    tqdm(total=len(questions), initial=len(done), desc=desc, unit="q", file=sys.stderr) as bar,
  ):
    for start in range(0, len(pending), answerer.batch_size):
      chunk = pending[start : start + answerer.batch_size]
      texts = answerer.answer_batch(chunk)
      if len(texts) != len(chunk):
        raise RuntimeError(f"{len(texts)} answers to a batch of {len(chunk)} questions")
      for q, text in zip(chunk, texts):
        done[q.question_id] = {"question_id": q.question_id, "prompt": q.prompt, "text": text,
                               "model_id": answerer.model_id, **q.fields}  # fmt: skip
      jsonl.append_jsonl(f, [done[q.question_id] for q in chunk])
      bar.update(len(chunk))
  answers = [done[q.question_id] for q in questions]
  jsonl.write_jsonl(path, answers)
  return answers


def _subset_file(path: str, records: list[dict[str, Any]], total: int, copy: str) -> str:
  """`path` when `records` are all of it, else `records` written to `copy` (a --limit run is
  scored against exactly the questions it asked)."""
  if len(records) == total:
    return path
  jsonl.write_jsonl(copy, records)
  return copy


def _spread(items: Sequence[Any], n: int = NUM_EXAMPLES) -> list[Any]:
  """n items evenly spaced over the sequence (all of them when it is shorter)."""
  if len(items) <= n:
    return list(items)
  return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


# --------------------------------------------------------------------------------------------
# Judges.
# --------------------------------------------------------------------------------------------


def _openai_judge(model_name: str, args: argparse.Namespace) -> Judge:
  from lmm_align.judges.http import OpenAIJudge

  return OpenAIJudge(
    args.judge_base_url,
    model_name,
    api_key_env=args.judge_api_key_env or None,
    cache_dir=os.path.join(args.out, "judge_cache") if args.out else None,
  )


def _model_judge(folder: str, args: argparse.Namespace) -> Judge:
  from lmm_align.judges.model import ModelJudge

  loaded = load_model_folder(folder, template=args.judge_template, dtype=args.dtype)
  return ModelJudge(
      loaded.model, loaded.params, loaded.tokenizer, loaded.image_config,
      template=args.judge_template, batch_size=args.judge_batch_size,
      max_new_tokens=args.judge_max_new_tokens, name=f"model:{loaded.model_id}",
  )  # fmt: skip


# `--judge=BACKEND:TARGET` -> JUDGE_BACKENDS[BACKEND](TARGET, args).
JUDGE_BACKENDS: dict[str, Callable[[str, argparse.Namespace], Judge]] = {
  "openai": _openai_judge,
  "model": _model_judge,
}


def make_judge(spec: str | None, args: argparse.Namespace) -> Judge:
  """The judge `--judge` names, wrapped to show a progress bar."""
  backend, _, target = (spec or "").partition(":")
  if backend not in JUDGE_BACKENDS or not target:
    raise ValueError(f"--judge={spec!r}: use {' or '.join(f'{b}:...' for b in JUDGE_BACKENDS)}")
  return ProgressJudge(JUDGE_BACKENDS[backend](target, args))


class ProgressJudge:
  """A judge asked in chunks of JUDGE_CHUNK requests, with a progress bar over them."""

  def __init__(self, judge: Judge):
    self.judge, self.name = judge, judge.name

  def complete(self, requests: Sequence[JudgeRequest]) -> list[JudgeReply]:
    replies: list[JudgeReply] = []
    with tqdm(total=len(requests), desc=f"judging ({self.name})", file=sys.stderr) as bar:
      for start in range(0, len(requests), JUDGE_CHUNK):
        replies += self.judge.complete(requests[start : start + JUDGE_CHUNK])
        bar.update(min(JUDGE_CHUNK, len(requests) - start))
    return replies


# --------------------------------------------------------------------------------------------
# Benchmarks: each returns an Outcome.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
  metrics: dict[str, Any]
  rows: list[dict[str, Any]]  # the report's metrics table
  bar_label: str  # the column naming each row in the bar plot
  bar_metrics: tuple[str, ...]
  examples: list[dict[str, Any]]  # {"image": path / PIL image / None, text columns ...}


def _records_checked(path: str, fields: Sequence[str], limit: int | None) -> list[dict[str, Any]]:
  records = jsonl.read_jsonl(path)
  for number, record in enumerate(records[:limit], start=1):
    for field in fields:
      if field not in record:
        raise ValueError(f"{path}: record {number}: field {field!r} is missing")
  return records


def jsonl_questions(
  path: str, records: Sequence[dict[str, Any]], args: argparse.Namespace, copied: Sequence[str] = ()
) -> list[Question]:
  """Questions from records {question_id, image (a file in --images), text}; the `copied`
  fields go into the answers too. A missing image fails here, before any generation."""
  questions = []
  for number, record in enumerate(records, start=1):
    where = f"{path}: record {number}"
    image = image_file(args.images, record["image"], where)
    fields = {k: record[k] for k in copied}
    questions.append(
      Question(record["question_id"], str(record["text"]) + args.suffix, image, where, fields)
    )
  return questions


def run_pope(args: argparse.Namespace, answerer: Answerer | None) -> Outcome:
  paths = args.questions
  splits = [pope.split_name(p) for p in paths]
  if len(set(splits)) != len(splits):
    raise ValueError(f"--questions: two files give the same split name: {splits}")
  if answerer is None and len(args.answers) != len(paths):
    raise ValueError(f"{len(paths)} --questions files but {len(args.answers)} --answers files")
  per_split, examples = {}, []
  for i, (split, path) in enumerate(zip(splits, paths)):
    records = _records_checked(path, ("question_id", "image", "text"), args.limit)
    asked = records[: args.limit]
    if answerer is None:
      answers_path, scored = args.answers[i], path
    else:
      answers_path = os.path.join(args.out, f"answers_{split}.jsonl")
      copy = os.path.join(args.out, f"questions_{split}.jsonl")
      scored = _subset_file(path, asked, len(records), copy)
      questions = jsonl_questions(path, asked, args)
      generate_answers(questions, answerer, answers_path, desc=f"pope {split}")
    per_split[split] = pope.score_pope_files(scored, answers_path)
    texts = {a["question_id"]: a["text"] for a in jsonl.read_jsonl(answers_path)}
    examples += [
      {"image": _optional_image(args.images, r["image"]), "split": split, "question": r["text"],
       "label": r["label"], "answer": texts[r["question_id"]],
       "read as": pope.pope_prediction(str(texts[r["question_id"]]))}
      for r in _spread(asked, NUM_EXAMPLES // len(paths) or 1)
    ]  # fmt: skip
  rows = [
    {"split": s, "questions": m["tp"] + m["fp"] + m["tn"] + m["fn"],
     **{k: m[k] for k in pope.MAIN_METRICS}} for s, m in per_split.items()
  ]  # fmt: skip
  metrics = pope.combine_splits(per_split)
  if len(rows) > 1:
    rows.append({"split": "mean", **{k: metrics[k] for k in pope.MAIN_METRICS}})
  return Outcome(metrics, rows, "split", pope.MAIN_METRICS, _spread(examples))


def _optional_image(images_dir: str | None, name: str) -> str | None:
  """The image for a report thumbnail, where it can be found (scoring needs none)."""
  path = os.path.join(images_dir, name) if images_dir else None
  return path if path and os.path.isfile(path) else None


def run_mmhal(args: argparse.Namespace, answerer: Answerer | None) -> Outcome:
  records = mmhal.read_mmhal_records(args.template)[: args.limit]
  answers_path = args.answers[0] if answerer is None else os.path.join(args.out, "answers.jsonl")
  images = {}
  if args.images:
    for i, record in enumerate(records):
      try:
        images[i] = mmhal.mmhal_image_path(record, i, args.images)
      except mmhal.MmhalDataError as e:
        if answerer is not None:
          raise mmhal.MmhalDataError(f"{args.template}: {e}") from None
  if answerer is not None:
    if not args.images:
      raise ValueError("mmhal: generating answers needs --images=DIR")
    questions = [
      Question(i, r.question + args.suffix, images[i], f"{args.template}: record {i}",
               {"question_type": r.question_type}) for i, r in enumerate(records)
    ]  # fmt: skip
    generate_answers(questions, answerer, answers_path, desc="mmhal")
  filled = mmhal.fill_mmhal_answers(records, answers_path)
  prompt = mmhal.load_mmhal_prompt(args.judge_prompt) if args.judge_prompt else None
  replies = mmhal.judge_mmhal(
    filled, make_judge(args.judge, args), prompt_template=prompt or mmhal.DEFAULT_MMHAL_PROMPT
  )
  metrics, scores = mmhal.score_mmhal(filled, replies)
  if args.out:
    jsonl.write_jsonl(os.path.join(args.out, "judgements.jsonl"), [
      {"question_id": i, "score": s, "reply": r.text, "error": r.error}
      for i, (s, r) in enumerate(zip(scores, replies))
    ])  # fmt: skip
  rows = []
  for question_type in [*mmhal.MMHAL_QUESTION_TYPES, "all"]:
    got = [s for r, s in zip(filled, scores) if s is not None and question_type in (r.question_type, "all")]  # fmt: skip
    if got:
      hallucinated = [s < mmhal.HALLUCINATION_BELOW for s in got]
      rows.append({"question_type": question_type, "questions": len(got),
                   "average_score": float(np.mean(got)),
                   "hallucination_rate": float(np.mean(hallucinated))})  # fmt: skip
  examples = [
    {"image": images.get(i), "type": r.question_type, "question": r.question,
     "answer": r.model_answer, "human answer": r.gt_answer, "score": scores[i]}
    for i, r in _spread(list(enumerate(filled)))
  ]  # fmt: skip
  return Outcome(metrics, rows, "question_type", ("average_score",), examples)


def _chair_question(record: dict[str, Any], index: int, path: str, args) -> Question:
  """A question in LLaVA's layout (question_id, image file, text) or RLAIF-V's (image_id, the
  image base64-encoded in 'image', question); the id defaults to the record's index."""
  where = f"{path}: record {index + 1}"
  text = record.get("text", record.get("question"))
  if not isinstance(text, str):
    raise chair.ChairDataError(f"{where}: needs a string field 'text' or 'question'")
  value = record.get("image")
  if not isinstance(value, str):
    raise chair.ChairDataError(f"{where}: needs a string field 'image' (a file name or base64)")
  if _IMAGE_FILE_NAME.fullmatch(value):
    image = image_file(args.images, value, where)
    fields = {"image_id": record["image_id"]} if "image_id" in record else {"image": value}
  else:
    if "image_id" not in record:
      raise chair.ChairDataError(f"{where}: an embedded image needs the field 'image_id'")
    try:
      with Image.open(io.BytesIO(base64.b64decode(value, validate=True))) as opened:
        opened.load()  # to_rgb may hand back the same lazily read image
        image = to_rgb(opened)
    except (binascii.Error, OSError) as e:
      raise chair.ChairDataError(
        f"{where}: field 'image' is no image file name or base64 image ({e})"
      ) from None
    fields = {"image_id": record["image_id"]}
  return Question(record.get("question_id", index), text + args.suffix, image, where, fields)


def run_chair(args: argparse.Namespace, answerer: Answerer | None) -> Outcome:
  questions: dict[Any, Question] = {}
  if answerer is not None:
    records = jsonl.read_jsonl(args.questions[0])[: args.limit]
    asked = [_chair_question(r, i, args.questions[0], args) for i, r in enumerate(records)]
    answers_path = os.path.join(args.out, "answers.jsonl")
    generate_answers(asked, answerer, answers_path, desc="chair")
    questions = {q.question_id: q for q in asked}
  else:
    answers_path = args.answers[0]
  metrics, results = chair.score_chair_files(
    answers_path, args.coco_instances, args.coco_captions,
    synonyms_path=args.synonyms,
    questions_path=args.questions[0] if answerer is None and args.questions else None,
    judge=make_judge(args.judge, args) if args.judge else None,
    extraction_prompt_path=args.judge_prompt,
  )  # fmt: skip
  keys = ("responses", "chair_s", "response_hallucination_rate", "chair_i", "object_recall",
          "average_words")  # fmt: skip
  examples = [
    {"image": questions[r.key].image if r.key in questions else None, "image_id": r.image_id,
     "answer": r.text, "objects": ", ".join(m.coco_class for m in r.mentions),
     "hallucinated": ", ".join(m.coco_class for m in r.hallucinated)}
    for r in _spread(results)
  ]  # fmt: skip
  bars = ("chair_s", "response_hallucination_rate", "chair_i", "object_recall")
  return Outcome(metrics, [{"set": "all", **{k: metrics[k] for k in keys}}], "set", bars, examples)


def run_llava_bench(args: argparse.Namespace, answerer: Answerer | None) -> Outcome:
  path = args.questions[0]
  records = _records_checked(path, ("question_id", "image", "text", "category"), args.limit)
  asked = records[: args.limit]
  questions_path, references_path = path, args.reference_answers
  if answerer is not None:
    answers_path = os.path.join(args.out, "answers.jsonl")
    if len(asked) < len(records):  # --limit: score the questions asked against their references
      questions_path = os.path.join(args.out, "questions.jsonl")
      references_path = os.path.join(args.out, "reference_answers.jsonl")
      ids = {r["question_id"] for r in asked}
      jsonl.write_jsonl(questions_path, asked)
      jsonl.write_jsonl(references_path, [r for r in jsonl.read_jsonl(args.reference_answers)
                                     if r.get("question_id") in ids])  # fmt: skip
    questions = jsonl_questions(path, asked, args, copied=("category",))
    generate_answers(questions, answerer, answers_path, desc="llava_bench")
  else:
    answers_path = args.answers[0]
  items = llava_bench.read_llava_bench(questions_path, references_path, answers_path, args.context)
  system = llava_bench.DEFAULT_SYSTEM_PROMPT
  if args.judge_system_prompt:
    system = pathlib.Path(args.judge_system_prompt).read_text().strip()
  replies = llava_bench.judge_llava_bench(items, make_judge(args.judge, args),
                                          rules_path=args.rules, variant=args.variant,
                                          system_prompt=system)  # fmt: skip
  metrics, pairs = llava_bench.score_llava_bench(items, replies)
  if args.out:
    jsonl.write_jsonl(os.path.join(args.out, "judgements.jsonl"), [
      {"question_id": i.question_id, "category": i.category, "scores": list(p), "reply": r.text,
       "error": r.error} for i, p, r in zip(items, pairs, replies)
    ])  # fmt: skip
  rows = []
  for category in [*llava_bench.LLAVA_BENCH_CATEGORIES, "all"]:
    suffix = "" if category == "all" else f"/{category}"
    if f"questions{suffix}" in metrics:
      keys = ("relative_score", "reference_mean", "model_mean", "questions")
      rows.append({"category": category, **{k: metrics[k + suffix] for k in keys}})
  examples = [
    {"image": _optional_image(args.images, i.image), "category": i.category,
     "question": i.question, "answer": i.model_answer, "scores (reference, model)": list(p)}
    for i, p in _spread(list(zip(items, pairs)))
  ]  # fmt: skip
  return Outcome(metrics, rows, "category", ("relative_score",), examples)


def run_evaluation(args: argparse.Namespace) -> Outcome:
  """An evaluation kind of `evals.registry` (a plugin's: the shapes world's held-out scenes) on
  `--model`, with a training run's config (`--workdir`) or the kind's default config file;
  `--limit`, `--eval_seed`, `--batch_size` and `--max_new_tokens` replace the config's size,
  seed and generation settings. The kind asks its own questions."""
  from lmm_align import config_files

  evaluation = eval_registry.get(args.benchmark)
  if args.workdir:
    from lmm_align.run_config import load_workdir_config

    config = load_workdir_config(args.workdir)
  elif evaluation.default_config:
    config = config_files.load_config(evaluation.default_config, str(REPO_ROOT))
  else:
    raise ValueError(f"{args.benchmark} needs --workdir (a run whose config.json sets it up)")
  overrides = {
    ("--limit", evaluation.limit_field): args.limit,
    ("--eval_seed", evaluation.seed_field): args.eval_seed,
    ("--batch_size", "eval.batch_size"): args.batch_size,
    ("--max_new_tokens", "eval.max_new_tokens"): args.max_new_tokens,
  }
  for (flag, field), value in overrides.items():
    if value is None:
      continue
    if not field:
      raise ValueError(f"{flag}: evaluation {args.benchmark!r} names no config field it sets")
    *parents, name = field.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[name] = value
  template = args.conv_template or config.data.template
  loaded = load_model_folder(args.model, template=template, dtype=args.dtype,
                             aspect_mode=args.aspect_mode, model_id=args.model_id)  # fmt: skip
  metrics = evaluation.run(config, loaded)
  raw_examples = metrics.pop("examples", [])
  examples = evaluation.report_examples(config, raw_examples) if evaluation.report_examples else []
  bars = evaluation.main_metrics or tuple(k for k, v in metrics.items() if isinstance(v, float))
  return Outcome(metrics, [{"set": args.benchmark, **metrics}], "set", bars, examples)


RUNNERS = {"pope": run_pope, "mmhal": run_mmhal, "chair": run_chair, "llava_bench": run_llava_bench}


def benchmarks() -> tuple[str, ...]:
  """The built-in benchmarks, then the other registered evaluation kinds (plugins' included;
  "pope" is both: here the file-level report, in a run its `evals.kinds` registration)."""
  return (*RUNNERS, *(k for k in eval_registry.kinds() if k not in RUNNERS))


# --------------------------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------------------------


def bar_figure(rows: Sequence[dict[str, Any]], label: str, metrics: Sequence[str]) -> Figure:
  """Bars of `metrics` for each row: grouped by metric, one colour per row; a single metric
  gets one bar per row instead."""
  figure = Figure(figsize=(6.4, 4.0))
  axes = figure.add_subplot()
  value = lambda row, k: float(row[k]) if isinstance(row.get(k), int | float) else math.nan
  if len(metrics) == 1:
    axes.bar([str(r[label]) for r in rows], [value(r, metrics[0]) for r in rows])
    axes.set(ylabel=metrics[0])
    axes.tick_params(axis="x", labelrotation=20)
  else:
    x, width = np.arange(len(metrics)), 0.8 / len(rows)
    for i, row in enumerate(rows):
      offset = (i - (len(rows) - 1) / 2) * width
      axes.bar(x + offset, [value(row, k) for k in metrics], width, label=str(row[label]))
    axes.set_xticks(x, list(metrics), rotation=20, ha="right")
    axes.legend()
  axes.grid(axis="y", alpha=0.3)
  return figure


def write_outputs(out: str, args: argparse.Namespace, outcome: Outcome) -> None:
  """OUT/metrics.json and OUT/report.{html,md} with the PNG files they link."""
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "metrics.json"), "w") as f:
    json.dump(outcome.metrics, f, indent=2, sort_keys=True)
  report = Report(f"{args.benchmark}: {args.model_id or args.model or 'given answers'}")
  settings = {k: getattr(args, k) for k in ("model", "answers", "questions", "template", "judge",
                                            "suffix", "limit", "max_new_tokens", "batch_size")}  # fmt: skip
  shown = {k: v for k, v in settings.items() if v not in (None, "", [])}
  report.add_text("\n".join(f"- {k}: `{json.dumps(v)}`" for k, v in shown.items()))
  report.add_table("Metrics", outcome.rows)
  figure = bar_figure(outcome.rows, outcome.bar_label, outcome.bar_metrics)
  report.add_figure("Main metrics", figure, "metrics.png")
  if outcome.examples:
    report.add_examples("Example answers", outcome.examples)
  report.write(out)


# --------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------


def _file_list(values: list[str] | None) -> list[str]:
  """Repeated flags and comma-separated lists, flattened."""
  return [p for v in values or [] for p in v.split(",") if p]


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="lmm-align eval", allow_abbrev=False,
                              description=__doc__.split("\n\n")[0])  # fmt: skip
  p.add_argument("benchmark", choices=benchmarks())
  add = p.add_argument
  add("--model", help="a local HF model folder to generate answers with")
  add("--answers", action="append", help="answers JSONL to score instead (pope: one per file)")
  add("--out", help="where answers*.jsonl, metrics.json and report.html/.md go")
  add("--questions", action="append", help="question JSONL (pope: one per split, comma list)")
  add("--images", help="the folder of the questions' image files")
  add("--template", help="mmhal: the MMHal-Bench template JSON")
  add("--suffix", nargs="?", const=LLAVA_SHORT_ANSWER_SUFFIX, default="",
      help="appended to every question; alone: LLaVA's %(const)r; '\\n' means a newline")  # fmt: skip
  add("--batch_size", type=int, help=f"rows per sampler call (default {DEFAULT_BATCH_SIZE})")
  add("--max_new_tokens", type=int, help=f"answer budget (default {DEFAULT_MAX_NEW_TOKENS})")
  add("--limit", type=int, help="answer only the first N questions (of each file)")
  add("--conv_template", help=f"conversation template (default {DEFAULT_CONV_TEMPLATE})")
  add("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
  add("--aspect_mode", choices=("crop", "pad"), help="override the processor's (LLaVA-1.5: pad)")
  add("--model_id", help="written into answers (default: the model folder's name)")
  add("--judge", help="openai:MODEL or model:HF_DIR")
  add("--judge_base_url", default="https://api.openai.com/v1")
  add("--judge_api_key_env", default="OPENAI_API_KEY", help="'' for a server without a key")
  add("--judge_prompt", help="mmhal: the judge prompt file; chair: the object-extraction one")
  add("--judge_template", default=DEFAULT_CONV_TEMPLATE, help="model judge: conversation")
  add("--judge_batch_size", type=int, default=8)
  add("--judge_max_new_tokens", type=int, default=512)
  add("--judge_system_prompt", help="llava_bench: a file with the judge's system prompt")
  add("--coco_instances", action="append", help="chair: COCO instances JSON (comma list)")
  add("--coco_captions", action="append", help="chair: COCO captions JSON (comma list)")
  add("--synonyms", help="chair: synonyms file (e.g. RLAIF-V's synonyms_refine.txt)")
  add("--reference_answers", help="llava_bench: the reference (GPT-4) answers JSONL")
  add("--context", help="llava_bench: the captions / boxes JSONL")
  add("--rules", help="llava_bench: the published rule.json")
  add("--variant", default="coco", choices=("coco", "wild"), help="llava_bench: rule keys")
  add("--workdir", help="an evaluation kind: a training run whose config.json sets it up")
  add("--eval_seed", "--scene_seed", type=int, dest="eval_seed",
      help="an evaluation kind: its seed (shapes: the held-out scenes'; default: the config's, "
      "which training runs evaluate on; another seed gives scenes no run saw)")  # fmt: skip
  return p


_REQUIRED = {
  "pope": ("questions",),
  "mmhal": ("template", "judge"),
  "chair": ("coco_instances", "coco_captions"),
  "llava_bench": ("questions", "reference_answers", "context", "judge"),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = build_parser()
  args = parser.parse_args(argv)
  for name in ("questions", "answers", "coco_instances", "coco_captions"):
    setattr(args, name, _file_list(getattr(args, name)))
  args.suffix = args.suffix.replace("\\n", "\n")
  kind = args.benchmark not in RUNNERS  # an evaluation kind: it asks its own questions
  required = ("model", "out") if kind else _REQUIRED[args.benchmark]
  missing = [f"--{name}" for name in required if not getattr(args, name)]
  if not kind and bool(args.model) == bool(args.answers):
    missing.append("exactly one of --model (generate) and --answers (score only)")
  if args.model and not args.out:
    missing.append("--out (where the answers go)")
  if args.benchmark == "chair" and args.model and not args.questions:
    missing.append("--questions")
  if missing:
    parser.error(f"{args.benchmark} needs {', '.join(missing)}")
  if kind and args.answers:
    parser.error(f"{args.benchmark} asks its own questions: it takes --model, not --answers")
  if args.answers and args.limit:
    parser.error("--limit selects questions to answer; it does not apply to --answers")
  for name in ("batch_size", "max_new_tokens", "limit"):
    if getattr(args, name) is not None and getattr(args, name) < 1:
      parser.error(f"--{name} must be >= 1")
  return args


def cli(argv: list[str]) -> dict[str, Any]:
  """Runs `lmm-align eval BENCHMARK [flags]` (argv without the program name) and returns its
  metrics; with --out also writes metrics.json and the report there."""
  args = parse_args(argv)
  if args.benchmark not in RUNNERS:
    outcome = run_evaluation(args)
  else:
    answerer = None
    if args.model:
      loaded = load_model_folder(args.model, template=args.conv_template or DEFAULT_CONV_TEMPLATE,
                                 dtype=args.dtype, aspect_mode=args.aspect_mode,
                                 model_id=args.model_id)  # fmt: skip
      os.makedirs(args.out, exist_ok=True)
      answerer = model_answerer(
        loaded,
        batch_size=args.batch_size or DEFAULT_BATCH_SIZE,
        max_new_tokens=args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[args.benchmark],
      )
      args.model_id = loaded.model_id
    outcome = RUNNERS[args.benchmark](args, answerer)
  if args.out:
    write_outputs(args.out, args, outcome)
  return outcome.metrics


def main(argv: list[str]) -> None:
  """cli, then the metrics as JSON on stdout (progress bars go to stderr)."""
  print(json.dumps(cli(argv), indent=2, sort_keys=True))


if __name__ == "__main__":
  main(sys.argv[1:])
