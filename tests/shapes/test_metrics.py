"""The shapes-world parser and metrics, on hand-written sentences and hand-computed numbers."""

import pytest

from lmm_align.shapes.metrics import (
  aggregate_hallucination_counts,
  corrected_response,
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
from lmm_align.shapes.world import Scene, SceneObject


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
  # (blue circle) a binding error: blue and circle are both in the scene, not together; 3 words.
  ("A blue circle.", SCENE_A),
]
EXPECTED_COUNTS = {
  "responses": 5,
  "responses_with_mentions": 4,
  "hallucinated_responses": 3,
  "mentions": 8,
  "hallucinated_mentions": 3,
  "object_hallucinations": 1,
  "coloured_mentions": 7,  # the diamond's colour is not counted: its shape is absent
  "attribute_errors": 2,
  "binding_errors": 1,  # purple is no object's colour in SCENE_A; blue is the square's
  "gt_objects": 11,
  "recalled_objects": 5,
  "words": 37,
}


def test_hallucination_metrics_on_hand_made_answers():
  texts, scenes = zip(*ANSWERS)
  scenes = [scenes[0], scenes[1].to_dict(), scenes[2], scenes[3].to_dict(), scenes[4]]  # dicts too
  metrics = hallucination_metrics(texts, scenes)
  assert {k: metrics[k] for k in EXPECTED_COUNTS} == EXPECTED_COUNTS
  expected_rates = {
    "chair_i": 3 / 8,
    "chair_s": 3 / 5,
    "hallucination_rate": 3 / 5,
    "chair_s_refine": 3 / 4,
    "object_chair_i": 1 / 8,
    "attribute_error_rate": 2 / 7,
    "binding_error_rate": 1 / 7,
    "object_recall": 5 / 11,
    "mean_answer_words": 37 / 5,
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


@pytest.mark.parametrize(
  "text, expected",
  [
    # A colour fix (the star is purple and small); the article follows the new colour.
    ("There is a large red star on the left.", "There is a small purple star on the left."),
    ("An orange triangle and a purple star.", "A red triangle and a purple star."),
    ("Orange triangle, purple star.", "Red triangle, purple star."),  # the capital is kept
    # No star-less object left unnamed: the shape of the unnamed red triangle.
    ("A purple star and a red square.", "A purple star and a red triangle."),
    # Nothing wrong, or a plural the rewrite does not reach.
    ("A red triangle and a purple star.", None),
    ("Two green diamonds.", None),
  ],
)
def test_corrected_response(text, expected):
  scene = Scene(
    (SceneObject("triangle", "red", "large", 0, 0), SceneObject("star", "purple", "small", 0, 2))
  )
  assert corrected_response(text, scene) == expected


def test_corrections_of_injected_captions_are_clean_minimal_edits():
  """Every injected caption of the SFT data is corrected: the result has no hallucinated
  mention, as many words, and recalls at least what the injected caption did."""
  from lmm_align.shapes import world as shapes

  world = shapes.ShapesWorldConfig(task_mix=(("caption", 1.0),), hallucination_rate=1.0)
  for record in shapes.make_sft_records(200, world, seed=4):
    answer, scene = record["conversations"][1]["value"], record["metadata"]["scene"]
    fixed = corrected_response(answer, scene)
    assert fixed is not None, answer
    before, after = (response_hallucination_counts(t, scene) for t in (answer, fixed))
    assert after["hallucinated_mentions"] == 0 and before["hallucinated_mentions"] == 1
    assert len(fixed.split()) == len(answer.split())
    assert after["recalled_objects"] >= before["recalled_objects"]
