"""Shapes world: scenes, rendering, and SFT records checked against their ground truth."""

import collections
import json

import numpy as np
import pytest

from lmm_align.shapes import world as shapes
from lmm_align.shapes.metrics import (
  extract_choice_letter,
  hallucination_metrics,
  parse_count,
  parse_mentions,
  parse_yes_no,
  response_hallucination_counts,
)

CONFIG = shapes.ShapesWorldConfig(short_answer_noise_rate=0.15)


@pytest.fixture(scope="module")
def records():
  return shapes.make_sft_records(400, CONFIG, seed=5)


def _pixels(image):
  return np.asarray(image)


def test_records_are_deterministic_by_seed():
  a = shapes.make_sft_records(12, CONFIG, seed=3)
  b = shapes.make_sft_records(12, CONFIG, seed=3)
  c = shapes.make_sft_records(12, CONFIG, seed=4)
  for x, y in zip(a, b):
    assert x["id"] == y["id"] and x["conversations"] == y["conversations"]
    assert x["metadata"] == y["metadata"]
    np.testing.assert_array_equal(_pixels(x["image"]), _pixels(y["image"]))
  assert [r["metadata"]["scene"] for r in a] != [r["metadata"]["scene"] for r in c]
  # Record i depends only on (seed, i), and make_scenes yields the records' scenes.
  assert shapes.make_sft_record(7, CONFIG, seed=3)["metadata"] == a[7]["metadata"]
  assert [s.to_dict() for s in shapes.make_scenes(12, CONFIG, seed=3)] == [
    r["metadata"]["scene"] for r in a
  ]
  # The config's seed is the default.
  assert shapes.make_sft_records(2, shapes.ShapesWorldConfig(seed=3))[1]["id"] == a[1]["id"]


def test_scenes_respect_the_config_and_round_trip():
  config = shapes.ShapesWorldConfig(min_objects=2, max_objects=4)
  scenes = shapes.make_scenes(300, config, seed=1)
  for scene in scenes:
    assert 2 <= len(scene.objects) <= 4
    assert len(scene.pairs) == len(scene.objects)  # no two identical (colour, shape)
    assert len({(o.row, o.col) for o in scene.objects}) == len(scene.objects)
    assert shapes.Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
  assert {len(s.objects) for s in scenes} == {2, 3, 4}


def test_priors_make_popular_and_cooccurring_objects():
  scenes = shapes.make_scenes(1000, shapes.ShapesWorldConfig(), seed=2)
  counts = collections.Counter(o.shape for s in scenes for o in s.objects)
  assert counts["circle"] > counts["triangle"] > counts["cross"]
  with_circle = [s for s in scenes if s.count(shape="circle")]
  without = [s for s in scenes if not s.count(shape="circle")]
  p_square_given_circle = np.mean([bool(s.count(shape="square")) for s in with_circle])
  p_square_otherwise = np.mean([bool(s.count(shape="square")) for s in without])
  assert p_square_given_circle > 1.5 * p_square_otherwise


@pytest.mark.parametrize("size", [32, 64, 336])
def test_render_draws_each_colour_at_its_object(size):
  for scene in shapes.make_scenes(15, CONFIG, seed=size):
    image = shapes.render(scene, size)
    assert image.mode == "RGB" and image.size == (size, size)
    pixels = _pixels(image)
    for obj in scene.objects:
      x, y = shapes.object_center(obj, size)
      assert tuple(pixels[y, x]) == shapes.COLOURS[obj.colour], (scene, obj)
    occupied = {(o.row, o.col) for o in scene.objects}
    for row, col in {(r, c) for r in range(3) for c in range(3)} - occupied:
      centre = pixels[int((row + 0.5) * size / 3), int((col + 0.5) * size / 3)].astype(int)
      background = np.array(shapes.BACKGROUNDS[scene.background])
      assert np.abs(centre - background).max() <= 6 * scene.noise + 1


def test_render_without_noise_is_flat():
  scene = shapes.Scene((shapes.SceneObject("star", "blue", "large", 1, 1),), "gray", 0.0, 0)
  pixels = _pixels(shapes.render(scene, 48))
  assert tuple(pixels[0, 0]) == shapes.BACKGROUNDS["gray"]
  assert len(np.unique(pixels.reshape(-1, 3), axis=0)) == 2


def _answer_is_correct(record) -> bool:
  """Re-derives the right answer from the scene alone and checks the gpt turn against it."""
  meta = record["metadata"]
  scene = shapes.Scene.from_dict(meta["scene"])
  question, answer = (turn["value"] for turn in record["conversations"])
  assert question.startswith("<image>\n")
  task = meta["task"]
  if task == "caption":
    truthful = hallucination_metrics([meta["facts"]], [scene])
    assert truthful["hallucinated_mentions"] == 0 and truthful["object_recall"] == 1.0
    metrics = hallucination_metrics([answer], [scene])
    return metrics["hallucinated_responses"] == 0 and metrics["object_recall"] == 1.0
  if task == "count":
    query = meta["query"]
    truth = sum(
      query["shape"] in (None, o.shape) and query["colour"] in (None, o.colour)
      for o in scene.objects
    )
    assert meta["answer"] == truth
    return parse_count(answer) == truth
  if task == "exist":
    colour, shape = meta["object"]
    assert f"{colour} {shape}" in question
    truth = "yes" if any(o.colour == colour and o.shape == shape for o in scene.objects) else "no"
    assert meta["answer"] == truth
    return parse_yes_no(answer) == truth
  if task == "colour":
    obj = scene.objects[meta["object_index"]]
    assert obj.shape in question and obj.colour not in question
    assert meta["answer"] == obj.colour
    return answer.rstrip(".").split()[-1] == obj.colour
  if task == "spatial" and "relation" in meta:
    a, b = scene.objects[meta["subject"]], scene.objects[meta["reference"]]
    holds = {
      "left": a.col < b.col,
      "right": a.col > b.col,
      "above": a.row < b.row,
      "below": a.row > b.row,
    }[meta["relation"]]
    assert meta["answer"] == ("yes" if holds else "no")
    return parse_yes_no(answer) == meta["answer"]
  if task == "spatial":
    obj = scene.objects[meta["object_index"]]
    assert meta["answer"] == obj.position
    return answer.endswith(f" {shapes.position_phrase(obj.position)} of the image.")
  assert task == "multiple_choice"
  obj = scene.objects[meta["object_index"]]
  truth = {
    "colour": obj.colour,
    "shape": obj.shape,
    "count": str(len(scene.objects)),
    "position": obj.position,
  }[meta["subtype"]]
  options = meta["options"]
  assert meta["correct_option"] == truth and len(set(options)) == 4
  assert options["ABCD".index(meta["answer"])] == truth
  for letter, option in zip("ABCD", options):
    assert f"\n{letter}. {option}\n" in question
  return extract_choice_letter(answer) == meta["answer"]


def test_every_answer_agrees_with_the_ground_truth_unless_injected(records):
  assert {r["metadata"]["task"] for r in records} == set(shapes.TASKS)
  for record in records:
    assert _answer_is_correct(record) != record["metadata"]["injected"], record
  # Short-answer noise was on, so both branches ran for short answers too.
  short = [r for r in records if r["metadata"]["task"] != "caption"]
  assert 0 < sum(r["metadata"]["injected"] for r in short) < len(short)


def test_injected_fraction_matches_the_rate():
  config = shapes.ShapesWorldConfig(task_mix=(("caption", 1.0),), hallucination_rate=0.3)
  records = shapes.make_sft_records(600, config, seed=9)
  injected = [r for r in records if r["metadata"]["injected"]]
  assert abs(len(injected) / len(records) - 0.3) < 0.06
  kinds = collections.Counter(r["metadata"]["injection"]["kind"] for r in injected)
  assert set(kinds) == {"extra_object", "wrong_colour"}
  for record in injected:  # the hallucinated pair is named in the answer and absent in truth
    colour, shape = record["metadata"]["injection"]["object"]
    assert f"{colour} {shape}" in record["conversations"][1]["value"]
    assert (colour, shape) not in shapes.Scene.from_dict(record["metadata"]["scene"]).pairs
  for rate, expected in ((0.0, 0), (1.0, 40)):
    config = shapes.ShapesWorldConfig(task_mix=(("caption", 1.0),), hallucination_rate=rate)
    assert sum(r["metadata"]["injected"] for r in shapes.make_sft_records(40, config)) == expected


def test_short_answers_are_clean_by_default():
  config = shapes.ShapesWorldConfig(hallucination_rate=0.0)
  assert not any(r["metadata"]["injected"] for r in shapes.make_sft_records(150, config))


def test_task_mix_is_followed():
  config = shapes.ShapesWorldConfig(task_mix=(("exist", 3.0), ("count", 1.0)))
  tasks = collections.Counter(r["metadata"]["task"] for r in shapes.make_sft_records(200, config))
  assert set(tasks) == {"exist", "count"} and tasks["exist"] > 2 * tasks["count"]


def test_captions_are_deterministic_and_varied():
  scene = shapes.make_scenes(1, CONFIG, seed=0)[0]
  rng = lambda: np.random.default_rng(1)
  assert shapes.scene_caption(scene, rng()) == shapes.scene_caption(scene, rng())
  texts = {shapes.scene_caption(scene, rng(), template=t) for t in range(shapes.CAPTION_TEMPLATES)}
  assert len(texts) == shapes.CAPTION_TEMPLATES


@pytest.mark.parametrize(
  "kwargs",
  [
    {"min_objects": 3, "max_objects": 2},
    {"max_objects": 10},
    {"hallucination_rate": 1.5},
    {"task_mix": (("dance", 1.0),)},
    {"shapes": ("circle", "hexagon")},
    {"colours": ("red",)},
  ],
)
def test_config_rejects_bad_values(kwargs):
  with pytest.raises(ValueError):
    shapes.ShapesWorldConfig(**kwargs)


def test_caption_pairs_by_kind():
  """Each rejected caption has the flaw of its kind, checked by the CHAIR-like parser; the
  fractions are followed; with no binding share the pairs are those of the injected captions."""
  world = shapes.ShapesWorldConfig(task_mix=(("caption", 1.0),), hallucination_rate=1.0)
  records = shapes.make_sft_records(400, world, seed=5)
  kinds = collections.Counter()
  for i, record in enumerate(records):
    scene = shapes.Scene.from_dict(record["metadata"]["scene"])
    chosen, rejected = shapes.caption_pair(
      record, np.random.default_rng(i), omission_fraction=0.25, binding_fraction=0.5
    )
    truth = response_hallucination_counts(chosen, scene)
    assert truth["hallucinated_mentions"] == 0 and truth["recalled_objects"] == len(scene.objects)
    flawed = response_hallucination_counts(rejected, scene)
    if rejected == record["conversations"][1]["value"]:
      kinds["injected"] += 1
    elif flawed["hallucinated_mentions"] == 0:
      kinds["omission"] += 1
      assert flawed["recalled_objects"] == len(scene.objects) - 1
    else:
      kinds["binding"] += 1
      mentioned = parse_mentions(rejected)
      assert flawed["hallucinated_mentions"] == 1 and len(mentioned) == len(scene.objects)
      assert {c for c, _ in mentioned} <= {o.colour for o in scene.objects}
      assert {s for _, s in mentioned} <= {o.shape for o in scene.objects}
  multi = sum(len(r["metadata"]["scene"]["objects"]) > 1 for r in records)
  assert 0.15 < kinds["omission"] / multi < 0.35, kinds
  assert 0.38 < kinds["binding"] / multi < 0.62, kinds
  plain = [
    shapes.caption_pair(r, np.random.default_rng(i), omission_fraction=0.0)
    for i, r in enumerate(records)
  ]
  assert plain == [(r["metadata"]["facts"], r["conversations"][1]["value"]) for r in records]


def test_binding_error_caption_needs_two_objects():
  scene = shapes.Scene(objects=(shapes.SceneObject("star", "red", "small", 0, 0),))
  assert shapes.binding_error_caption(scene, 3, np.random.default_rng(0)) is None
