"""lmm_align/shapes/loop_models.py: the labeler's records are what the scene says."""

import collections

import numpy as np
import pytest

from configs.shapes import sft as shapes_sft
from lmm_align.shapes import data as shapes_data
from lmm_align.shapes import loop_models
from lmm_align.shapes import world as shapes


def _world(runlocal: bool = False) -> shapes.ShapesWorldConfig:
  return shapes_data.world_config(shapes_sft.get_config("runlocal" if runlocal else None).data)


def test_claims_are_judged_as_the_metrics_read_them():
  scene = shapes.Scene((shapes.SceneObject("circle", "red", "small", 0, 0),), background="gray")
  judge = lambda claim: loop_models.scene_claim_truth(claim, scene)
  assert judge("There is a large red circle in the top right.") == ("objects", True)  # size, place
  assert judge("There is a red star.") == ("objects", False)
  assert judge("There is a gray image.") == ("picture", True)
  assert judge("There is one shape on a white background.") == ("picture", False)  # background
  assert judge("There are two shapes on a gray background.") == ("picture", False)  # count
  assert judge("It looks simple.") == ("picture", None)


def test_claim_records_are_balanced_and_their_picture_negatives_are_false():
  world = _world()
  records = loop_models.claim_records(200, world, seed=3)
  assert 180 <= len(records) <= 200
  questions = [r["conversations"][0]["value"].split("\n")[1] for r in records]
  assert all(q.endswith("?") for q in questions)
  picture = lambda q: (
    "background" in q or q.endswith(("white image?", "gray image?", "black image?"))
  )
  answers = collections.Counter(
    (picture(q), r["conversations"][1]["value"]) for q, r in zip(questions, records)
  )
  # Balanced within each kind: the picture questions are not mostly "no".
  assert answers[(True, "Yes")] == answers[(True, "No")] > 0
  assert answers[(False, "Yes")] == answers[(False, "No")] > 0
  assert all((r["metadata"]["kind"] == "picture") == picture(q) for q, r in zip(questions, records))
  # picture_share sets the kinds' proportion; each stays balanced.
  heavy = loop_models.claim_records(200, world, seed=3, picture_share=0.8)
  kinds = collections.Counter((r["metadata"]["kind"], r["metadata"]["answer"]) for r in heavy)
  assert kinds[("picture", "yes")] == kinds[("picture", "no")] == 80  # of 200 records
  assert kinds[("objects", "yes")] == kinds[("objects", "no")] == 20
  # Share 1 (the labeler report's held-out picture set; the labeler itself must see objects).
  only = loop_models.claim_records(40, world, seed=3, picture_share=1.0)
  kinds = collections.Counter((r["metadata"]["kind"], r["metadata"]["answer"]) for r in only)
  assert kinds == {("picture", "yes"): 20, ("picture", "no"): 20}
  scene = shapes.Scene(
    (shapes.SceneObject("circle", "red", "small", 0, 0), shapes.SceneObject("star", "blue", "large", 1, 1)),
    background="white",
  )  # fmt: skip
  rng = np.random.default_rng(0)
  for _ in range(20):
    false = loop_models._false_scene_question(
      "Are there two shapes on a white background?", scene, world, rng
    )
    assert false != "Are there two shapes on a white background?"
    assert loop_models.scene_claim_truth(false.replace("Are there", "There are"), scene)[1] is False
  assert loop_models._false_scene_question("Is there a red circle?", scene, world, rng) is None


def test_policy_claim_records_add_the_asked_share_of_picture_questions(shapes_sft_policy):
  world = _world(runlocal=True)
  records = loop_models.policy_claim_records(
    40, world, 5, [str(shapes_sft_policy)], "vicuna_v1", picture_share=0.25
  )
  assert len(records) == 40
  kinds = collections.Counter(
    r["metadata"]["answer"] for r in records if r.get("metadata", {}).get("kind") == "picture"
  )
  assert kinds == {"yes": 5, "no": 5}
  without = loop_models.policy_claim_records(40, world, 5, [str(shapes_sft_policy)], "vicuna_v1")
  assert len(without) == 40
  assert not any(r.get("metadata", {}).get("kind") == "picture" for r in without)


def test_policy_claim_records_describe_fresh_scenes_per_policy(shapes_sft_policy, monkeypatch):
  described = []
  real = loop_models._policy_descriptions

  def recording(n, world, seed, folder, template, batch_size):
    out = real(n, world, seed, folder, template, batch_size)
    described.append((n, seed, folder, [s.to_dict() for s in out[1]]))
    return out

  monkeypatch.setattr(loop_models, "_policy_descriptions", recording)
  world = _world(runlocal=True)
  folders = [str(shapes_sft_policy)] * 3
  records = loop_models.policy_claim_records(20, world, 5, folders, "vicuna_v1")
  assert len(records) == 20
  assert [(n, seed) for n, seed, _, _ in described] == [(7, [5, 5]), (7, [5, 5, 1]), (6, [5, 5, 2])]
  # The first policy describes the scenes a single policy would (earlier data stays the same);
  # no scene draw is described twice (ids name the draw; small scenes can repeat by chance).
  assert described[0][3] == [s.to_dict() for s in shapes.make_scenes(7, world, seed=[5, 5])]
  ids = [scene["id"] for _, _, _, scenes in described for scene in scenes]
  assert len(ids) == len(set(ids)) == 20
  with pytest.raises(ValueError, match="no policy"):
    loop_models.policy_claim_records(20, world, 5, [], "vicuna_v1")


def test_shape_near_miss_records_swap_the_shape_of_a_present_object():
  world = _world()
  records = loop_models.shape_near_miss_records(60, world, seed=3)
  assert len(records) == 60
  kinds = collections.Counter()
  for r in records:
    question = r["conversations"][0]["value"].split("\n")[1]
    colour, shape = r["metadata"]["object"]
    shown_colour, shown_shape = r["metadata"]["shown"]
    assert shown_colour == colour and f"{colour} {shape}" in question
    present = shapes.Scene.from_dict(r["metadata"]["scene"]).pairs
    assert (colour, shown_shape) in present
    is_yes = r["conversations"][1]["value"] == "Yes"
    assert ((colour, shape) in present) == is_yes == (shape == shown_shape)
    kinds[(is_yes, question.endswith("in the image?"))] += 1
  assert set(kinds) == {(True, True), (True, False), (False, True), (False, False)}
  assert 20 <= kinds[(True, True)] + kinds[(True, False)] <= 40
  # The same records for the same seed (the labeler data is saved once, rebuilt identically).
  again = loop_models.shape_near_miss_records(60, world, seed=3)
  assert [r["conversations"] for r in again] == [r["conversations"] for r in records]


def test_labeler_training_records_put_the_near_miss_share_last():
  world = _world()
  mixed = loop_models.labeler_training_records("hard", 20, world, near_miss_share=0.25)
  assert [r["id"].startswith("near-") for r in mixed] == [False] * 15 + [True] * 5
  assert all(r["metadata"]["answer"] in ("yes", "no") for r in mixed)
  with pytest.raises(ValueError, match="'pope'"):
    loop_models.labeler_training_records("pope", 20, world)


def test_yes_no_accuracy_of_an_empty_set_is_nan_without_asking():
  report = loop_models.yes_no_accuracy("/no/model", None, ([], [], []))
  assert report["items"] == 0 and all(np.isnan(report[k]) for k in report if k != "items")
