"""`shapes_world`: the shapes-world SFT mixture as a TFDS dataset (array_record, no TensorFlow).

  from lmm_align.shapes import tfds_world  # registers the builder
  tfds_world.ShapesWorld(config="tiny", data_dir=d).download_and_prepare()
  train = tfds.data_source("shapes_world/tiny", data_dir=d, split="train")

Each split is `shapes.make_sft_records(n, world, seed=(world.seed, SPLIT_INDEX[split]))`, so
splits never share scenes and any example can be regenerated without the files; shuffling is
off, so index i of a split is record i. Features:
`id`, `image` (uint8 [S, S, 3] when read back; PNG on disk, encoded by PIL), and
`conversations` / `metadata` as JSON text (read back as bytes: `json.loads` takes them).

Only array_record works without TensorFlow (TFRECORD needs tf to write, and `as_dataset`
needs tf.data), so it is the default here; read with `tfds.data_source` or
`builder.as_data_source`, and grain on top.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import tensorflow_datasets as tfds

from lmm_align.shapes import world as shapes

SPLIT_INDEX = {"train": 0, "validation": 1, "test": 2}


@dataclasses.dataclass(eq=False)
class ShapesWorldBuilderConfig(tfds.core.BuilderConfig):
  """Split sizes and the world they are drawn from (its seed and image size included)."""

  num_train: int = 10_000
  num_validation: int = 500
  num_test: int = 500
  world: shapes.ShapesWorldConfig = shapes.ShapesWorldConfig()


class ShapesWorld(tfds.core.GeneratorBasedBuilder):
  """The shapes-world SFT mixture: captions (some with injected hallucinations) and QA."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
    ShapesWorldBuilderConfig(name="default", description="64x64 images, 10k/500/500."),
    ShapesWorldBuilderConfig(
      name="tiny",
      description="32x32 images, 24/8/8: for tests and smoke runs.",
      num_train=24,
      num_validation=8,
      num_test=8,
      world=shapes.ShapesWorldConfig(image_size=32),
    ),
  ]
  DEFAULT_CONFIG_NAME = "default"

  def __init__(self, **kwargs: Any):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # `dataset_info_from_configs` reads metadata files next to the module; there are none.
    size = self.builder_config.world.image_size
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__.splitlines()[0],
      features=tfds.features.FeaturesDict(
        {
          "id": tfds.features.Text(),
          "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
          "conversations": tfds.features.Text(),
          "metadata": tfds.features.Text(),
        }
      ),
      supervised_keys=None,
      # Records are i.i.d. already; keeping generation order makes index i record i.
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    del dl_manager  # synthetic: nothing to download
    config = self.builder_config
    sizes = {
      "train": config.num_train,
      "validation": config.num_validation,
      "test": config.num_test,
    }
    return {split: self._generate_examples(split, n) for split, n in sizes.items() if n > 0}

  def _generate_examples(self, split: str, n: int):
    world = self.builder_config.world
    for i in range(n):
      record = shapes.make_sft_record(i, world, seed=(world.seed, SPLIT_INDEX[split]))
      yield record["id"], as_tfds_example(record)


def as_tfds_example(record: dict[str, Any]) -> dict[str, Any]:
  """A `shapes.make_sft_record` record as the builder's features (PIL image, JSON text)."""
  return {
    "id": record["id"],
    "image": record["image"],
    "conversations": json.dumps(record["conversations"]),
    "metadata": json.dumps(record["metadata"]),
  }


def from_tfds_example(example: dict[str, Any]) -> dict[str, Any]:
  """An example read back (bytes text, numpy image) as a record with the image as an array."""

  def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

  return {
    "id": text(example["id"]),
    "image": example["image"],
    "conversations": json.loads(text(example["conversations"])),
    "metadata": json.loads(text(example["metadata"])),
  }
