"""lmm_align/shapes/tower.py: cell labels, and a short pretraining through the trainer registry
(config configs/shapes/tower.py) that loads back into the SFT model."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from lmm_align import config_files, hf
from lmm_align.shapes import world as shapes

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tower_script():
  from lmm_align.shapes import tower

  return tower


def test_cell_labels_follow_the_grid(tower_script):
  world = shapes.ShapesWorldConfig(image_size=48)
  scene = shapes.Scene(
    objects=(
      shapes.SceneObject("star", "blue", "large", row=0, col=2),
      shapes.SceneObject("circle", "red", "small", row=2, col=1),
    )
  )
  labels = tower_script.cell_labels(scene, world)
  want = np.zeros((3, 9), np.int32)
  want[:, 2] = [1 + world.shapes.index("star"), 1 + world.colours.index("blue"), 2]
  want[:, 7] = [1 + world.shapes.index("circle"), 1 + world.colours.index("red"), 1]
  np.testing.assert_array_equal(labels, want)


def test_short_pretraining_learns_and_loads_into_the_sft_model(tower_script, tmp_path):
  from lmm_align.trainers import registry

  config = config_files.load_config("configs/shapes/tower.py:runlocal", str(REPO))
  assert config.trainer == "shapes_tower"
  config.tower.update(steps=60, batch_size=32, lr=3e-3, eval_scenes=64)
  metrics = registry.get(config.trainer).train(config, str(tmp_path))
  saved = json.loads((tmp_path / "tower_metrics.json").read_text())
  assert saved == metrics and metrics["steps"] == 60
  assert json.loads((tmp_path / "summary.json").read_text()) == metrics
  # Colour is one linear read of a patch's mean pixel: 60 steps take it past twice chance
  # (1/6 over occupied cells; 0.41 in our run, 1.00 after the default 5000 steps).
  assert metrics["colour_accuracy"] > 0.3, metrics
  assert metrics["empty_cell_accuracy"] > 0.9, metrics
  model_config = tower_script._vision_model_config(config)
  params = hf.load_vision_tower(tmp_path, model_config)
  assert params["patch_embedding"]["kernel"].shape == (16, 16, 3, model_config.vision.hidden_size)


def test_shape_confusions_count_misread_occupied_cells(tower_script):
  world = shapes.ShapesWorldConfig(image_size=48)
  star, triangle = 1 + world.shapes.index("star"), 1 + world.shapes.index("triangle")
  labels = np.zeros((2, 3, 9), np.int32)
  labels[0, 0, :3] = [star, star, triangle]
  labels[1, 0, 4] = star
  predicted = np.zeros((2, 9), np.int32)
  predicted[0, :3] = [triangle, star, star]
  predicted[0, 8] = triangle  # a shape seen in an empty cell is not a misread object
  predicted[1, 4] = 0  # missed
  assert tower_script.shape_confusions(predicted, labels, world) == {
    "star->empty": 1, "star->triangle": 1, "triangle->star": 1,
  }  # fmt: skip
