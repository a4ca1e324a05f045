"""experiments/shapes_iterative_dpo.py: configs/shapes/iterative_experiment.py and its command
line set each stage's config."""

import pytest

from configs.shapes import iterative_dpo, iterative_experiment
from experiments import shapes_iterative_dpo as experiment

CONFIG = "--config=configs/shapes/iterative_experiment.py"


def _parse(*flags: str, arg: str = ""):
  """(config, workdir, named loop fields) of a command line with `flags`."""
  return experiment.parse_flags(["p", CONFIG + (f":{arg}" if arg else ""), "--workdir=w", *flags])


def _config(*flags: str, arg: str = ""):
  return _parse(*flags, arg=arg)[0]


def test_config_defaults_are_the_full_runs():
  config = iterative_experiment.get_config()
  assert (config.feedback, config.sft_from, config.tower, config.quick) == (
    "rlaifv",
    "",
    "auto",
    False,
  )
  assert config.labeler.to_dict() == {
    "exported": "", "data": "hard", "init": "", "image_size": 0, "tower_lr": 0.0,
    "variant": "shapes", "picture_share": 0.0, "near_miss_share": 0.0, "claims_from": "",
    "steps": 1500, "records": 12000,
  }  # fmt: skip
  assert config.critic.to_dict() == {
    "exported": "", "answer": "verdict", "steps": 400, "records": 3000,
  }  # fmt: skip
  assert (config.eval_items, config.models_only) == (256, False)
  assert config.loop.to_dict() == iterative_dpo.get_config().to_dict()
  experiment.check_config(config)
  assert experiment.feedback_kinds(config) == ("rlaifv",)
  assert experiment.loop_overrides(config) == {}


def test_quick_config_takes_a_few_steps_on_runlocal_configs():
  config, workdir, named = _parse(arg="quick")
  assert config.quick and workdir == "w" and named == []
  assert (config.labeler.steps, config.labeler.records) == (4, 32)
  assert (config.critic.steps, config.critic.records, config.eval_items) == (4, 16, 8)
  assert config.loop.to_dict() == iterative_dpo.get_config("runlocal").to_dict()
  assert experiment.loop_overrides(config) == {}
  # A field set on the command line wins over quick's value.
  assert _config("--config.labeler.steps=9", arg="quick").labeler.steps == 9


def test_overrides_reach_the_loop_of_every_feedback_kind(tmp_path):
  config, _, named = _parse(
    "--config.feedback=all", "--config.loop.train.optim.lr=2e-5", "--config.loop.rounds=5",
    "--config.labeler.exported=/models/labeler_hf", arg="quick",
  )  # fmt: skip
  assert experiment.feedback_kinds(config) == ("rlaifv", "self", "critic")
  assert config.labeler.exported == "/models/labeler_hf"
  assert named == ["train.optim.lr", "rounds"]
  # Changed fields override (the runlocal loop's lr is 1e-3); a named one does even at
  # iterative_dpo.py's value, where the correction kind's own default differs (5e-5).
  assert experiment.loop_overrides(config) == {"train.optim.lr": 2e-5, "rounds": 5}
  full, _, named = _parse("--config.loop.train.optim.lr=2e-5")
  assert experiment.loop_overrides(full) == {}  # the rlaifv default
  loop = experiment.loop_config(full, "correction", tmp_path, "/sft_hf", named=named)
  assert loop.train.optim.lr == 2e-5 and loop.feedback.kind == "correction"
  assert experiment.loop_config(full, "correction", tmp_path, "/sft_hf").train.optim.lr == 5e-5
  loop = experiment.loop_config(config, "critic", tmp_path, "/sft_hf", critic_folder="/critic_hf")
  assert (loop.rounds, loop.train.optim.lr, loop.init_from) == (5, 2e-5, "/sft_hf")
  assert loop.feedback.critic == "/critic_hf"
  assert loop.feedback.critic_prompt == str(tmp_path / "critic_prompt.txt")
  with pytest.raises(ValueError, match="config.feedback"):
    experiment.loop_overrides(_config("--config.loop.feedback.kind=self"))
  with pytest.raises(ValueError, match="gpt4"):
    experiment.check_config(_config("--config.feedback=gpt4"))
  with pytest.raises(AttributeError, match="no_such_field"):  # config_flags' error
    _config("--config.loop.no_such_field=1")


def test_labeler_tower_field_unfreezes_the_tower_at_a_scaled_learning_rate():
  config = _config("--config.labeler.tower_lr=0.3", "--config.labeler.steps=60")
  sft = experiment._with_fields(
    experiment._sft_config(quick=False), experiment.labeler_overrides(config)
  )
  assert sft.total_steps == 60 and sft.checkpoint_every == 10
  assert sft.model.variant == "shapes"
  assert tuple(sft.trainable) == (".*",)
  assert [tuple(g) for g in sft.optim.lr_groups] == [("vision_tower/.*", 0.3)]
  frozen = experiment.labeler_overrides(_config())
  assert "trainable" not in frozen and "optim.lr_groups" not in frozen  # the SFT config's
  with pytest.raises(ValueError, match="tower_lr"):
    experiment.check_config(_config("--config.labeler.tower_lr=0.3", "--config.tower=none"))


def test_wide_labeler_is_the_shapes_model_with_a_wider_decoder():
  from lmm_align.models.variants import get_variant

  config = _config("--config.labeler.variant=shapes-wide")
  assert experiment.labeler_overrides(config)["model.variant"] == "shapes-wide"
  narrow, wide = get_variant("shapes"), get_variant("shapes-wide")
  assert wide.vision == narrow.vision  # the pretrained tower loads into it
  assert wide.text.hidden_size == 2 * narrow.text.hidden_size
  assert wide.text.num_layers == narrow.text.num_layers
  with pytest.raises(ValueError, match="labeler.variant"):
    experiment.check_config(_config("--config.labeler.variant=huge"))


def test_labeler_init_fine_tunes_an_exported_model_with_its_own_tower():
  fields = experiment.labeler_overrides(_config("--config.labeler.init=/models/labeler_hf"))
  assert fields["init_from"] == "/models/labeler_hf" and fields["model.vision_init"] == ""
  assert "init_from" not in experiment.labeler_overrides(_config())


def test_labeler_shares_and_claims_from_are_checked():
  for field in ("picture_share", "near_miss_share"):
    with pytest.raises(ValueError, match=f"labeler.{field}=1.0"):
      experiment.check_config(_config(f"--config.labeler.{field}=1.0"))
  with pytest.raises(ValueError, match="labeler.claims_from"):
    experiment.check_config(_config("--config.labeler.claims_from=/a,/b"))
  config = _config("--config.labeler.data=policy_claims", "--config.labeler.claims_from=/a,/b")
  experiment.check_config(config)
  assert config.labeler.claims_from == "/a,/b"
  with pytest.raises(ValueError, match="labeler.image_size"):
    experiment.check_config(_config("--config.labeler.image_size=96"))
  with pytest.raises(ValueError, match="critic.answer"):
    experiment.check_config(_config("--config.critic.answer=score"))


def test_labeler_data_mixes_near_misses_at_their_share():
  config = _config(
    "--config.labeler.data=hard", "--config.labeler.records=20",
    "--config.labeler.near_miss_share=0.25",
  )  # fmt: skip
  mixed = experiment.labeler_data(config, sft_hf="unused")
  assert [r["id"].startswith("near-") for r in mixed] == [False] * 15 + [True] * 5


def test_judge_labeler_gets_a_larger_tower_of_its_own(tmp_path, monkeypatch):
  from lmm_align.models.variants import get_variant
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
  config = _config("--config.labeler.variant=shapes-judge")
  folder = experiment.ensure_labeler_tower(config, tmp_path, "/policy/tower")
  assert folder == str(tmp_path / "labeler_tower")
  assert pretrained == [("shapes-judge", tmp_path / "labeler_tower")]
  assert experiment.labeler_overrides(config, folder)["model.vision_init"] == folder
  # A labeler with the policy's vision config reads the policy's tower; none is pretrained.
  config = _config("--config.labeler.variant=shapes-wide")
  assert experiment.ensure_labeler_tower(config, tmp_path, "/policy/tower") == "/policy/tower"
  # One fine-tuned from an exported model brings its own tower.
  config = _config("--config.labeler.variant=shapes-judge", "--config.labeler.init=/m")
  assert experiment.ensure_labeler_tower(config, tmp_path, "/policy/tower") == ""
  assert experiment.labeler_overrides(config)["model.vision_init"] == ""
  assert len(pretrained) == 1
