"""Claims and questions: the rule splitter and question maker on shapes-world captions and
general sentences, robust parsing of model-written lists, and the Judge-backed forms."""

from __future__ import annotations

import numpy as np
import pytest

from lmm_align.feedback import claims
from lmm_align.judges.base import FunctionJudge, JudgeReply
from lmm_align.shapes import world as shapes


@pytest.mark.parametrize(
  "text, expected",
  [
    (
      "There is a red circle and a blue square.",
      ["There is a red circle.", "There is a blue square."],
    ),
    (
      "The image shows a large red circle in the top left, a small blue square at the bottom "
      "and an orange star.",
      [
        "The image shows a large red circle in the top left.",
        "The image shows a small blue square at the bottom.",
        "The image shows an orange star.",
      ],
    ),
    (
      "Two shapes on a white background: a red circle on the left and two blue squares.",
      [
        "There are two shapes on a white background.",
        "There is a red circle on the left.",
        "There are two blue squares.",
      ],
    ),
    (
      "A white image with a red circle and a blue square.",
      ["There is a white image.", "There is a red circle.", "There is a blue square."],
    ),
    (
      "Yes, there is a red circle in the image.",
      ["There is a red circle in the image."],
    ),
    (
      "No, there is no green star in the image.",
      ["There is no green star in the image."],
    ),
    (
      "There are two circles and a square.",
      ["There are two circles.", "There is a square."],
    ),
    ("There are red and blue circles.", ["There are red and blue circles."]),
    ("The circle is red and large.", ["The circle is red and large."]),
    ("A red circle or a blue square.", ["There is a red circle or a blue square."]),
    (
      "Sure! The picture shows a dog. It's sitting on a mat, and the cat is sleeping. "
      "I hope this helps!",
      ["The picture shows a dog.", "It is sitting on a mat.", "The cat is sleeping."],
    ),
    (
      "On the left, there is a red circle, and on the right, there are two squares.",
      ["On the left, there is a red circle.", "On the right, there are two squares."],
    ),
    (
      "The tower is 1,000 feet tall, e.g. very tall. It costs 3.5 dollars.",
      ["The tower is 1,000 feet tall, e.g. very tall.", "It costs 3.5 dollars."],
    ),
    ("- A man rides a bike.\n- The bike is red.", ["A man rides a bike.", "The bike is red."]),
    ("Is there a dog? No. There is a cat.", ["There is a cat."]),
    ("Yes.", []),
    ("Is there a circle?", []),
    ("", []),
  ],
)
def test_rule_splitter(text, expected):
  assert claims.split_claims_rules(text) == expected


@pytest.mark.parametrize("template", range(shapes.CAPTION_TEMPLATES))
def test_rule_splitter_gives_one_claim_per_object_on_shapes_captions(template):
  """Every caption template: one "There is"/"shows" claim per object, naming it, plus the
  scene-level claim that templates 0 (count) and 3 (background) open with."""
  scenes = shapes.make_scenes(6, shapes.ShapesWorldConfig(), seed=11)
  for scene in scenes:
    caption = shapes.scene_caption(scene, np.random.default_rng(0), template=template)
    found = claims.split_claims_rules(caption)
    per_object = found[1:] if template in (0, 3) else found
    assert len(per_object) == len(scene.objects), (caption, found)
    named = sorted(next(o.name for o in scene.objects if o.name in c) for c in per_object)
    assert named == sorted(o.name for o in scene.objects), (caption, found)
    if template in (0, 3):
      assert found[0].startswith("There is") or found[0].startswith("There are")
      assert scene.background in found[0], (caption, found)


@pytest.mark.parametrize(
  "claim, question",
  [
    ("There is a large red circle on the left.", "Is there a large red circle on the left?"),
    ("There are two circles.", "Are there two circles?"),
    ("There's a dog.", "Is there a dog?"),
    ("There is no green star in the image.", "Is there no green star in the image?"),
    ("The red circle is to the left of the square.", "Is the red circle to the left of the square?"),
    ("The circle is not red.", "Is the circle not red?"),
    ("Red circles are present.", "Are red circles present?"),
    ("The image shows a red circle.", "Does the image show a red circle?"),
    ("The shapes have different colours.", "Do the shapes have different colours?"),
    ("The woman wears a hat.", "Does the woman wear a hat?"),
    ("The dog can swim.", "Can the dog swim?"),
    ("The circle doesn't touch the square.", "Does the circle not touch the square?"),
    ("On the left, there is a red circle.", "Is there a red circle on the left?"),
    ("Leptis Magna is in Libya.", "Is Leptis Magna in Libya?"),
    ("The circle that is red sits on the left.", "Is it true that the circle that is red sits on the left?"),
    ("A man rides a bike.", "Is it true that a man rides a bike?"),
  ],
)  # fmt: skip
def test_rule_questions(claim, question):
  assert claims.claim_to_question(claim) == question


def test_rule_question_maker_keeps_one_question_per_claim():
  got = claims.RuleQuestionMaker().questions([["There is a cat.", "The cat is black."], []])
  assert got == [["Is there a cat?", "Is the cat black?"], []]
  with pytest.raises(ValueError, match="empty claim"):
    claims.claim_to_question("  ")


@pytest.mark.parametrize(
  "reply, items",
  [
    ("### Facts:\n- There is a cat.\n- The cat is black.\n", ["There is a cat.", "The cat is black."]),
    ("Here are the claims:\n1. A cat.\n2) A dog\n\nHope this helps.", ["A cat.", "A dog"]),
    ("A cat.\nA dog.", ["A cat.", "A dog."]),
    ("**Facts:**\n* one\n* two", ["one", "two"]),
    ('-"quoted"\n- \n(3) three', ["quoted", "three"]),
    ("1.5 metres tall.", ["1.5 metres tall."]),
    ("", []),
  ],
)  # fmt: skip
def test_parse_list_reply(reply, items):
  assert claims.parse_list_reply(reply) == items


class _FlakyJudge:
  """Answers every request with `reply`, except request numbers in `fail`."""

  name = "flaky"

  def __init__(self, reply, fail=()):
    self.reply, self.fail, self.requests = reply, set(fail), []

  def complete(self, requests):
    self.requests += list(requests)
    return [
      JudgeReply(None, "down") if r.request_id.endswith(f":{i}") and i in self.fail else
      JudgeReply(self.reply)
      for i, r in enumerate(requests)
    ]  # fmt: skip


def test_model_splitter_prompt_truncation_and_failures():
  judge = _FlakyJudge("### Facts:\n- There is a cat.\n- The cat is black.", fail={1})
  long_answer = " ".join(f"w{i}" for i in range(400))
  out = claims.ModelClaimSplitter(judge).split([("What is this?", long_answer), ("Q2", "A2")])
  assert out == [["There is a cat.", "The cat is black."], None]
  prompt = judge.requests[0].prompt
  assert "What is this?" in prompt and "w299" in prompt and "w300" not in prompt
  assert judge.requests[0].max_tokens == 256 and judge.requests[0].image is None


def test_model_question_maker_skips_responses_without_claims():
  judge = FunctionJudge(lambda r: "- Is there a cat?\n- Is the cat black?")
  out = claims.ModelQuestionMaker(judge).questions([["There is a cat.", "The cat is black."], []])
  assert out == [["Is there a cat?", "Is the cat black?"], []]
  prompt = claims.question_prompt(["There is a cat.", "The cat is black."])
  assert "- There is a cat.\n- The cat is black." in prompt


def test_prompt_template_file(tmp_path):
  path = tmp_path / "split.txt"
  path.write_text("Q={question} A={answer} format: {Extracted fact 1}")
  template = claims.load_prompt_template(path, ["{question}", "{answer}"])
  assert claims.split_prompt("q?", "a {question}.", template) == (
    "Q=q? A=a {question}. format: {Extracted fact 1}"
  )
  path.write_text("only {question}")
  with pytest.raises(ValueError, match=r"split.txt.*\{answer\}"):
    claims.load_prompt_template(path, ["{question}", "{answer}"])
