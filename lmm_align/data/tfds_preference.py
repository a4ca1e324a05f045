"""The two published preference formats as TFDS datasets (array_record, no TensorFlow needed).

  from lmm_align.data import tfds_preference
  folder = tfds_preference.prepare(tfds_preference.LLAVA_RLHF_NAME, manual_dir, data_dir)
  records = tfds_preference.records_from_tfds(folder, "train")

Builders (each builds from manual_dir with the matching reader in `preference_sources`, so
a record is checked once, at build time, exactly as the reader checks it):

  llava_rlhf_preference  LLaVA-RLHF human preferences. manual_dir layout (default config):
                           llava_7b_v1_preference.json    (config json_file)
                           image_to_caption.json          (config captions_file; "" = none)
                           coco/train2017/000000xxxxxx.jpg (config image_subdir)
  rlaifv_preference      RLAIF-V-Dataset: every manual_dir file matching config
                         parquet_pattern ("*.parquet"), in sorted order.

`records_from_tfds` reads back the readers' record dicts (same keys and values), with each
image as a loader that decodes it on call. Features (split "train", unshuffled, so example i
is the i-th kept record):
  id, question, chosen, rejected   Text (bytes when read back)
  has_image                        bool
  image                            Image: the file's (or the parquet cell's) own encoded
                                   bytes, not re-encoded; a 1x1 black PNG without an image
  history, facts, extra            Text: JSON of the earlier turns, the facts (or null), and
                                   the source's other fields (preference, idx, ...)
Records refused at build time (on_error="skip") are counted in the dataset's metadata
(`skipped_at_build`). Without TensorFlow only array_record works (ENVIRONMENT_NOTES.md §2).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import pathlib
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from lmm_align.data import preference_sources
from lmm_align.data.tfds_llava import BLANK_IMAGE, RecordImage, open_data_source

LLAVA_RLHF_NAME = "llava_rlhf_preference"
RLAIFV_NAME = "rlaifv_preference"
CORE_FIELDS = ("id", "image", "question", "history", "chosen", "rejected", "facts")
_READ_CHUNK = 256


# ------------------------------------------------------------------------------------------
# Records <-> examples.
# ------------------------------------------------------------------------------------------


def _encoded_image(image: Any) -> bytes:
  """The stored bytes of a record's image: a file's or parquet cell's own, or PNG for PIL."""
  if image is None:
    return BLANK_IMAGE
  if isinstance(image, preference_sources.ImageFile):
    return image.path.read_bytes()
  if isinstance(image, preference_sources.ParquetImage):
    return image.read_bytes()
  if callable(image):
    image = image()
  if isinstance(image, Image.Image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
  raise TypeError(f"cannot store an image of type {type(image).__name__}")


def as_tfds_example(record: dict[str, Any]) -> dict[str, Any]:
  """A reader's record as the builders' features."""
  extra = {k: v for k, v in record.items() if k not in CORE_FIELDS}
  return {
    "id": record["id"],
    "has_image": record["image"] is not None,
    "image": _encoded_image(record["image"]),
    "question": record["question"],
    "history": json.dumps(record.get("history") or [], ensure_ascii=False),
    "chosen": record["chosen"],
    "rejected": record["rejected"],
    "facts": json.dumps(record.get("facts"), ensure_ascii=False),
    "extra": json.dumps(extra, ensure_ascii=False),
  }


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def from_tfds_example(example: dict[str, Any], image: Any) -> dict[str, Any]:
  """An example read back (text as bytes) as the reader's record; `image` is its loader."""
  return {
    "id": _text(example["id"]),
    "image": image if bool(example["has_image"]) else None,
    "question": _text(example["question"]),
    "history": json.loads(_text(example["history"])),
    "chosen": _text(example["chosen"]),
    "rejected": _text(example["rejected"]),
    "facts": json.loads(_text(example["facts"])),
    **json.loads(_text(example["extra"])),
  }


class _PreferenceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """What both builders share: the features, array_record files, one "train" split of the
  reader's kept records in order, and the reader's skip counts in the metadata. A subclass
  names its config and `_read`s its files from manual_dir."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  DEFAULT_CONFIG_NAME = "default"

  def __init__(self, **kwargs: Any):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _read(self, manual: pathlib.Path) -> tuple[list[dict[str, Any]], collections.Counter]:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo directly: `dataset_info_from_configs` looks for files beside the module.
    text = tfds.features.Text
    return tfds.core.DatasetInfo(
      builder=self,
      description=f"{self.name}: preference pairs (lmm_align.data.tfds_preference).",
      features=tfds.features.FeaturesDict(
        {
          "id": text(),
          "has_image": tfds.features.Scalar(np.bool_),
          "image": tfds.features.Image(shape=(None, None, 3)),
          "question": text(),
          "history": text(),
          "chosen": text(),
          "rejected": text(),
          "facts": text(),
          "extra": text(),
        }
      ),  # fmt: skip
      metadata=tfds.core.MetadataDict(),
      disable_shuffling=True,  # example i is the i-th kept record
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    records, skipped = self._read(pathlib.Path(dl_manager.manual_dir))
    return {"train": self._generate_examples(records, skipped)}

  def _generate_examples(self, records: list[dict[str, Any]], skipped: collections.Counter):
    self.info.metadata["skipped"] = dict(skipped)
    for index, record in enumerate(records):
      yield index, as_tfds_example(record)


# ------------------------------------------------------------------------------------------
# Builders.
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class LlavaRlhfPreferenceConfig(tfds.core.BuilderConfig):
  """Where LLaVA-RLHF's files sit in manual_dir, and how bad records are treated.

  json_file, captions_file ("" = no facts), image_subdir ("" = manual_dir): relative paths.
  on_error, check_images: as `read_llava_rlhf_preferences` takes (images decoded once here).
  """

  json_file: str = "llava_7b_v1_preference.json"
  captions_file: str = "image_to_caption.json"
  image_subdir: str = "coco/train2017"
  on_error: str = "raise"
  check_images: bool | str = True


class LlavaRlhfPreference(_PreferenceBuilder):
  """LLaVA-RLHF human preference pairs with their COCO images and captions."""

  BUILDER_CONFIGS = [LlavaRlhfPreferenceConfig(name="default", description="LLaVA-RLHF 10K.")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = "See the module docstring of lmm_align.data.tfds_preference."

  def _read(self, manual: pathlib.Path) -> tuple[list[dict[str, Any]], collections.Counter]:
    config = self.builder_config
    return preference_sources.read_llava_rlhf_preferences(
      manual / config.json_file,
      image_folder=manual / config.image_subdir,
      captions_path=manual / config.captions_file if config.captions_file else None,
      on_error=config.on_error,
      check_images=config.check_images,
    )


@dataclasses.dataclass(eq=False)
class RlaifvPreferenceConfig(tfds.core.BuilderConfig):
  """parquet_pattern: glob of the shards in manual_dir; on_error, check_images as the reader."""

  parquet_pattern: str = "*.parquet"
  on_error: str = "raise"
  check_images: bool | str = True


class RlaifvPreference(_PreferenceBuilder):
  """RLAIF-V-Dataset preference pairs (parquet shards with embedded images)."""

  BUILDER_CONFIGS = [RlaifvPreferenceConfig(name="default", description="RLAIF-V-Dataset.")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Put the RLAIF-V-Dataset parquet shards in manual_dir."

  def _read(self, manual: pathlib.Path) -> tuple[list[dict[str, Any]], collections.Counter]:
    config = self.builder_config
    paths = sorted(manual.glob(config.parquet_pattern))
    if not paths:
      raise FileNotFoundError(f"no file matches {config.parquet_pattern!r} in {manual}")
    return preference_sources.read_rlaifv_parquet(
      paths, on_error=config.on_error, check_images=config.check_images
    )


BUILDERS = {LLAVA_RLHF_NAME: LlavaRlhfPreference, RLAIFV_NAME: RlaifvPreference}


# ------------------------------------------------------------------------------------------
# Build and read back.
# ------------------------------------------------------------------------------------------


def prepare(
  name: str,
  manual_dir: str | os.PathLike,
  data_dir: str | os.PathLike,
  config: tfds.core.BuilderConfig | str = "default",
) -> str:
  """Builds dataset `name` (LLAVA_RLHF_NAME or RLAIFV_NAME) from manual_dir into data_dir.

  Returns the prepared dataset's folder; an already prepared one is reused (TFDS's rule).
  """
  if name not in BUILDERS:
    raise ValueError(f"unknown preference dataset {name!r}; known: {sorted(BUILDERS)}")
  builder = BUILDERS[name](config=config, data_dir=os.fspath(data_dir))
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
  )
  return os.fspath(builder.data_dir)


def records_from_tfds(
  data_dir: str | os.PathLike, split: str = "train", name: str = LLAVA_RLHF_NAME
) -> list[dict[str, Any]]:
  """The records the matching reader returns, read from a prepared dataset.

  Args:
    data_dir: the prepared dataset's own folder (holding dataset_info.json; any config), or a
      TFDS data_dir root, read as `name` (e.g. "rlaifv_preference" or "llava_rlhf_preference/
      mine" for a config named "mine").
    split: e.g. "train" or "train[:1000]".
    name: used only with a data_dir root.

  Returns:
    Record dicts in split order; images are `RecordImage` loaders (decoded when called).
  """
  _, source = open_data_source(data_dir, split, name)
  records = []
  for start in range(0, len(source), _READ_CHUNK):
    indices = list(range(start, min(start + _READ_CHUNK, len(source))))
    for i, example in zip(indices, source.__getitems__(indices)):
      records.append(from_tfds_example(example, RecordImage(source, i)))
  return records


def skipped_at_build(
  data_dir: str | os.PathLike, name: str = LLAVA_RLHF_NAME
) -> collections.Counter:
  """Records refused while building (on_error="skip"), by `skipped_<reason>`."""
  builder, _ = open_data_source(data_dir, "train", name)
  return collections.Counter((builder.info.metadata or {}).get("skipped", {}))
