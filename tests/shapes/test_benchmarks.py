"""POPE probes and MMHal-style questions built on shapes-world scenes."""

import collections
import itertools

import numpy as np
import pytest

from lmm_align.shapes import world as shapes
from lmm_align.shapes.benchmarks import (
  MMHAL_QUESTION_TYPES,
  POPE_STRATEGIES,
  make_mmhal_questions,
  make_pope_probes,
)
from lmm_align.shapes.metrics import hallucination_metrics, parse_count

SCENES = shapes.make_scenes(80, shapes.ShapesWorldConfig(), seed=11)
BY_ID = {s.id: s for s in SCENES}


def _pair(name):
  colour, shape = name.split()
  return colour, shape


def _negatives_by_scene(probes):
  out = collections.defaultdict(list)
  for p in probes:
    if p["label"] == "no":
      out[p["image_id"]].append(_pair(p["object"]))
  return out


def _universe():
  colours = {o.colour for s in SCENES for o in s.objects}
  return set(itertools.product(colours, {o.shape for s in SCENES for o in s.objects}))


@pytest.mark.parametrize("strategy", POPE_STRATEGIES)
def test_pope_probes_are_balanced_and_true(strategy):
  probes = make_pope_probes(SCENES, strategy, seed=0, image_size=32)
  assert [p["question_id"] for p in probes] == list(range(1, len(probes) + 1))
  labels = collections.Counter(p["label"] for p in probes)
  assert labels["yes"] == labels["no"] > 0
  per_scene = collections.defaultdict(collections.Counter)
  for p in probes:
    scene = BY_ID[p["image_id"]]
    per_scene[p["image_id"]][p["label"]] += 1
    assert p["text"] in (
      f"Is there a {p['object']} in the image?",
      f"Is there an {p['object']} in the image?",
    )
    assert (_pair(p["object"]) in scene.pairs) == (p["label"] == "yes")
    assert p["category"] == strategy and p["image"].size == (32, 32)
  for scene in SCENES:
    k = min(3, len(scene.objects))
    assert per_scene[scene.id] == {"yes": k, "no": k}
  again = make_pope_probes(SCENES, strategy, seed=0, image_size=32)
  assert [(p["text"], p["label"]) for p in again] == [(p["text"], p["label"]) for p in probes]


def test_popular_negatives_are_the_most_frequent_absent_objects():
  frequency = collections.Counter(p for s in SCENES for p in s.pairs)
  negatives = _negatives_by_scene(make_pope_probes(SCENES, "popular"))
  for scene in SCENES:
    chosen = negatives[scene.id]
    rest = _universe() - scene.pairs - set(chosen)
    assert min(frequency[p] for p in chosen) >= max(frequency[p] for p in rest)


def test_adversarial_negatives_cooccur_most_with_present_objects():
  def cooccurrence(scene, candidate):
    return sum(
      candidate in s.pairs for s in SCENES for present in scene.pairs if present in s.pairs
    )

  negatives = _negatives_by_scene(make_pope_probes(SCENES, "adversarial"))
  random_negatives = _negatives_by_scene(make_pope_probes(SCENES, "random", seed=1))
  adversarial_scores, random_scores = [], []
  for scene in SCENES[:30]:
    chosen = negatives[scene.id]
    rest = _universe() - scene.pairs - set(chosen)
    scores = [cooccurrence(scene, p) for p in chosen]
    assert min(scores) >= max(cooccurrence(scene, p) for p in rest)
    adversarial_scores += scores
    random_scores += [cooccurrence(scene, p) for p in random_negatives[scene.id]]
  assert np.mean(adversarial_scores) > np.mean(random_scores)


def test_random_negatives_depend_on_the_seed():
  a = _negatives_by_scene(make_pope_probes(SCENES, "random", seed=0))
  b = _negatives_by_scene(make_pope_probes(SCENES, "random", seed=1))
  assert a != b
  with pytest.raises(ValueError):
    make_pope_probes(SCENES, "frequent")


def test_mmhal_questions_have_true_answers():
  questions = make_mmhal_questions(SCENES[:32], seed=0, image_size=32)
  types = [q["question_type"] for q in questions]
  assert types == [MMHAL_QUESTION_TYPES[i % 8] for i in range(32)]
  for q, scene in zip(questions, SCENES):
    assert q["image_id"] == scene.id and shapes.Scene.from_dict(q["scene"]) == scene
    assert q["image_content"] == [o.name for o in scene.objects] and q["model_answer"] == ""
    # No ground-truth answer hallucinates, whatever its type.
    assert hallucination_metrics([q["gt_answer"]], [scene])["hallucinated_mentions"] == 0, q
    gt = q["gt_answer"]
    if q["question_type"] == "counting":
      assert parse_count(gt) == len(scene.objects)
    elif q["question_type"] == "environment":
      assert gt == f"The background is {scene.background}."
    elif q["question_type"] == "holistic":
      assert hallucination_metrics([gt], [scene])["object_recall"] == 1.0
    elif q["question_type"] == "adversarial":
      assert gt.startswith("There is no ")
      assert hallucination_metrics([q["question"]], [scene])["hallucinated_mentions"] == 1
    elif q["question_type"] == "attribute":
      assert any(
        gt.startswith(f"The {o.shape}") and gt.endswith(f" is {o.colour}.") for o in scene.objects
      )
