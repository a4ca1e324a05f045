"""The preference TFDS builders: built from manual_dir, read back equal to the readers."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds
from test_preference_sources import png_bytes, rlaifv_rows, rlaifv_table, rlhf_records, write_rlhf

from lmm_align.data import preference_sources as ps
from lmm_align.data import tfds_llava, tfds_preference
from lmm_align.data.llava_json import DataError


def assert_same_records(got, want):
  assert [r["id"] for r in got] == [r["id"] for r in want]
  for a, b in zip(got, want):
    assert {k: v for k, v in a.items() if k != "image"} == {
      k: v for k, v in b.items() if k != "image"
    }
    assert (a["image"] is None) == (b["image"] is None)
    if a["image"] is not None:
      assert isinstance(a["image"], tfds_llava.RecordImage)  # lazy: decoded when called
      image_a, image_b = a["image"](), b["image"]()
      assert image_a.mode == image_b.mode == "RGB"
      np.testing.assert_array_equal(np.asarray(image_a), np.asarray(image_b))


def test_llava_rlhf_round_trip(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  records = rlhf_records()
  records[0]["image"] = "000000000001.jpg"
  path, folder, captions = write_rlhf(manual, records)
  config = tfds_preference.LlavaRlhfPreferenceConfig(
    name="test", json_file=path.name, captions_file=captions.name, image_subdir=folder.name
  )
  built = tfds_preference.prepare(tfds_preference.LLAVA_RLHF_NAME, manual, tmp_path / "d", config)
  want, _ = ps.read_llava_rlhf_preferences(path, image_folder=folder, captions_path=captions)
  got = tfds_preference.records_from_tfds(built, "train")
  assert_same_records(got, want)
  assert got[1]["history"] and got[0]["facts"] and got[2]["facts"] is None  # JSON fields
  assert not tfds_preference.skipped_at_build(built)
  # The stored image is the file's own bytes, not a re-encoding.
  builder = tfds.builder_from_directory(built)
  source = builder.as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})
  assert source[0]["image"] == (folder / "000000000001.jpg").read_bytes()
  assert json.loads(source[0]["extra"])["preference"] == 1
  # Read by name from the data_dir root (a registered config needs no folder).
  by_name = tfds_preference.records_from_tfds(
    tmp_path / "d", "train[1:]", f"{tfds_preference.LLAVA_RLHF_NAME}/test"
  )
  assert [r["id"] for r in by_name] == ["p2", "3"]


def test_llava_rlhf_build_counts_skips_or_raises(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  records = rlhf_records()
  records[1]["preference"] = 0
  path, folder, _ = write_rlhf(manual, records)
  fields = dict(json_file=path.name, captions_file="", image_subdir=folder.name)
  with pytest.raises(DataError, match=r"record 1 \(id 'p2'\), field 'preference'"):
    tfds_preference.prepare(
      tfds_preference.LLAVA_RLHF_NAME, manual, tmp_path / "d",
      tfds_preference.LlavaRlhfPreferenceConfig(name="strict", **fields),
    )  # fmt: skip
  built = tfds_preference.prepare(
    tfds_preference.LLAVA_RLHF_NAME, manual, tmp_path / "d",
    tfds_preference.LlavaRlhfPreferenceConfig(name="lenient", on_error="skip", **fields),
  )  # fmt: skip
  got = tfds_preference.records_from_tfds(built, "train")
  assert [r["id"] for r in got] == ["p1", "3"] and got[0]["facts"] is None
  assert tfds_preference.skipped_at_build(built) == {"skipped_bad_preference": 1}


def test_rlaifv_round_trip(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  rows = rlaifv_rows(5)
  rows[3]["chosen"] = rows[3]["rejected"]  # skipped at build time
  pq.write_table(rlaifv_table(rows[:3]), manual / "RLAIF-V-Dataset_000.parquet", row_group_size=2)
  pq.write_table(rlaifv_table(rows[3:], False), manual / "RLAIF-V-Dataset_001.parquet")
  config = tfds_preference.RlaifvPreferenceConfig(name="test", on_error="skip")
  built = tfds_preference.prepare(tfds_preference.RLAIFV_NAME, manual, tmp_path / "d", config)
  want, skipped = ps.read_rlaifv_parquet(
    sorted(manual.glob("*.parquet")), on_error="skip", check_images=True
  )
  got = tfds_preference.records_from_tfds(built, "train", tfds_preference.RLAIFV_NAME)
  assert len(got) == 4 and skipped == {"skipped_identical_responses": 1}
  assert_same_records(got, want)
  assert tfds_preference.skipped_at_build(built, tfds_preference.RLAIFV_NAME) == skipped
  source = tfds.builder_from_directory(built).as_data_source(
    "train", decoders={"image": tfds.decode.SkipDecoding()}
  )
  assert source[3]["image"] == rows[4]["image"]  # the parquet cell's own bytes


def test_prepare_refuses_unknown_names_and_empty_folders(tmp_path):
  with pytest.raises(ValueError, match="unknown preference dataset"):
    tfds_preference.prepare("rlaif", tmp_path, tmp_path / "d")
  with pytest.raises(FileNotFoundError, match=r"\*\.parquet"):
    tfds_preference.prepare(tfds_preference.RLAIFV_NAME, tmp_path, tmp_path / "d")


def test_examples_of_pil_images_are_stored_as_png():
  image = png_bytes(3)
  record = {
    "id": "s", "image": ps.decode_image_bytes(image), "question": "Q?", "chosen": "a",
    "rejected": "b", "facts": ["f"], "caption_type": 1,
  }  # fmt: skip
  example = tfds_preference.as_tfds_example(record)
  assert example["has_image"] and example["image"].startswith(b"\x89PNG")
  back = tfds_preference.from_tfds_example(example, record["image"])
  assert back == {**record, "history": []}


def test_tfds_pair_sources_through_the_registry(tmp_path):
  from configs import common
  from lmm_align.data import registry

  manual = tmp_path / "manual"
  manual.mkdir()
  rows = rlaifv_rows(3)
  pq.write_table(rlaifv_table(rows), manual / "RLAIF-V-Dataset_000.parquet")
  config = tfds_preference.RlaifvPreferenceConfig(name="test")
  built = tfds_preference.prepare(tfds_preference.RLAIFV_NAME, manual, tmp_path / "d", config)
  data = common.base_config().data
  data.update(source="tfds_rlaifv", tfds_data_dir=str(built), tfds_split="train")
  got, skipped = registry.read("pairs", data)
  want, _ = ps.read_rlaifv_parquet(manual / "RLAIF-V-Dataset_000.parquet")
  assert not skipped
  assert_same_records(got, want)
