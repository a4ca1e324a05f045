"""The `llava_instruct` TFDS builder: built from manual_dir, read back equal to read_llava_json."""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from test_llava_json import (  # the JSON reader's test records, shared
  IMAGE_ID,
  TEMPLATE,
  P,
  good_records,
  make_images,
  make_tokenizer,
  make_turns,
  png_bytes,
  write_records,
)

from lmm_align.data import tfds_llava
from lmm_align.data.llava_json import DataError, read_llava_json


@pytest.fixture(scope="module")
def tokenizer():
  return make_tokenizer()


def _build(tmp_path, records, name="test", **config_fields):
  manual = tmp_path / "manual"
  make_images(manual / "images")
  write_records(manual / "data.jsonl", records, jsonl=True)
  config = tfds_llava.LlavaInstructConfig(
    name=name, json_file="data.jsonl", image_subdir="images", **config_fields
  )
  builder = tfds_llava.LlavaInstruct(config=config, data_dir=tmp_path / "tfds")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
  return builder, manual


def _read_both(tokenizer, builder, manual, **kwargs):
  kw = dict(template=TEMPLATE, num_image_tokens=P, image_token_id=IMAGE_ID, **kwargs)
  from_json = read_llava_json(manual / "data.jsonl", manual / "images", tokenizer, **kw)
  from_tfds = tfds_llava.examples_from_tfds(builder.data_dir, "train", tokenizer, **kw)
  return from_json, from_tfds


def _assert_same_examples(got, want):
  assert [e.record_id for e in got] == [e.record_id for e in want]
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert (a.image is None) == (b.image is None)
    if a.image is not None:
      image_a, image_b = a.image(), b.image()
      assert image_a.mode == image_b.mode == "RGB"
      np.testing.assert_array_equal(np.asarray(image_a), np.asarray(image_b))


def test_build_and_read_back_equals_the_json_reader(tokenizer, tmp_path):
  records = good_records()
  builder, manual = _build(tmp_path, records)
  (want, want_skipped), (got, got_skipped) = _read_both(tokenizer, builder, manual)
  assert len(got) == len(records) and not got_skipped and not want_skipped
  _assert_same_examples(got, want)
  assert isinstance(got[0].image, tfds_llava.RecordImage)  # decoded only when called

  # The stored features: raw file bytes, has_image, JSON conversations, original index.
  source = builder.as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})
  assert source[0]["image"] == (manual / "images" / "a.png").read_bytes()
  text_only = source[2]
  assert not text_only["has_image"] and text_only["image"] == tfds_llava.BLANK_IMAGE
  assert json.loads(text_only["conversations"].decode()) == records[2]["conversations"]
  assert [int(source[i]["index"]) for i in range(len(source))] == [0, 1, 2, 3]
  # Decoded by TFDS itself (PIL, 3 channels) the RGB image is the file's pixels too.
  decoded = builder.as_data_source("train")[0]["image"]
  np.testing.assert_array_equal(decoded, np.asarray(got[0].image()))


def test_read_by_name_from_the_data_dir_root(tokenizer, tmp_path):
  builder, _ = _build(tmp_path, good_records()[:2])
  kw = dict(template=TEMPLATE, num_image_tokens=P, image_token_id=IMAGE_ID)
  by_dir, _ = tfds_llava.examples_from_tfds(builder.data_dir, "train", tokenizer, **kw)
  by_name, _ = tfds_llava.examples_from_tfds(
    tmp_path / "tfds", "train", tokenizer, name="llava_instruct/test", **kw
  )
  _assert_same_examples(by_name, by_dir)
  sliced, _ = tfds_llava.examples_from_tfds(builder.data_dir, "train[1:]", tokenizer, **kw)
  _assert_same_examples(sliced, by_dir[1:])


def _bad_records(folder):
  (folder / "images").mkdir(parents=True, exist_ok=True)
  (folder / "images" / "broken.png").write_bytes(png_bytes()[:-30])
  good = good_records()
  return [
    good[0],
    {"id": "gone", "image": "missing.png", "conversations": make_turns("Q?")},
    {"id": "up", "image": "../x.png", "conversations": make_turns("Q?")},
    {"id": "broken", "image": "broken.png", "conversations": make_turns("Q?")},
    {"conversations": make_turns("Q?", image=False)},
    {"id": "order", "conversations": [{"from": "human", "value": "a"}] * 2},
    good[2],
  ]


def test_build_skips_like_the_json_reader_and_keeps_the_counts(tokenizer, tmp_path):
  manual = tmp_path / "manual"
  records = _bad_records(manual)
  builder, manual = _build(tmp_path, records, on_error="skip")
  (want, want_skipped), (got, got_skipped) = _read_both(tokenizer, builder, manual, on_error="skip")
  assert [e.record_id for e in got] == ["r0", "r2"]
  _assert_same_examples(got, want)
  assert (
    got_skipped
    == want_skipped
    == {
      "skipped_missing_image": 1,
      "skipped_unsafe_image_path": 1,
      "skipped_corrupt_image": 1,
      "skipped_missing_id": 1,
      "skipped_bad_conversations": 1,
    }
  )


def test_build_raises_naming_file_record_and_field(tmp_path):
  manual = tmp_path / "manual"
  records = _bad_records(manual)
  with pytest.raises(DataError) as info:
    _build(tmp_path, records)
  assert str(info.value).startswith(
    f"{manual / 'data.jsonl'}: record 1 (id 'gone'), field 'image': file "
  )
  records = _bad_records(tmp_path / "2" / "manual")
  with pytest.raises(DataError, match=r"record 1 \(id 'broken'\), field 'image': .*readable"):
    _build(tmp_path / "2", [records[0], records[3]])


def test_read_time_errors_name_the_dataset_record_and_field(tokenizer, tmp_path):
  # The plain (pretraining) template takes one round: a two-round record fails at read time.
  builder, _ = _build(tmp_path, good_records())
  kw = dict(template="plain", num_image_tokens=P, image_token_id=IMAGE_ID)
  with pytest.raises(DataError) as info:
    tfds_llava.examples_from_tfds(builder.data_dir, "train", tokenizer, **kw)
  message = str(info.value)
  assert message.startswith(
    f"{builder.data_dir} [train]: record 2 (id 'r2'), field 'conversations'"
  )
  examples, skipped = tfds_llava.examples_from_tfds(
    builder.data_dir, "train", tokenizer, on_error="skip", **kw
  )
  # r2 is text only (plain needs an image), r3 has two rounds.
  assert [e.record_id for e in examples] == ["r0", "r1"]
  assert skipped == {"skipped_bad_conversations": 2}


def test_default_config_uses_llavas_playground_layout(tokenizer, tmp_path):
  manual = tmp_path / "playground_data"
  make_images(manual)  # images sit directly in manual_dir, as LLaVA's --image_folder
  write_records(manual / "llava_v1_5_mix665k.json", good_records())
  folder = tfds_llava.prepare(manual, tmp_path / "tfds")
  assert folder == str(tmp_path / "tfds" / "llava_instruct" / "default" / "1.0.0")
  kw = dict(template=TEMPLATE, num_image_tokens=P, image_token_id=IMAGE_ID)
  got, _ = tfds_llava.examples_from_tfds(tmp_path / "tfds", "train", tokenizer, **kw)
  want, _ = read_llava_json(manual / "llava_v1_5_mix665k.json", manual, tokenizer, **kw)
  _assert_same_examples(got, want)


def test_tfds_source_through_the_registry(tokenizer, tmp_path):
  from configs import common
  from lmm_align.data import registry
  from lmm_align.data.conversation import get_template

  builder, manual = _build(tmp_path, good_records())
  (want, _), _ = _read_both(tokenizer, builder, manual)
  data = common.base_config().data
  data.update(source="tfds", tfds_data_dir=str(builder.data_dir), tfds_split="train")
  encoding = registry.ConversationEncoding(tokenizer, get_template(TEMPLATE), P, IMAGE_ID)
  got, skipped = registry.read("conversations", data, encoding=encoding)
  assert not skipped
  _assert_same_examples(got, want)
