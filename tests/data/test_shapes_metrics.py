"""The shapes-world parser and metrics, on hand-written sentences and hand-computed numbers."""

import pytest

from lmm_align.data.shapes import Scene, SceneObject
from lmm_align.data.shapes_metrics import (
  aggregate_hallucination_counts,
  extract_choice_letter,
  hallucination_metrics,
  parse_count,
  parse_mentions,
  parse_yes_no,
  response_hallucination_counts,
  score_count,
  score_multiple_choice,
  score_yes_no,
)


@pytest.mark.parametrize(
  "text, expected",
  [
    ("A large red circle and a small blue square.", [("red", "circle"), ("blue", "square")]),
    ("There are two red circles.", [("red", "circle")]),
    ("I see red and blue circles.", [("red", "circle"), ("blue", "circle")]),
    ("Crosses, stars and diamonds.", [(None, "cross"), (None, "star"), (None, "diamond")]),
    ("The circles are green.", [("green", "circle")]),
    ("There is a circle which is orange.", [("orange", "circle")]),
    ("The circle is red and the square is blue.", [("red", "circle"), ("blue", "square")]),
    ("RED CIRCLE", [("red", "circle")]),
    ("A white triangle on a white background.", [("white", "triangle")]),
    ("A purple hexagon next to a shiny circle.", [(None, "circle")]),
    ("Three shapes: 2 yellow stars.", [("yellow", "star")]),
    # Negation.
    ("There is no red circle.", []),
    ("No, there is no green star in the image.", []),
    ("No, the circle is red.", [("red", "circle")]),
    ("I don't see any triangles, but there is a yellow square.", [("yellow", "square")]),
    ("There is no red circle or blue square.", []),
    ("Neither a red star nor a blue cross.", []),
    ("There is no red circle and a blue square.", [("blue", "square")]),
    ("There are no red or blue circles.", []),
    ("A square without a green cross.", [(None, "square")]),
    ("The circle isn't red.", [(None, "circle")]),
    (
      "The red circle is not to the left of the blue square.",
      [("red", "circle"), ("blue", "square")],
    ),
  ],
)
def test_parse_mentions(text, expected):
  assert parse_mentions(text) == expected


SCENE_A = Scene(
  (
    SceneObject("circle", "red", "large", 0, 0),
    SceneObject("square", "blue", "small", 1, 1),
    SceneObject("star", "green", "large", 2, 2),
  ),
  "white",
)
SCENE_B = Scene((SceneObject("triangle", "yellow", "small", 0, 2),), "gray")
ANSWERS = [
  # 3 mentions, none hallucinated, all 3 objects recalled; 10 words.
  ("A red circle, a blue square and a green star.", SCENE_A),
  # (red circle) right, (purple square) a wrong colour, the star negated; 11 words.
  ("A red circle and a purple square. There is no star.", SCENE_A),
  # (yellow triangle) right, (blue diamond) an absent shape; 10 words.
  ("There is a yellow triangle next to a blue diamond.", SCENE_B),
  # No mentions; 3 words.
  ("Nothing to see.", SCENE_B),
]
EXPECTED_COUNTS = {
  "responses": 4,
  "responses_with_mentions": 3,
  "hallucinated_responses": 2,
  "mentions": 7,
  "hallucinated_mentions": 2,
  "object_hallucinations": 1,
  "coloured_mentions": 6,  # the diamond's colour is not counted: its shape is absent
  "attribute_errors": 1,
  "gt_objects": 8,
  "recalled_objects": 5,
  "words": 34,
}


def test_hallucination_metrics_on_hand_made_answers():
  texts, scenes = zip(*ANSWERS)
  scenes = [scenes[0], scenes[1].to_dict(), scenes[2], scenes[3].to_dict()]  # dicts work too
  metrics = hallucination_metrics(texts, scenes)
  assert {k: metrics[k] for k in EXPECTED_COUNTS} == EXPECTED_COUNTS
  expected_rates = {
    "chair_i": 2 / 7,
    "chair_s": 0.5,
    "hallucination_rate": 0.5,
    "chair_s_refine": 2 / 3,
    "object_chair_i": 1 / 7,
    "attribute_error_rate": 1 / 6,
    "object_recall": 5 / 8,
    "mean_answer_words": 34 / 4,
  }
  assert metrics == pytest.approx({**EXPECTED_COUNTS, **expected_rates})


def test_counts_aggregate_across_shards():
  counts = [response_hallucination_counts(t, s) for t, s in ANSWERS]
  shards = [aggregate_hallucination_counts(counts[:1]), aggregate_hallucination_counts(counts[1:])]
  assert aggregate_hallucination_counts(shards) == hallucination_metrics(*zip(*ANSWERS))


def test_uncoloured_mention_recalls_every_object_of_its_shape():
  scene = Scene(
    (SceneObject("circle", "red", "large", 0, 0), SceneObject("circle", "blue", "small", 1, 1))
  )
  counts = response_hallucination_counts("Two circles.", scene)
  assert counts["recalled_objects"] == 2 and counts["hallucinated_mentions"] == 0
  assert hallucination_metrics([], [])["chair_i"] == 0.0
  with pytest.raises(ValueError):
    hallucination_metrics(["a"], [])


@pytest.mark.parametrize(
  "text, label",
  [
    ("Yes", "yes"),
    ("No", "no"),
    ("No, there is no red circle.", "no"),
    ("There is not a red circle in the image.", "no"),
    ("Yes. There is no doubt.", "yes"),  # only the first sentence counts
    ("NO", "yes"),  # POPE's match is case-sensitive
  ],
)
def test_parse_yes_no_follows_pope(text, label):
  assert parse_yes_no(text) == label
  assert score_yes_no(text, label.upper())


@pytest.mark.parametrize(
  "text, options, letter",
  [
    ("B", None, "B"),
    (" (C) ", None, "C"),
    ("D. star", None, "D"),
    ("A: red", None, "A"),
    ("The answer is A.", None, "A"),
    ("option c", None, None),
    ("A red circle.", ["blue", "red", "green", "yellow"], "B"),
    ("A red circle.", None, None),  # "A" is the article here
    ("I think the answer is a square", None, None),
    ("red or blue", ["blue", "red", "green", "yellow"], None),  # two options named
  ],
)
def test_extract_choice_letter(text, options, letter):
  assert extract_choice_letter(text, options) == letter
  assert score_multiple_choice(text, "B", options) == (letter == "B")


@pytest.mark.parametrize(
  "text, count",
  [
    ("3", 3),
    ("There are two circles.", 2),
    ("There are no circles.", 0),
    ("No, there are four.", 4),
    ("None.", 0),
    ("I can't tell.", None),
  ],
)
def test_parse_count(text, count):
  assert parse_count(text) == count
  assert score_count(text, 2) == (count == 2)
