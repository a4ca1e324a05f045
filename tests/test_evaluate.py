"""`lmm_align.evaluate` on a tiny random LLaVA exported as an HF folder (BPE tokenizer and
processor beside it): POPE end to end over two split files, scoring-only output unchanged,
resuming a killed run, MMHal / LLaVA-Bench with a scripted judge, Object HalBench with embedded
images, the shapes world, and the errors for a missing image or a mismatched partial file.

The model's answers are random text, so metrics are checked against the scorers' functions
applied to the answers it wrote (POPE against `pope_metrics` on the file's texts); where exact
numbers matter (CHAIR, MMHal, LLaVA-Bench) the answers come from a scripted answerer and the
expected metrics are worked out by hand. One sampler shape (batch 2, 4 new tokens, one prompt
bucket) serves every generating test, so the module compiles once.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import io
import json
import pathlib
import re
import subprocess
import sys
from collections.abc import Callable

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from lmm_align import evaluate, hf, inference, sampling
from lmm_align.data import conversation
from lmm_align.data.images import ImageProcessorConfig
from lmm_align.data.tokenizer import train_bpe_tokenizer
from lmm_align.evals import pope
from lmm_align.evals.pope import pope_metrics, score_pope_files
from lmm_align.judges.base import FunctionJudge
from lmm_align.models import Llava, get_variant
from lmm_align.models.llava import dummy_inputs
from lmm_align.trainers.export import hf_processor

REPO = pathlib.Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FAST = ["--batch_size=2", "--max_new_tokens=4"]
QUESTION = "Is there a {} in the image?"


# --------------------------------------------------------------------------------------------
# Fixtures: an exported tiny model, images, question files.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
  template = conversation.get_template("vicuna_v1")
  corpus = [template.system, "USER: ASSISTANT: " + QUESTION.format("red circle") + " Yes. No."]
  tokenizer = train_bpe_tokenizer(corpus * 4, vocab_size=300)
  base = get_variant("tiny")
  text = dataclasses.replace(
    base.text,
    vocab_size=len(tokenizer),
    pad_token_id=tokenizer.pad_token_id,
    bos_token_id=tokenizer.bos_token_id,
    eos_token_id=tokenizer.eos_token_id,
  )
  config = base.replace(text=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
  model = Llava(config)
  processor = hf_processor(tokenizer, model, ImageProcessorConfig(size=32, crop_size=32))
  folder = tmp_path_factory.mktemp("model") / "tiny-llava"
  hf.save_pretrained(model, _random_params(model), folder, processor=processor)
  return str(folder)


def _random_params(model: Llava) -> dict:
  """Random weights from the params' shapes (no compiled init: that alone takes seconds)."""
  shapes = jax.eval_shape(
    lambda: nn.unbox(model.init(jax.random.key(0), *dummy_inputs(model.config)))
  )
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: (rng.normal(size=s.shape) * 0.05).astype(s.dtype), shapes["params"])


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> pathlib.Path:
  folder = tmp_path_factory.mktemp("images")
  for i in range(4):
    Image.new("RGB", (40 + 8 * i, 30), (60 * i, 120, 200 - 40 * i)).save(folder / f"img{i}.png")
  return folder


def _write_jsonl(path: pathlib.Path, records: list[dict]) -> str:
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def _pope_file(path: pathlib.Path, first_id: int, n: int = 3) -> str:
  objects = ["dog", "cat", "car", "cup", "bus", "pen"]
  return _write_jsonl(path, [
    {"question_id": first_id + i, "image": f"img{i % 4}.png",
     "text": QUESTION.format(objects[i % 6]), "label": "yes" if i % 2 else "no"}
    for i in range(n)
  ])  # fmt: skip


def _read_jsonl(path) -> list[dict]:
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def _scripted(monkeypatch, answer: Callable[[evaluate.Question], str]) -> list[list]:
  """Replaces the model's answers with `answer(question)`; returns the batches asked."""
  batches = []

  def answerer(loaded, *, batch_size, max_new_tokens):
    def answer_batch(questions):
      batches.append([q.question_id for q in questions])
      return [answer(q) for q in questions]

    return evaluate.Answerer(answer_batch, loaded.model_id, batch_size)

  monkeypatch.setattr(evaluate, "model_answerer", answerer)
  return batches


def _check_report(out: pathlib.Path) -> list[str]:
  """The report's pages exist and every image they link is a PNG that opens; returns them."""
  page = (out / "report.html").read_text()
  assert (out / "report.md").exists()
  sources = re.findall(r"src='([^']+)'", page)
  for name in sources:
    data = (out / name).read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    Image.open(io.BytesIO(data)).verify()
  return sources


# --------------------------------------------------------------------------------------------
# POPE.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pope_run(model_dir, images, tmp_path_factory):
  root = tmp_path_factory.mktemp("pope")
  random_q = _pope_file(root / "coco_pope_random.json", 100)
  popular_q = _pope_file(root / "coco_pope_popular.json", 200)
  out = root / "out"
  argv = ["pope", f"--model={model_dir}", f"--questions={random_q},{popular_q}",
          f"--images={images}", f"--out={out}", *FAST]  # fmt: skip
  return evaluate.cli(argv), out, {"random": random_q, "popular": popular_q}


def test_pope_end_to_end_writes_answers_per_split(pope_run):
  metrics, out, questions = pope_run
  for split, first_id in (("random", 100), ("popular", 200)):
    answers = _read_jsonl(out / f"answers_{split}.jsonl")
    assert [a["question_id"] for a in answers] == [first_id, first_id + 1, first_id + 2]
    asked = _read_jsonl(questions[split])
    assert [a["prompt"] for a in answers] == [q["text"] for q in asked]  # no suffix by default
    assert {a["model_id"] for a in answers} == {"tiny-llava"}
    expected = pope_metrics([a["text"] for a in answers], [q["label"] for q in asked])
    assert {k: metrics[f"{split}/{k}"] for k in expected} == expected
  for key in pope.MAIN_METRICS:
    assert metrics[key] == pytest.approx((metrics[f"random/{key}"] + metrics[f"popular/{key}"]) / 2)
  assert json.loads((out / "metrics.json").read_text()) == metrics


def test_pope_report_links_valid_pngs(pope_run):
  _, out, _ = pope_run
  sources = _check_report(out)
  assert "metrics.png" in sources
  assert len([s for s in sources if s.startswith("examples")]) == 6  # every question, 3 a split
  page = (out / "report.html").read_text()
  assert page.count("<tr>") >= 3 + 6  # header, 2 splits and the mean; 6 examples


def test_scoring_only_prints_the_scorers_json(pope_run):
  _, out, questions = pope_run
  answers = str(out / "answers_random.jsonl")
  result = subprocess.run(
    [sys.executable, "-m", "lmm_align.evaluate", "pope", f"--questions={questions['random']}",
     f"--answers={answers}"], cwd=REPO, capture_output=True, text=True, timeout=120,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-2000:]
  expected = score_pope_files(questions["random"], answers)
  assert result.stdout == json.dumps(expected, indent=2, sort_keys=True) + "\n"


def test_scoring_only_refuses_an_answers_file_with_a_missing_id(pope_run, tmp_path):
  _, out, questions = pope_run
  partial = _write_jsonl(tmp_path / "a.jsonl", _read_jsonl(out / "answers_random.jsonl")[:2])
  with pytest.raises(ValueError, match=r"1 question\(s\) without an answer"):
    evaluate.cli(["pope", f"--questions={questions['random']}", f"--answers={partial}"])


def test_resume_completes_a_partial_file_without_regenerating(
  model_dir, images, tmp_path, monkeypatch
):
  questions = _pope_file(tmp_path / "coco_pope_adversarial.json", 0, n=6)
  out = tmp_path / "out"
  out.mkdir()
  done = [{"question_id": q["question_id"], "prompt": q["text"], "text": f"MARKER {i}",
           "model_id": "tiny-llava"} for i, q in enumerate(_read_jsonl(questions)) if i % 2 == 0]  # fmt: skip
  lines = [json.dumps(a) for a in done]
  # Three answers written, then a kill in the middle of the fourth line.
  (out / "answers_adversarial.jsonl").write_text("\n".join(lines) + '\n{"question_id": 1, "te')
  calls = []
  real_generate = sampling.generate
  monkeypatch.setattr(
    sampling, "generate", lambda *a, **k: calls.append(1) or real_generate(*a, **k)
  )
  with pytest.warns(UserWarning, match="truncated last line"):
    evaluate.cli(["pope", f"--model={model_dir}", f"--questions={questions}",
                  f"--images={images}", f"--out={out}", *FAST])  # fmt: skip
  answers = _read_jsonl(out / "answers_adversarial.jsonl")
  assert [a["question_id"] for a in answers] == list(range(6))
  assert [a["text"] for a in answers[::2]] == ["MARKER 0", "MARKER 2", "MARKER 4"]
  assert not any(a["text"].startswith("MARKER") for a in answers[1::2])
  assert len(calls) == 2  # 3 missing answers in batches of 2


def test_missing_image_is_an_error_naming_the_record_and_path(model_dir, images, tmp_path):
  records = _read_jsonl(_pope_file(tmp_path / "q.json", 0))
  records[1]["image"] = "absent.png"
  questions = _write_jsonl(tmp_path / "coco_pope_random.json", records)
  out = tmp_path / "out"
  with pytest.raises(FileNotFoundError, match=r"coco_pope_random.json: record 2: .*absent\.png"):
    evaluate.cli(["pope", f"--model={model_dir}", f"--questions={questions}",
                  f"--images={images}", f"--out={out}", *FAST])  # fmt: skip
  assert not (out / "answers_random.jsonl").exists()  # checked before any generation


# --------------------------------------------------------------------------------------------
# generate_answers alone, with a scripted answerer.
# --------------------------------------------------------------------------------------------


def _questions(n: int) -> list[evaluate.Question]:
  return [evaluate.Question(i, "Q" * (n - i), "unused.png", f"q: record {i + 1}") for i in range(n)]


def test_generate_answers_batches_by_prompt_length_and_writes_question_order(tmp_path):
  asked = []
  answerer = evaluate.Answerer(
    lambda qs: asked.append([q.question_id for q in qs]) or [f"a{q.question_id}" for q in qs],
    "m", 2,
  )  # fmt: skip
  path = str(tmp_path / "answers.jsonl")
  answers = evaluate.generate_answers(_questions(5), answerer, path)
  assert asked == [[4, 3], [2, 1], [0]]  # shortest prompts first
  assert _read_jsonl(path) == answers
  assert [a["question_id"] for a in answers] == [0, 1, 2, 3, 4]
  assert answers[0] == {"question_id": 0, "prompt": "QQQQQ", "text": "a0", "model_id": "m"}


@pytest.mark.parametrize(
  "record, error",
  [
    ({"question_id": 0, "prompt": "QQQ", "text": "x", "model_id": "other"}, "answered by 'other'"),
    ({"question_id": 0, "prompt": "changed", "text": "x", "model_id": "m"}, "another prompt"),
    ({"question_id": 9, "prompt": "QQQ", "text": "x", "model_id": "m"}, "9 is not asked"),
  ],
)
def test_resume_refuses_answers_it_cannot_reuse(tmp_path, record, error):
  path = tmp_path / "answers.jsonl"
  _write_jsonl(path, [record])
  answerer = evaluate.Answerer(lambda qs: ["y"] * len(qs), "m", 2)
  with pytest.raises(ValueError, match=rf"answers.jsonl: line 1: .*{error}"):
    evaluate.generate_answers(_questions(3), answerer, str(path))


def test_repeated_question_id_is_an_error(tmp_path):
  questions = _questions(2) + [evaluate.Question(0, "again", "x.png", "q: record 3")]
  answerer = evaluate.Answerer(lambda qs: ["y"] * len(qs), "m", 2)
  with pytest.raises(ValueError, match="q: record 3: question_id 0 repeats q: record 1"):
    evaluate.generate_answers(questions, answerer, str(tmp_path / "a.jsonl"))


# --------------------------------------------------------------------------------------------
# Judged benchmarks, with scripted answers and a FunctionJudge through JUDGE_BACKENDS.
# --------------------------------------------------------------------------------------------


def _register_judge(monkeypatch, reply: Callable[[str], str]) -> list[str]:
  prompts = []

  def backend(target, args):
    return FunctionJudge(lambda r: prompts.append(r.prompt) or reply(r.prompt), name=target)

  monkeypatch.setitem(evaluate.JUDGE_BACKENDS, "scripted", backend)
  return prompts


def test_mmhal_with_a_scripted_judge(model_dir, images, tmp_path, monkeypatch):
  types = ["attribute", "adversarial", "comparison"]
  template = [
    {"question_type": t, "question_topic": "outdoor", "image_id": f"img{i}", "image_src":
     f"https://example.org/x/{i}.jpg", "image_content": ["Dog"], "question": f"Question {i}?",
     "gt_answer": f"Truth {i}.", "model_answer": ""} for i, t in enumerate(types)
  ]  # fmt: skip
  template_path = tmp_path / "mmhal.json"
  template_path.write_text(json.dumps(template))
  batches = _scripted(monkeypatch, lambda q: f"Answer to {q.prompt}")
  ratings = {"Question 0?": 6, "Question 1?": 2, "Question 2?": 4}
  prompts = _register_judge(
    monkeypatch, lambda p: "Fine.\nRating: " + str(next(v for k, v in ratings.items() if k in p))
  )
  out = tmp_path / "out"
  metrics = evaluate.cli(["mmhal", f"--model={model_dir}", f"--template={template_path}",
                          f"--images={images}", f"--out={out}", "--judge=scripted:j", *FAST])  # fmt: skip
  assert batches == [[0, 1], [2]]  # --batch_size=2
  assert len(prompts) == 3 and "Answer to Question 1?" in prompts[1]
  assert metrics["average_score"] == pytest.approx(4.0)
  assert metrics["hallucination_rate"] == pytest.approx(1 / 3)
  assert metrics["informativeness"] == pytest.approx((3 + 2 + 1) / 3 / 3 * 100)
  assert metrics["average_score/adversarial"] == 2
  answers = _read_jsonl(out / "answers.jsonl")
  assert [(a["question_id"], a["question_type"]) for a in answers] == list(enumerate(types))
  assert [j["score"] for j in _read_jsonl(out / "judgements.jsonl")] == [6, 2, 4]
  assert len([s for s in _check_report(out) if s.startswith("examples")]) == 3


def test_llava_bench_with_a_scripted_judge(model_dir, images, tmp_path, monkeypatch):
  questions = _write_jsonl(tmp_path / "q.jsonl", [
    {"question_id": i, "image": f"img{i}.png", "text": f"Describe {i}.", "category": c}
    for i, c in enumerate(["conv", "detail", "detail"])
  ])  # fmt: skip
  references = _write_jsonl(
    tmp_path / "r.jsonl", [{"question_id": i, "text": f"Reference {i}."} for i in range(3)]
  )
  context = _write_jsonl(
    tmp_path / "c.jsonl", [{"image": f"img{i}.png", "caption": f"Picture {i}."} for i in range(3)]
  )
  _scripted(monkeypatch, lambda q: f"Model {q.question_id}.")
  scores = {"Model 0.": "8 6", "Model 1.": "10 5", "Model 2.": "6 4"}
  _register_judge(monkeypatch, lambda p: next(v for k, v in scores.items() if k in p) + "\nWhy.")
  out = tmp_path / "out"
  metrics = evaluate.cli(["llava_bench", f"--model={model_dir}", f"--questions={questions}",
                          f"--reference_answers={references}", f"--context={context}",
                          f"--images={images}", f"--out={out}", "--judge=scripted:j",
                          "--limit=2", *FAST])  # fmt: skip
  # --limit=2: questions 0 (conv: 8, 6) and 1 (detail: 10, 5) only.
  assert metrics["relative_score"] == pytest.approx(100 * (6 + 5) / (8 + 10))
  assert metrics["relative_score/conv"] == pytest.approx(75.0)
  assert metrics["questions"] == 2
  assert [a["category"] for a in _read_jsonl(out / "answers.jsonl")] == ["conv", "detail"]


def _png_base64(colour) -> str:
  buffer = io.BytesIO()
  Image.new("RGB", (20, 20), colour).save(buffer, format="PNG")
  return base64.b64encode(buffer.getvalue()).decode()


def test_chair_with_embedded_images(model_dir, tmp_path, monkeypatch):
  # RLAIF-V's layout: image_id, the image itself in base64, question; no question_id.
  questions = _write_jsonl(tmp_path / "objhal.jsonl", [
    {"image_id": 11, "image": _png_base64((255, 0, 0)), "question": "Describe the image."},
    {"image_id": 12, "image": _png_base64((0, 255, 0)), "question": "Describe the image."},
  ])  # fmt: skip
  instances = tmp_path / "instances.json"
  instances.write_text(json.dumps({
    "images": [{"id": 11}, {"id": 12}],
    "annotations": [{"image_id": 11, "category_id": 1}, {"image_id": 12, "category_id": 2}],
    "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}],
  }))  # fmt: skip
  captions = tmp_path / "captions.json"
  captions.write_text(json.dumps({"images": [{"id": 11}, {"id": 12}], "annotations": []}))
  texts = {0: "A dog sits next to a cat.", 1: "A cat."}
  _scripted(monkeypatch, lambda q: texts[q.question_id])
  out = tmp_path / "out"
  metrics = evaluate.cli(["chair", f"--model={model_dir}", f"--questions={questions}",
                          f"--coco_instances={instances}", f"--coco_captions={captions}",
                          f"--out={out}", *FAST])  # fmt: skip
  # Image 11 holds a dog: "cat" is hallucinated there; image 12's answer is right.
  assert metrics["chair_s"] == pytest.approx(1 / 2)
  assert metrics["chair_i"] == pytest.approx(1 / 3)
  assert metrics["object_recall"] == pytest.approx(2 / 2)
  assert [a["image_id"] for a in _read_jsonl(out / "answers.jsonl")] == [11, 12]
  assert len([s for s in _check_report(out) if s.startswith("examples")]) == 2


def test_unknown_judge_backend_is_an_error():
  with pytest.raises(ValueError, match=r"--judge='nope:x': use openai:\.\.\. or model:\.\.\."):
    evaluate.make_judge("nope:x", argparse.Namespace())


# --------------------------------------------------------------------------------------------
# The shapes world, flags and the processor config.
# --------------------------------------------------------------------------------------------


def test_shapes_world_evaluation_of_a_model_folder(model_dir, tmp_path):
  out = tmp_path / "out"
  from lmm_align.shapes import evaluation as shapes_eval

  metrics = evaluate.cli(["shapes", f"--model={model_dir}", f"--out={out}", "--limit=2", *FAST])
  assert all(isinstance(metrics[key], float) for key in shapes_eval.MAIN_METRICS)
  # The answers evaluate_shapes scored: a rate over all answers = refined rate x mention rate.
  assert metrics["hallucination_rate"] == pytest.approx(
    metrics["chair_s_refine"] * metrics["mention_rate"]
  )
  assert 0.0 <= metrics["pope_f1"] <= 1.0
  assert len([s for s in _check_report(out) if s.startswith("examples")]) == 2


def test_shapes_scene_seed_flag(model_dir, tmp_path, monkeypatch):
  from lmm_align.shapes import evaluation as shapes_eval

  seeds = []

  def fake_evaluate(*args, seed, **kwargs):
    seeds.append(seed)
    return {"examples": [], **{key: 0.0 for key in shapes_eval.MAIN_METRICS}}

  monkeypatch.setattr(shapes_eval, "evaluate_shapes", fake_evaluate)
  flags = ["shapes", f"--model={model_dir}", f"--out={tmp_path}", "--limit=2", *FAST]
  evaluate.cli(flags)
  evaluate.cli([*flags, "--scene_seed=777"])
  evaluate.cli([*flags, "--eval_seed=778"])
  assert seeds == [12345, 777, 778]  # configs/shapes/sft.py's eval_seed, then the flags'


def test_suffix_flag():
  parse = lambda *flags: evaluate.parse_args(["pope", "--questions=q", "--answers=a", *flags])
  assert parse().suffix == ""
  assert parse("--suffix").suffix == evaluate.LLAVA_SHORT_ANSWER_SUFFIX
  assert parse("--suffix=\\nAnswer yes or no.").suffix == "\nAnswer yes or no."


def test_flags_need_a_model_or_answers():
  with pytest.raises(SystemExit):
    evaluate.parse_args(["pope", "--questions=q"])
  with pytest.raises(SystemExit):
    evaluate.parse_args(["pope", "--questions=q", "--answers=a", "--model=m", "--out=o"])


def test_image_config_from_folder(model_dir, tmp_path):
  config = inference.image_config_from_folder(model_dir)
  assert config == ImageProcessorConfig(size=32, crop_size=32, aspect_mode="crop")
  assert inference.image_config_from_folder(model_dir, "pad").aspect_mode == "pad"
  with pytest.raises(FileNotFoundError, match="no preprocessor_config.json"):
    inference.image_config_from_folder(str(tmp_path))


def test_scoring_the_published_pope_files_by_split(shared_reference_data, tmp_path):
  folder = shared_reference_data / "pope_coco_e3e3926"
  questions, answers = [], []
  for split in ("random", "popular", "adversarial"):
    questions.append(str(folder / f"coco_pope_{split}.json"))
    records = _read_jsonl(questions[-1])
    answers.append(_write_jsonl(tmp_path / f"{split}.jsonl",
                                [{"question_id": r["question_id"], "text": "Yes, there is."}
                                 for r in records]))  # fmt: skip
  metrics = evaluate.cli(["pope", f"--questions={','.join(questions)}",
                          f"--answers={','.join(answers)}", f"--out={tmp_path / 'out'}"])  # fmt: skip
  assert metrics["random/tp"] + metrics["random/fp"] == 2910  # the version LLaVA-1.5 pins
  assert metrics["popular/tp"] + metrics["popular/fp"] == 3000
  assert metrics["yes_ratio"] == 1.0 and metrics["recall"] == 1.0
  # 1500 of random's 2910 questions are "yes"; the other splits are half "yes". The bare
  # precision is the mean over the splits.
  assert metrics["random/precision"] == pytest.approx(1500 / 2910)
  assert metrics["precision"] == pytest.approx((1500 / 2910 + 0.5 + 0.5) / 3)
  assert (tmp_path / "out" / "report.html").exists()
