"""read_llava_json: equal to encode_conversation on good records; every bad record is named."""

import functools
import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

from lmm_align.data.conversation import encode_conversation, get_template
from lmm_align.data.images import load_image
from lmm_align.data.llava_json import DataError, read_llava_json, save_llava_dataset
from lmm_align.data.tokenizer import IMAGE_TOKEN, train_bpe_tokenizer

P, IMAGE_ID = 3, 4  # tiny image-token count; id 4 is <image> in train_bpe_tokenizer
TEMPLATE = "vicuna_v1"


def make_tokenizer():
  system = get_template(TEMPLATE).system
  texts = [system, "USER: What colour is the square? ASSISTANT: It is red.</s>"] * 4
  return train_bpe_tokenizer(texts, vocab_size=320)


@pytest.fixture(scope="module")
def tokenizer():
  return make_tokenizer()


def png_bytes(mode="RGB", size=(7, 5), seed=0) -> bytes:
  rng = np.random.default_rng(seed)
  channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
  pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(buffer, "PNG")
  return buffer.getvalue()


def jpeg_bytes(size=(9, 6), seed=1) -> bytes:
  rng = np.random.default_rng(seed)
  buffer = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, "JPEG")
  return buffer.getvalue()


def make_turns(question, answer="It is red.", image=True):
  return [
    {"from": "human", "value": ("<image>\n" if image else "") + question},
    {"from": "gpt", "value": answer},
  ]


def good_records():
  """Four records that pass: RGB, RGBA in a subfolder, text only, JPEG with two rounds."""
  return [
    {"id": "r0", "image": "a.png", "conversations": make_turns("What colour is it?")},
    {"id": "r1", "image": "sub/b.png", "conversations": make_turns("Describe it.", "A square.")},
    {"id": "r2", "conversations": make_turns("Say hi.", "Hi.", image=False)},
    {
      "id": "r3",
      "image": "c.jpg",
      "conversations": make_turns("What is it?", "A cat.")
      + [{"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}],
    },
  ]


def make_images(folder):
  (folder / "sub").mkdir(parents=True, exist_ok=True)
  (folder / "a.png").write_bytes(png_bytes("RGB"))
  (folder / "sub" / "b.png").write_bytes(png_bytes("RGBA", (4, 8), seed=2))
  (folder / "c.jpg").write_bytes(jpeg_bytes())
  return folder


def write_records(path, records, jsonl=False):
  if jsonl:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
  else:
    path.write_text(json.dumps(records, indent=1))
  return path


def read(tokenizer, json_path, folder, **kwargs):
  return read_llava_json(
    json_path, folder, tokenizer, template=TEMPLATE, num_image_tokens=P, image_token_id=IMAGE_ID,
    **kwargs,
  )  # fmt: skip


@pytest.mark.parametrize("jsonl", [False, True])
def test_examples_equal_encode_conversation(tokenizer, tmp_path, jsonl):
  folder = make_images(tmp_path / "images")
  records = good_records()
  path = write_records(tmp_path / ("d.jsonl" if jsonl else "d.json"), records, jsonl)
  examples, skipped = read(tokenizer, path, folder)
  assert not skipped
  assert [e.record_id for e in examples] == [r["id"] for r in records]
  for example, record in zip(examples, records):
    want = encode_conversation(record["conversations"], tokenizer, TEMPLATE, P, IMAGE_ID)
    np.testing.assert_array_equal(example.input_ids, want.input_ids)
    np.testing.assert_array_equal(example.labels, want.labels)
    if "image" in record:
      assert isinstance(example.image, functools.partial)  # lazy: a loader, not pixels
      image = example.image()
      assert image.mode == "RGB"
      np.testing.assert_array_equal(np.asarray(image), load_image(folder / record["image"]))
      assert (example.input_ids == IMAGE_ID).sum() == P
    else:
      assert example.image is None
      assert (example.input_ids == IMAGE_ID).sum() == 0


def test_int_ids_one_item_lists_and_symlinks_inside_are_accepted(tokenizer, tmp_path):
  folder = make_images(tmp_path / "images")
  (folder / "link.png").symlink_to(folder / "a.png")
  records = [
    {"id": 7, "image": ["a.png"], "conversations": make_turns("Q?")},
    {"id": "s", "image": "link.png", "conversations": make_turns("Q?")},
  ]
  examples, _ = read(tokenizer, write_records(tmp_path / "d.json", records), folder)
  assert [e.record_id for e in examples] == ["7", "s"]
  np.testing.assert_array_equal(np.asarray(examples[1].image()), np.asarray(examples[0].image()))


def test_add_missing_placeholder_prepends_like_llava_inference(tokenizer, tmp_path):
  folder = make_images(tmp_path / "images")
  record = {"id": "x", "image": "a.png", "conversations": make_turns("Q?", image=False)}
  path = write_records(tmp_path / "d.json", [record])
  with pytest.raises(DataError, match="field 'image'.*no <image> placeholder"):
    read(tokenizer, path, folder)
  examples, _ = read(tokenizer, path, folder, add_missing_placeholder=True)
  want = encode_conversation(make_turns("Q?"), tokenizer, TEMPLATE, P, IMAGE_ID)
  np.testing.assert_array_equal(examples[0].input_ids, want.input_ids)


# ------------------------------------------------------------------------------------------
# Bad records: (name, how to spoil record 1, field named, skip reason, message fragment).
# ------------------------------------------------------------------------------------------


def _without(key):
  return lambda r, folder: {k: v for k, v in r.items() if k != key}


def _with(**fields):
  return lambda r, folder: {**r, **fields}


def _outside_symlink(r, folder):
  outside = folder.parent / "secret.png"
  outside.write_bytes(png_bytes())
  (folder / "escape.png").symlink_to(outside)
  return {**r, "image": "escape.png"}


def _bad_file(data):
  def spoil(r, folder):
    (folder / "bad.img").write_bytes(data)
    return {**r, "image": "bad.img"}

  return spoil


BAD = [
  ("missing_id", _without("id"), "id", "missing_id", "missing"),
  ("list_id", _with(id=["x"]), "id", "bad_id", "expected a string"),
  ("missing_conv", _without("conversations"), "conversations", "missing_conversations", "missing"),
  ("conv_string", _with(conversations="hi"), "conversations", "bad_conversations", "list"),
  ("conv_empty", _with(conversations=[]), "conversations", "bad_conversations", "empty"),
  (
    "not_alternating",
    _with(conversations=make_turns("Q?") + [{"from": "gpt", "value": "again"}]),
    "conversations",
    "bad_conversations",
    "alternate",
  ),  # fmt: skip
  (
    "ends_with_question",
    _with(conversations=make_turns("Q?") + [{"from": "human", "value": "more?"}]),
    "conversations",
    "bad_conversations",
    "must end with an answer",
  ),  # fmt: skip
  (
    "non_string_value",
    _with(conversations=[{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": 3}]),
    "conversations",
    "bad_conversations",
    "not a string",
  ),  # fmt: skip
  ("image_int", _with(image=3), "image", "bad_image_field", "relative path string"),
  ("image_empty", _with(image=""), "image", "bad_image_field", "relative path string"),
  ("multi_image", _with(image=["a.png", "c.jpg"]), "image", "multi_image", "2 images"),
  ("absolute", _with(image="/etc/passwd"), "image", "unsafe_image_path", "absolute"),
  ("dotdot", _with(image="sub/../../x.png"), "image", "unsafe_image_path", "'..'"),
  ("symlink_out", _outside_symlink, "image", "unsafe_image_path", "outside the image folder"),
  ("missing_file", _with(image="nope.png"), "image", "missing_image", "nope.png' not found"),
  ("directory", _with(image="sub"), "image", "missing_image", "not a file"),
  ("garbage", _bad_file(b"not an image"), "image", "corrupt_image", "not a readable image"),
  ("truncated_png", _bad_file(png_bytes()[:-30]), "image", "corrupt_image", "not a readable image"),
  (
    "truncated_jpeg",
    _bad_file(jpeg_bytes()[:-5]),
    "image",
    "corrupt_image",
    "not a readable image",
  ),
  (
    "placeholder_no_image",
    lambda r, folder: {"id": r["id"], "conversations": r["conversations"]},
    "conversations",
    "placeholder_mismatch",
    "no 'image' field",
  ),  # fmt: skip
  (
    "image_no_placeholder",
    _with(conversations=make_turns("Q?", image=False)),
    "image",
    "placeholder_mismatch",
    "no <image> placeholder",
  ),  # fmt: skip
  (
    "two_placeholders",
    _with(conversations=make_turns("<image> Q?")),
    "conversations",
    "placeholder_mismatch",
    "2 <image> placeholders",
  ),  # fmt: skip
]


def _bad_dataset(tmp_path, spoil, jsonl=False):
  folder = make_images(tmp_path / "images")
  good = good_records()
  records = [good[0], spoil({**good[1], "id": "bad"}, folder), good[2]]
  return write_records(tmp_path / "d.json", records, jsonl), folder


@pytest.mark.parametrize("name, spoil, field, reason, fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_record_raises_naming_file_record_and_field(
  tokenizer, tmp_path, name, spoil, field, reason, fragment
):
  path, folder = _bad_dataset(tmp_path, spoil)
  with pytest.raises(DataError) as info:
    read(tokenizer, path, folder)
  error = info.value
  who = "no id" if field == "id" else "id 'bad'"
  assert str(error).startswith(f"{path}: record 1 ({who}), field '{field}': "), str(error)
  assert fragment in str(error)
  assert (error.index, error.field, error.reason) == (1, field, reason)


@pytest.mark.parametrize("name, spoil, field, reason, fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_record_is_skipped_and_counted(
  tokenizer, tmp_path, caplog, name, spoil, field, reason, fragment
):
  path, folder = _bad_dataset(tmp_path, spoil)
  with caplog.at_level(logging.WARNING, logger="lmm_align.data.llava_json"):
    examples, skipped = read(tokenizer, path, folder, on_error="skip")
  assert [e.record_id for e in examples] == ["r0", "r2"]
  assert skipped == {f"skipped_{reason}": 1}
  assert "skipped 1 of 3 records" in caplog.text and fragment in caplog.text


def test_not_an_object_and_bad_jsonl_line(tokenizer, tmp_path):
  folder = make_images(tmp_path / "images")
  good = good_records()
  path = tmp_path / "d.jsonl"
  path.write_text(f"{json.dumps(good[0])}\n\n{{oops\n[1, 2]\n{json.dumps(good[2])}\n")
  with pytest.raises(DataError, match=r"d.jsonl: record 1 \(no id\): line 3 is not JSON"):
    read(tokenizer, path, folder)
  examples, skipped = read(tokenizer, path, folder, on_error="skip")
  assert [e.record_id for e in examples] == ["r0", "r2"]
  assert skipped == {"skipped_bad_json": 1, "skipped_not_an_object": 1}


def test_skip_counts_many_problems(tokenizer, tmp_path):
  folder = make_images(tmp_path / "images")
  (folder / "bad.png").write_bytes(b"junk")
  good = good_records()
  records = [
    good[0],
    {"conversations": make_turns("Q?", image=False)},
    {"id": "m1", "image": "gone.png", "conversations": make_turns("Q?")},
    {"id": "m2", "image": "gone2.png", "conversations": make_turns("Q?")},
    {"id": "c", "image": "bad.png", "conversations": make_turns("Q?")},
    good[3],
  ]
  examples, skipped = read(
    tokenizer, write_records(tmp_path / "d.json", records), folder, on_error="skip"
  )
  assert [e.record_id for e in examples] == ["r0", "r3"]
  assert skipped == {
    "skipped_missing_id": 1,
    "skipped_missing_image": 2,
    "skipped_corrupt_image": 1,
  }


def test_check_images_modes(tokenizer, tmp_path):
  # verify() passes a JPEG cut just before its end marker; only decoding finds it.
  path, folder = _bad_dataset(tmp_path, _bad_file(jpeg_bytes()[:-5]))
  for mode in ("verify", False):
    examples, skipped = read(tokenizer, path, folder, check_images=mode)
    assert len(examples) == 3 and not skipped
  with pytest.raises(ValueError, match="cannot read image"):  # the loader still fails loudly
    examples[1].image()
  with pytest.raises(ValueError, match="check_images"):
    read(tokenizer, path, folder, check_images="sometimes")


def test_file_level_errors(tokenizer, tmp_path):
  bad = tmp_path / "bad.json"
  bad.write_text('[{"id": "a",')
  with pytest.raises(DataError, match=f"{bad}: not valid JSON"):
    read(tokenizer, bad, tmp_path)
  with pytest.raises(DataError, match="cannot read the file"):
    read(tokenizer, tmp_path / "absent.json", tmp_path)
  with pytest.raises(ValueError, match="on_error"):
    read(tokenizer, bad, tmp_path, on_error="ignore")


def test_image_record_without_folder(tokenizer, tmp_path):
  path = write_records(tmp_path / "d.json", good_records()[:1])
  with pytest.raises(DataError, match="field 'image': the record has an image but no folder"):
    read(tokenizer, path, None)


def test_pope_questions_read_as_text_only_jsonl(tokenizer, tmp_path, shared_reference_data):
  """The real POPE file is JSONL despite its .json name: a shape check of the JSONL path."""
  pope = shared_reference_data / "pope_coco_e3e3926" / "coco_pope_random.json"
  if not pope.exists():
    pytest.skip("POPE reference file absent")
  lines = pope.read_text().splitlines()[:5]
  records = []
  for line in lines:
    q = json.loads(line)
    records.append(
      {"id": q["question_id"], "conversations": make_turns(q["text"], q["label"], image=False)}
    )
  path = tmp_path / "pope.json"
  path.write_text("\n".join(json.dumps(r) for r in records))
  examples, _ = read(tokenizer, path, None)
  assert [e.record_id for e in examples] == [str(json.loads(x)["question_id"]) for x in lines]


def test_image_token_is_the_tokenizers(tokenizer):
  assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == IMAGE_ID


def test_save_llava_dataset_writes_what_read_llava_json_reads(tokenizer, tmp_path):
  pixels = np.random.default_rng(3).integers(0, 256, (5, 7, 3), np.uint8)
  records = [
    {"id": "a", "image": Image.fromarray(pixels), "conversations": make_turns("Colour?")},
    {"id": "b", "image": None, "conversations": make_turns("Say hi.", "Hi.", image=False)},
    {"id": "c", "conversations": make_turns("Hello.", "Hi.", image=False), "metadata": {"k": 1}},
  ]
  path = save_llava_dataset(records, tmp_path / "out", "kept.json")
  saved = json.loads(path.read_text())
  assert saved == [
    {"id": "a", "image": "images/a.png", "conversations": records[0]["conversations"]},
    {"id": "b", "conversations": records[1]["conversations"]},
    records[2],
  ]
  examples, skipped = read(tokenizer, path, tmp_path / "out")
  assert not skipped and [e.record_id for e in examples] == ["a", "b", "c"]
  np.testing.assert_array_equal(np.asarray(examples[0].image()), pixels)  # PNG: lossless
  assert examples[1].image is None
  with pytest.raises(ValueError, match=r"record 0 \(id 'x'\), field 'image': expected a PIL"):
    save_llava_dataset([{"id": "x", "image": "a.png"}], tmp_path / "bad")
