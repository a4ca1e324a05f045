"""experiments/shapes_iterative_dpo.py: the labeler's config follows its flags."""

import pytest

from experiments import shapes_iterative_dpo as experiment
from lmm_align import main


def test_labeler_tower_flag_unfreezes_the_tower_at_a_scaled_learning_rate(tmp_path):
  args = experiment.parse_args(["--workdir=w", "--labeler_tower_lr=0.3", "--labeler_steps=60"])
  config = main.apply_overrides(
    experiment._load("configs/shapes_sft.py"), experiment.labeler_overrides(args)
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
