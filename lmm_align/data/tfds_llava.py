"""`llava_instruct`: LLaVA instruction JSON + its images as a TFDS dataset (array_record).

Build once, then train from the prepared files (no image folder, no path checks at start):

  from lmm_align.data import tfds_llava
  tfds_llava.prepare("playground/data", data_dir)  # the default config: LLaVA-1.5 mix665k
  config = tfds_llava.LlavaInstructConfig(name="mine", json_file="mine.jsonl",
                                          image_subdir="images", on_error="skip")
  folder = tfds_llava.prepare(manual_dir, data_dir, config)  # .../llava_instruct/mine/1.0.0

  examples, skipped = tfds_llava.examples_from_tfds(folder, "train", tokenizer,
      template="vicuna_v1", num_image_tokens=576, image_token_id=32000)

(`tfds build` would need TensorFlow, which the CLI imports; `prepare` does not.)

manual_dir layout (the default config is LLaVA-1.5's `playground/data`):

  manual_dir/
    llava_v1_5_mix665k.json       # LlavaInstructConfig.json_file (a JSON array or JSONL)
    <image_subdir>/coco/train2017/000000033471.jpg, gqa/images/..., ...
                                  # `image` paths are relative to manual_dir/image_subdir
                                  # ("" = manual_dir itself, LLaVA's --image_folder)

Records are checked at build time exactly as `read_llava_json` checks them (without a
tokenizer: the template-specific checks wait for `examples_from_tfds`); with
`on_error="skip"` refused records are counted, and the counts are saved in the dataset's
metadata (`metadata.json`) and returned again by `examples_from_tfds`.

Features (split "train"; shuffling off, so example i is the i-th record kept):
  id            Text, the record's id (read back as bytes);
  index         int64, the record's position in the JSON file (named in errors);
  has_image     bool;
  image         Image: the file's own bytes, stored as they are (no re-encoding, so pixels
                are the file's); a text-only record stores a 1x1 black PNG;
  conversations Text: the turns as JSON (bytes when read back; placeholders as checked).

Without TensorFlow only array_record works (ENVIRONMENT_NOTES.md §2), so it is the default.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import pathlib
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from lmm_align.data.conversation import ConversationTemplate
from lmm_align.data.images import to_rgb
from lmm_align.data.llava_json import (
  LlavaRecord,
  ProblemLog,
  RecordProblem,
  check_encoding_args,
  check_image_file,
  check_image_mode,
  encode_record,
  read_json_records,
  validate_record,
)
from lmm_align.data.pipeline import Example

if TYPE_CHECKING:
  from transformers import PreTrainedTokenizerBase

NAME = "llava_instruct"
_READ_CHUNK = 256  # records fetched per data-source call in the pre-pass


def _blank_png() -> bytes:
  buffer = io.BytesIO()
  Image.new("RGB", (1, 1)).save(buffer, format="PNG")
  return buffer.getvalue()


BLANK_IMAGE = _blank_png()


@dataclasses.dataclass(eq=False)
class LlavaInstructConfig(tfds.core.BuilderConfig):
  """Where the data sits in manual_dir, and how bad records are treated at build time.

  json_file: the instruction file, relative to manual_dir.
  image_subdir: the image folder relative to manual_dir ("" = manual_dir).
  on_error: "raise" or "skip", as in `read_llava_json`.
  check_images: as in `read_llava_json` (True = decode every image once).
  add_missing_placeholder: as in `read_llava_json`.
  """

  json_file: str = "llava_v1_5_mix665k.json"
  image_subdir: str = ""
  on_error: str = "raise"
  check_images: bool | str = True
  add_missing_placeholder: bool = False


class LlavaInstruct(tfds.core.GeneratorBasedBuilder):
  """LLaVA instruction data: id, image bytes, conversations as JSON."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
    LlavaInstructConfig(
      name="default", description="LLaVA-1.5 mix665k in LLaVA's playground/data layout."
    ),
  ]
  DEFAULT_CONFIG_NAME = "default"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Put the instruction JSON (config json_file) in manual_dir and the images under "
    "manual_dir/<image_subdir>, at the paths the records' `image` fields name; see the "
    "module docstring of lmm_align.data.tfds_llava."
  )

  def __init__(self, **kwargs: Any):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__.splitlines()[0],
      features=tfds.features.FeaturesDict(
        {
          "id": tfds.features.Text(),
          "index": tfds.features.Scalar(np.int64),
          "has_image": tfds.features.Scalar(np.bool_),
          "image": tfds.features.Image(shape=(None, None, 3)),
          "conversations": tfds.features.Text(),
        }
      ),
      metadata=tfds.core.MetadataDict(),
      disable_shuffling=True,  # example i is the i-th kept record
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    config = self.builder_config
    manual_dir = pathlib.Path(dl_manager.manual_dir)
    return {
      "train": self._generate_examples(
        manual_dir / config.json_file, manual_dir / config.image_subdir
      )
    }

  def _generate_examples(self, json_path: pathlib.Path, image_folder: pathlib.Path):
    config = self.builder_config
    mode = check_image_mode(config.check_images)
    problems = ProblemLog(os.fspath(json_path), config.on_error)
    records = read_json_records(json_path)
    for index, raw in enumerate(records):
      try:
        record = validate_record(
          raw, image_folder, add_missing_placeholder=config.add_missing_placeholder,
          check_turns=True,
        )  # fmt: skip
        if record.image is not None and (problem := check_image_file(record.image, mode)):
          problem.record_id = record.record_id
          raise problem
      except RecordProblem as problem:
        problems.report(problem, index)
        continue
      yield index, as_tfds_example(record, index)
    problems.log_summary(len(records))
    self.info.metadata["skipped"] = dict(problems.skipped)


def prepare(
  manual_dir: str | os.PathLike,
  data_dir: str | os.PathLike,
  config: LlavaInstructConfig | str = "default",
) -> str:
  """Builds the dataset from manual_dir into data_dir; returns the prepared dataset's folder.

  An already prepared dataset is reused (TFDS's own rule), so calling it twice is cheap.
  """
  builder = LlavaInstruct(config=config, data_dir=os.fspath(data_dir))
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
  )
  return os.fspath(builder.data_dir)


def as_tfds_example(record: LlavaRecord, index: int) -> dict[str, Any]:
  """A checked record as the builder's features (the image file's bytes, JSON text)."""
  has_image = record.image is not None
  return {
    "id": record.record_id,
    "index": index,
    "has_image": has_image,
    "image": record.image.read_bytes() if has_image else BLANK_IMAGE,
    "conversations": json.dumps(record.conversations, ensure_ascii=False),
  }


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def decode_image_bytes(data: bytes) -> Image.Image:
  """Encoded image bytes -> RGB PIL image, exactly as `images.load_image` opens a file."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      return to_rgb(image)
  except (OSError, Image.DecompressionBombError) as e:
    raise ValueError(f"cannot decode image bytes: {e}") from e


@dataclasses.dataclass(frozen=True)
class RecordImage:
  """A zero-argument loader: decodes the image of record `index` of `source` when called."""

  source: Any  # a TFDS data source whose "image" feature is not decoded
  index: int

  def __call__(self) -> Image.Image:
    return decode_image_bytes(self.source[self.index]["image"])


def open_data_source(data_dir: str | os.PathLike, split: str, name: str = NAME) -> tuple[Any, Any]:
  """(builder, data source with raw image bytes) for a prepared `llava_instruct` dataset.

  data_dir: either a prepared dataset's own folder (the one holding dataset_info.json, e.g.
    `$D/llava_instruct/mine/1.0.0`: any config, registered or not), or a TFDS data_dir root,
    read as `name` ("llava_instruct" = the default config, "llava_instruct/mine" another).
  """
  decoders = {"image": tfds.decode.SkipDecoding()}
  if (pathlib.Path(data_dir) / "dataset_info.json").exists():
    builder = tfds.builder_from_directory(data_dir)
    return builder, builder.as_data_source(split, decoders=decoders)
  builder = tfds.builder(name, data_dir=data_dir)
  source = tfds.data_source(name, split=split, data_dir=data_dir, download=False, decoders=decoders)
  return builder, source


def examples_from_tfds(
  data_dir: str | os.PathLike,
  split: str,
  tokenizer: PreTrainedTokenizerBase,
  *,
  template: ConversationTemplate | str,
  num_image_tokens: int,
  image_token_id: int,
  on_error: str = "raise",
  name: str = NAME,
) -> tuple[list[Example], collections.Counter]:
  """The `Example`s `read_llava_json` makes from the same records, read from TFDS.

  Args:
    data_dir, name: where the prepared dataset is (see `open_data_source`).
    split: e.g. "train" or "train[:1000]".
    tokenizer, template, num_image_tokens, image_token_id, on_error: as in `read_llava_json`.
      Only the tokenizer- and template-dependent checks can fail here; the rest ran at build.

  Returns:
    (examples, Counter of skipped records: those refused at build time, from the dataset's
    metadata, plus those refused here). Images are `RecordImage` loaders: nothing is decoded
    until a batch needs it.
  """
  template = check_encoding_args(template, num_image_tokens, image_token_id)
  builder, source = open_data_source(data_dir, split, name)
  problems = ProblemLog(f"{os.fspath(data_dir)} [{split}]", on_error)
  examples = []
  for start in range(0, len(source), _READ_CHUNK):
    indices = list(range(start, min(start + _READ_CHUNK, len(source))))
    for i, item in zip(indices, source.__getitems__(indices)):
      has_image = bool(item["has_image"])
      record = LlavaRecord(_text(item["id"]), json.loads(_text(item["conversations"])), None)
      try:
        encoded = encode_record(
          record, tokenizer, template, num_image_tokens, image_token_id, has_image=has_image
        )
      except RecordProblem as problem:
        problems.report(problem, int(item["index"]))
        continue
      image = RecordImage(source, i) if has_image else None
      examples.append(Example(record.record_id, encoded.input_ids, encoded.labels, image))
  problems.log_summary(len(source))
  # Build-time counts cover the whole file, whatever slice of the split is read.
  skipped = collections.Counter((builder.info.metadata or {}).get("skipped", {}))
  skipped.update(problems.skipped)
  return examples, skipped
