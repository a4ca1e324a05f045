"""The `shapes_world` TFDS builder: build into a temp dir, read back, compare with the generator."""

import numpy as np
import tensorflow_datasets as tfds

from lmm_align.shapes import tfds_world as tfds_shapes
from lmm_align.shapes import world as shapes


def _assert_same(example, record):
  got = tfds_shapes.from_tfds_example(example)
  assert got["id"] == record["id"]
  assert got["conversations"] == record["conversations"]
  assert got["metadata"] == record["metadata"]
  np.testing.assert_array_equal(got["image"], np.asarray(record["image"]))


def test_tiny_builds_and_reads_back_equal_to_the_generator(tmp_path):
  tfds_shapes.ShapesWorld(config="tiny", data_dir=tmp_path).download_and_prepare()
  config = next(c for c in tfds_shapes.ShapesWorld.BUILDER_CONFIGS if c.name == "tiny")
  ids = {}
  for split, n in (("train", 24), ("validation", 8), ("test", 8)):
    source = tfds.data_source("shapes_world/tiny", data_dir=tmp_path, split=split)
    assert len(source) == n
    seed = (config.world.seed, tfds_shapes.SPLIT_INDEX[split])
    records = shapes.make_sft_records(n, config.world, seed=seed)
    for i, record in enumerate(records):
      _assert_same(source[i], record)
    ids[split] = {r["id"] for r in records}
    assert source[0]["image"].shape == (32, 32, 3)
  assert not ids["train"] & ids["validation"] and not ids["train"] & ids["test"]


def test_custom_config(tmp_path):
  world = shapes.ShapesWorldConfig(image_size=40, seed=3, hallucination_rate=1.0)
  config = tfds_shapes.ShapesWorldBuilderConfig(
    name="custom", num_train=5, num_validation=0, num_test=2, world=world
  )
  builder = tfds_shapes.ShapesWorld(config=config, data_dir=tmp_path)
  builder.download_and_prepare()
  assert set(builder.info.splits) == {"train", "test"}
  source = builder.as_data_source("train")
  for i, record in enumerate(shapes.make_sft_records(5, world, seed=(3, 0))):
    _assert_same(source[i], record)
