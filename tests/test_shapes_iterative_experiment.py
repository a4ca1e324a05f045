"""experiments/shapes_iterative_dpo.py: the labeler's config follows its flags."""

import pytest

from experiments import shapes_iterative_dpo as experiment
from lmm_align import main


def test_labeler_tower_flag_unfreezes_the_tower_at_a_scaled_learning_rate(tmp_path):
  args = experiment.parse_args(["--workdir=w", "--labeler_tower_lr=0.3", "--labeler_steps=60"])
  config = main.apply_overrides(
    experiment._load("configs/shapes/sft.py"), experiment.labeler_overrides(args)
  )
  assert config.total_steps == 60 and config.checkpoint_every == 10
  assert config.model.variant == "shapes"
  assert tuple(config.trainable) == (".*",)
  assert [tuple(g) for g in config.optim.lr_groups] == [("vision_tower/.*", 0.3)]
  frozen = experiment.labeler_overrides(experiment.parse_args(["--workdir=w"]))
  assert "trainable" not in frozen and "optim.lr_groups" not in frozen  # the SFT config's
  with pytest.raises(SystemExit):
    experiment.parse_args(["--workdir=w", "--labeler_tower_lr=0.3", "--tower=none"])


def test_wide_labeler_is_the_shapes_model_with_a_wider_decoder():
  from lmm_align.models.config import get_variant

  args = experiment.parse_args(["--workdir=w", "--labeler_variant=shapes-wide"])
  assert experiment.labeler_overrides(args)["model.variant"] == "shapes-wide"
  narrow, wide = get_variant("shapes"), get_variant("shapes-wide")
  assert wide.vision == narrow.vision  # the pretrained tower loads into it
  assert wide.text.hidden_size == 2 * narrow.text.hidden_size
  assert wide.text.num_layers == narrow.text.num_layers


def test_claims_are_judged_as_the_metrics_read_them():
  from lmm_align.shapes import world as shapes

  scene = shapes.Scene((shapes.SceneObject("circle", "red", "small", 0, 0),), background="gray")
  judge = lambda claim: experiment.scene_claim_truth(claim, scene)
  assert judge("There is a large red circle in the top right.") == ("objects", True)  # size, place
  assert judge("There is a red star.") == ("objects", False)
  assert judge("There is a gray image.") == ("picture", True)
  assert judge("There is one shape on a white background.") == ("picture", False)  # background
  assert judge("There are two shapes on a gray background.") == ("picture", False)  # count
  assert judge("It looks simple.") == ("picture", None)


def test_claim_records_are_balanced_and_their_picture_negatives_are_false():
  import collections

  import numpy as np

  from lmm_align.shapes import world as shapes

  world = experiment._world(False)
  records = experiment.claim_records(200, world, seed=3)
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
  heavy = experiment.claim_records(200, world, seed=3, picture_share=0.8)
  kinds = collections.Counter((r["metadata"]["kind"], r["metadata"]["answer"]) for r in heavy)
  assert kinds[("picture", "yes")] == kinds[("picture", "no")] == 80  # of 200 records
  assert kinds[("objects", "yes")] == kinds[("objects", "no")] == 20
  # Share 1 (the labeler report's held-out picture set; the labeler itself must see objects).
  only = experiment.claim_records(40, world, seed=3, picture_share=1.0)
  kinds = collections.Counter((r["metadata"]["kind"], r["metadata"]["answer"]) for r in only)
  assert kinds == {("picture", "yes"): 20, ("picture", "no"): 20}
  with pytest.raises(SystemExit):
    experiment.parse_args(["--workdir=w", "--labeler_picture_share=1.0"])
  scene = shapes.Scene(
    (shapes.SceneObject("circle", "red", "small", 0, 0), shapes.SceneObject("star", "blue", "large", 1, 1)),
    background="white",
  )  # fmt: skip
  rng = np.random.default_rng(0)
  for _ in range(20):
    false = experiment._false_scene_question(
      "Are there two shapes on a white background?", scene, world, rng
    )
    assert false != "Are there two shapes on a white background?"
    assert experiment.scene_claim_truth(false.replace("Are there", "There are"), scene)[1] is False
  assert experiment._false_scene_question("Is there a red circle?", scene, world, rng) is None


def test_labeler_init_fine_tunes_an_exported_model_with_its_own_tower():
  args = experiment.parse_args(["--workdir=w", "--labeler_init=/models/labeler_hf"])
  fields = experiment.labeler_overrides(args)
  assert fields["init_from"] == "/models/labeler_hf" and fields["model.vision_init"] == ""
  assert "init_from" not in experiment.labeler_overrides(experiment.parse_args(["--workdir=w"]))


def test_policy_claim_records_add_the_asked_share_of_picture_questions(shapes_sft_policy):
  import collections

  world = experiment._world(True)
  records = experiment.policy_claim_records(
    40, world, 5, [str(shapes_sft_policy)], "vicuna_v1", picture_share=0.25
  )
  assert len(records) == 40
  kinds = collections.Counter(
    r["metadata"]["answer"] for r in records if r.get("metadata", {}).get("kind") == "picture"
  )
  assert kinds == {"yes": 5, "no": 5}
  without = experiment.policy_claim_records(40, world, 5, [str(shapes_sft_policy)], "vicuna_v1")
  assert len(without) == 40
  assert not any(r.get("metadata", {}).get("kind") == "picture" for r in without)


def test_policy_claim_records_describe_fresh_scenes_per_policy(shapes_sft_policy, monkeypatch):
  from lmm_align.shapes import world as shapes

  described = []
  real = experiment._policy_descriptions

  def recording(n, world, seed, folder, template, batch_size):
    out = real(n, world, seed, folder, template, batch_size)
    described.append((n, seed, folder, [s.to_dict() for s in out[1]]))
    return out

  monkeypatch.setattr(experiment, "_policy_descriptions", recording)
  world = experiment._world(True)
  folders = [str(shapes_sft_policy)] * 3
  records = experiment.policy_claim_records(20, world, 5, folders, "vicuna_v1")
  assert len(records) == 20
  assert [(n, seed) for n, seed, _, _ in described] == [(7, [5, 5]), (7, [5, 5, 1]), (6, [5, 5, 2])]
  # The first policy describes the scenes a single policy would (earlier data stays the same);
  # no scene draw is described twice (ids name the draw; small scenes can repeat by chance).
  assert described[0][3] == [s.to_dict() for s in shapes.make_scenes(7, world, seed=[5, 5])]
  ids = [scene["id"] for _, _, _, scenes in described for scene in scenes]
  assert len(ids) == len(set(ids)) == 20
  with pytest.raises(ValueError, match="no policy"):
    experiment.policy_claim_records(20, world, 5, [], "vicuna_v1")


def test_labeler_claims_from_needs_policy_claims(capsys):
  with pytest.raises(SystemExit):
    experiment.parse_args(["--workdir=w", "--labeler_claims_from=/a,/b"])
  assert "--labeler_claims_from" in capsys.readouterr().err
  args = experiment.parse_args(
    ["--workdir=w", "--labeler_data=policy_claims", "--labeler_claims_from=/a,/b"]
  )
  assert args.labeler_claims_from == "/a,/b"


def test_judge_labeler_gets_a_larger_tower_of_its_own(tmp_path, monkeypatch):
  from lmm_align.models.config import get_variant
  from lmm_align.shapes import tower as shapes_tower

  wide, judge = get_variant("shapes-wide"), get_variant("shapes-judge")
  assert judge.text == wide.text
  assert judge.vision.hidden_size > wide.vision.hidden_size
  assert judge.vision.num_layers > wide.vision.num_layers
  # The cell grid stays the patch grid, so the tower pretraining's cell heads apply.
  assert judge.vision.image_size // judge.vision.patch_size == 3

  pretrained = []
  monkeypatch.setattr(
    shapes_tower, "ensure_tower",
    lambda config, out, quick=False: pretrained.append((config.model.variant, out)),
  )  # fmt: skip
  args = experiment.parse_args([f"--workdir={tmp_path}", "--labeler_variant=shapes-judge"])
  args.tower_dir = "/policy/tower"
  folder = experiment.ensure_labeler_tower(args, tmp_path)
  assert folder == str(tmp_path / "labeler_tower")
  assert pretrained == [("shapes-judge", tmp_path / "labeler_tower")]
  args.labeler_tower_dir = folder
  assert experiment.labeler_overrides(args)["model.vision_init"] == folder
  # A labeler with the policy's vision config reads the policy's tower; none is pretrained.
  args = experiment.parse_args([f"--workdir={tmp_path}", "--labeler_variant=shapes-wide"])
  args.tower_dir = "/policy/tower"
  assert experiment.ensure_labeler_tower(args, tmp_path) == "/policy/tower"
  # One fine-tuned from an exported model brings its own tower.
  args = experiment.parse_args(
    [f"--workdir={tmp_path}", "--labeler_variant=shapes-judge", "--labeler_init=/m"]
  )
  args.tower_dir = "/policy/tower"
  assert experiment.ensure_labeler_tower(args, tmp_path) == ""
  assert experiment.labeler_overrides(args)["model.vision_init"] == ""
  assert len(pretrained) == 1


def test_shape_near_miss_records_swap_the_shape_of_a_present_object(tmp_path):
  import collections

  from lmm_align.shapes import world as shapes

  world = experiment._world(False)
  records = experiment.shape_near_miss_records(60, world, seed=3)
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
  again = experiment.shape_near_miss_records(60, world, seed=3)
  assert [r["conversations"] for r in again] == [r["conversations"] for r in records]
  # Its share of --labeler_records; the rest are --labeler_data's.
  args = experiment.parse_args(
    ["--workdir=w", "--labeler_data=hard", "--labeler_records=20", "--labeler_near_miss_share=0.25"]
  )
  mixed = experiment.labeler_data(args, sft_hf="unused")
  assert [r["id"].startswith("near-") for r in mixed] == [False] * 15 + [True] * 5
  with pytest.raises(SystemExit):
    experiment.parse_args(["--workdir=w", "--labeler_near_miss_share=1"])
