"""The data-source registry: every source, on a tiny file in its published layout, read back
through `registry.read` and encoded; bad input named or skipped and counted."""

import io
import json

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from configs import common
from lmm_align.data import conversation, preference, registry
from lmm_align.data.llava_json import DataError
from lmm_align.data.preference_sources import ImageFile, ParquetImage
from lmm_align.data.tokenizer import train_bpe_tokenizer

P, IMAGE_ID = 3, 4  # tiny image-token count; id 4 is <image> in train_bpe_tokenizer
TEMPLATE = conversation.get_template("vicuna_v1")


@pytest.fixture(scope="module")
def encoding():
  texts = [TEMPLATE.system, "USER: What colour is the square? ASSISTANT: It is red.</s>"] * 4
  tokenizer = train_bpe_tokenizer(texts, vocab_size=320)
  return registry.ConversationEncoding(tokenizer, TEMPLATE, P, IMAGE_ID)


def data_config(**fields) -> ml_collections.ConfigDict:
  data = common.base_config().data
  data.update(fields)
  return data


def png_bytes(seed: int, size=(7, 5)) -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, "PNG")
  return buffer.getvalue()


def decoded(data: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def turns(question: str, answer: str, image: bool = True) -> list[dict[str, str]]:
  prefix = "<image>\n" if image else ""
  return [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]


def write_jsonl(path, records) -> str:
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


# ------------------------------------------------------------------------------------------
# The registry itself.
# ------------------------------------------------------------------------------------------


def test_every_kind_lists_its_sources_and_an_unknown_source_names_the_field():
  assert registry.names("conversations") == (
    "llava_critic_parquet", "llava_json", "shapes", "tfds",
  )  # fmt: skip
  assert registry.names("pairs") == (
    "llava_rlhf", "pairs_jsonl", "rlaifv_parquet", "shapes_pairs", "tfds_llava_rlhf",
    "tfds_rlaifv",
  )  # fmt: skip
  assert registry.names("prompts") == (
    "llava_rlhf_prompts", "prompts_jsonl", "rlaifv_jsonl", "shapes_prompts",
  )  # fmt: skip
  with pytest.raises(ValueError, match=r"data.source='llava_json' is not a source of pairs.*"
                     r"'pairs_jsonl', 'rlaifv_parquet'"):  # fmt: skip
    registry.read("pairs", data_config(source="llava_json"))
  with pytest.raises(ValueError, match="record kind 'critic'"):
    registry.read("critic", data_config())
  with pytest.raises(ValueError, match="already registered"):
    registry.register("pairs", "pairs_jsonl")(lambda data: ([], None))


def test_data_paths_a_file_a_glob_or_a_list(tmp_path):
  for name in ("b_001.jsonl", "b_000.jsonl", "a.jsonl"):
    (tmp_path / name).write_text("")
  one = str(tmp_path / "a.jsonl")
  assert registry.data_paths(data_config(path=one)) == [one]
  shards = [str(tmp_path / "b_000.jsonl"), str(tmp_path / "b_001.jsonl")]
  assert registry.data_paths(data_config(path=str(tmp_path / "b_*.jsonl"))) == shards
  assert registry.data_paths(data_config(path=f"{one},{tmp_path / 'b_*'}")) == [one, *shards]
  as_list = ml_collections.ConfigDict({"path": [one, str(tmp_path / "b_*")]})  # a Python config
  assert registry.data_paths(as_list) == [one, *shards]
  assert registry.data_paths(data_config(json_path=one)) == [one]  # the older field name
  with pytest.raises(FileNotFoundError, match=r"data.path: no file matches '.*c_\*.jsonl'"):
    registry.data_paths(data_config(path=str(tmp_path / "c_*.jsonl")))
  with pytest.raises(FileNotFoundError, match=r"data.path: file '.*missing.jsonl' not found"):
    registry.data_paths(data_config(path=f"{one},{tmp_path / 'missing.jsonl'}"))
  with pytest.raises(ValueError, match="data.path is empty"):
    registry.data_paths(data_config(source="rlaifv_parquet"))


# ------------------------------------------------------------------------------------------
# Conversations (SFT).
# ------------------------------------------------------------------------------------------


def test_llava_json_shards_through_the_registry(tmp_path, encoding):
  (tmp_path / "a.png").write_bytes(png_bytes(0))
  write_jsonl(
    tmp_path / "part_0.jsonl",
    [{"id": "r0", "image": "a.png", "conversations": turns("What colour?", "Red.")}],
  )
  write_jsonl(tmp_path / "part_1.jsonl", [
    {"id": "r1", "conversations": turns("Say hi.", "Hi.", image=False)}])  # fmt: skip
  data = data_config(
    source="llava_json", path=str(tmp_path / "part_*.jsonl"), image_folder=str(tmp_path)
  )
  examples, skipped = registry.read("conversations", data, encoding=encoding)
  assert not skipped and [e.record_id for e in examples] == ["r0", "r1"]
  want = conversation.encode_conversation(
    turns("What colour?", "Red."), encoding.tokenizer, TEMPLATE, P, IMAGE_ID
  )
  np.testing.assert_array_equal(examples[0].input_ids, want.input_ids)
  np.testing.assert_array_equal(np.asarray(examples[0].image()), decoded(png_bytes(0)))
  assert examples[1].image is None


def critic_table(rows, conversations_as_json=False) -> pa.Table:
  image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
  turn_type = pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))
  convs = [json.dumps(r["conversations"]) if conversations_as_json else r["conversations"]
           for r in rows]  # fmt: skip
  return pa.table({
    "id": pa.array([r["id"] for r in rows], pa.string()),
    "source": pa.array(["vlfeedback"] * len(rows), pa.string()),
    "conversations": pa.array(convs, pa.string() if conversations_as_json else turn_type),
    "image": pa.array([None if r["image"] is None else {"bytes": r["image"], "path": None}
                       for r in rows], image_type),
  })  # fmt: skip


def critic_rows(n: int):
  return [
    {"id": f"vlfeedback_{i}", "image": png_bytes(i),
     "conversations": turns(f"Judge answer {i}.", f"Final Score: {i}")}
    for i in range(n)
  ]  # fmt: skip


def test_llava_critic_parquet_encodes_rows_and_reads_images_lazily(tmp_path, encoding):
  rows = critic_rows(5)
  pq.write_table(critic_table(rows[:3]), tmp_path / "pointwise-0.parquet", row_group_size=2)
  pq.write_table(critic_table(rows[3:], True), tmp_path / "pointwise-1.parquet")
  data = data_config(source="llava_critic_parquet", path=str(tmp_path / "pointwise-*.parquet"))
  examples, skipped = registry.read("conversations", data, encoding=encoding)
  assert not skipped and [e.record_id for e in examples] == [r["id"] for r in rows]
  for example, row in zip(examples, rows):
    want = conversation.encode_conversation(
      row["conversations"], encoding.tokenizer, TEMPLATE, P, IMAGE_ID
    )
    np.testing.assert_array_equal(example.input_ids, want.input_ids)
    np.testing.assert_array_equal(example.labels, want.labels)
    assert isinstance(example.image, ParquetImage)
    np.testing.assert_array_equal(np.asarray(example.image()), decoded(row["image"]))
  assert (examples[2].image.row_group, examples[2].image.row) == (1, 0)


def test_llava_critic_parquet_bad_rows_named_or_skipped(tmp_path, encoding):
  rows = critic_rows(4)
  rows[1]["conversations"] = None
  rows[2]["image"] = None  # its conversation has <image>
  rows[3]["image"] = b"\x89PNG garbage"
  path = tmp_path / "pairwise.parquet"
  pq.write_table(critic_table(rows), path)
  data = data_config(source="llava_critic_parquet", path=str(path), check_images="verify")
  with pytest.raises(DataError, match=r"pairwise\.parquet: record 1 \(id 'vlfeedback_1'\), "
                     r"field 'conversations': missing"):  # fmt: skip
    registry.read("conversations", data, encoding=encoding)
  data.on_error = "skip"
  examples, skipped = registry.read("conversations", data, encoding=encoding)
  assert [e.record_id for e in examples] == ["vlfeedback_0"]
  assert skipped == {
    "skipped_missing_conversations": 1, "skipped_missing_image": 1, "skipped_corrupt_image": 1,
  }  # fmt: skip
  pq.write_table(critic_table(rows).drop_columns(["conversations"]), path)
  with pytest.raises(DataError, match=r"missing column\(s\) \['conversations'\]"):
    registry.read("conversations", data, encoding=encoding)


# ------------------------------------------------------------------------------------------
# Preference pairs.
# ------------------------------------------------------------------------------------------


def rlaifv_table(rows, logps=None) -> pa.Table:
  image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
  columns = {
    "ds_name": pa.array(["RLAIF-V"] * len(rows)),
    "image": pa.array([{"bytes": r["image"], "path": None} for r in rows], image_type),
    "question": pa.array([r["question"] for r in rows]),
    "chosen": pa.array([r["chosen"] for r in rows]),
    "rejected": pa.array([r["rejected"] for r in rows]),
    "origin_dataset": pa.array(["VQAv2"] * len(rows)),
    "origin_split": pa.array(['{"type": "question answering"}'] * len(rows)),
    "idx": pa.array([str(i) for i in range(len(rows))]),
    "image_path": pa.array([f"images/{i}.jpg" for i in range(len(rows))]),
  }
  if logps is not None:
    columns["logps"] = pa.array(logps, pa.string())
  return pa.table(columns)


def rlaifv_rows(n: int):
  return [
    {"image": png_bytes(i), "question": f"What is in picture {i}?", "chosen": f"A cat {i}.",
     "rejected": f"A dog {i}."}
    for i in range(n)
  ]  # fmt: skip


def logps_cell(i: int) -> str:
  # [win_logp, win_avg_logp, win_per_token_logp, rej_logp, rej_avg_logp, rej_per_token_logp]
  return json.dumps([-10.0 - i, -2.0, [-1.0] * 5, -20.0 - i, -4.0, [-2.0] * 5])


def encode_pairs(records, encoding, **kwargs) -> preference.PreferenceData:
  pairs = [preference.encode_pair(r, encoding.tokenizer, "vicuna_v1", P, IMAGE_ID) for r in records]
  return preference.PreferenceData(
    pairs, None, max_length=512, buckets=(64, 512), pad_id=0, seed=0, **kwargs
  )


def test_rlaifv_parquet_logps_reach_the_dpo_batch_as_ref_logps(tmp_path, encoding):
  rows = rlaifv_rows(3)
  path = tmp_path / "RLAIF-V-Dataset-withlogp_000-3.parquet"
  pq.write_table(rlaifv_table(rows, [logps_cell(i) for i in range(3)]), path, row_group_size=2)
  records, skipped = registry.read("pairs", data_config(source="rlaifv_parquet", path=str(path)))
  assert not skipped and [r["id"] for r in records] == ["RLAIF-V-0", "RLAIF-V-1", "RLAIF-V-2"]
  assert records[1]["ref_logps"] == [-11.0, -21.0] and records[1]["ref_avg_logps"] == [-2.0, -4.0]
  data = encode_pairs(records, encoding)
  batch = data.rows(np.array([2, 0]))
  np.testing.assert_array_equal(batch["ref_logps"], [[-12.0, -22.0], [-10.0, -20.0]])
  # The image is a placeholder at the start of the question, as RLAIF-V's training code puts it.
  assert int(np.sum(batch["input_ids"][0, 0] == IMAGE_ID)) == P
  np.testing.assert_array_equal(np.asarray(records[2]["image"]()), decoded(rows[2]["image"]))

  # One pair without cached log-probs: none are used (the reference is computed for all).
  pq.write_table(rlaifv_table(rows, [logps_cell(0), None, logps_cell(2)]), path)
  records, _ = registry.read("pairs", data_config(source="rlaifv_parquet", path=str(path)))
  assert "ref_logps" not in records[1] and encode_pairs(records, encoding).ref_logps is None
  assert "ref_logps" not in encode_pairs(records, encoding).rows(np.array([0]))

  pq.write_table(rlaifv_table(rows, [logps_cell(0), "[1, 2]", "not json"]), path)
  data = data_config(source="rlaifv_parquet", path=str(path))
  with pytest.raises(DataError, match=r"record 1 \(id 'RLAIF-V-1'\), field 'logps'"):
    registry.read("pairs", data)
  data.on_error = "skip"
  assert registry.read("pairs", data)[1] == {"skipped_bad_logps": 2}


def test_llava_rlhf_pairs_through_the_registry(tmp_path, encoding):
  (tmp_path / "000000000001.jpg").write_bytes(png_bytes(1))
  records = [
    {"id": "p1", "image": "000000000001.jpg",
     "conversations": turns("Describe it.", "x") + turns("What colour?", "x", image=False),
     "output_1": {"value": "Green."}, "output_2": {"value": "Red."}, "preference": 2},
    {"id": "p2", "image": "000000000001.jpg", "conversations": turns("Describe it.", "x"),
     "output_1": {"value": "Same."}, "output_2": {"value": "Same."}, "preference": 1},
  ]  # fmt: skip
  (tmp_path / "prefs.json").write_text(json.dumps(records))
  (tmp_path / "captions.json").write_text(json.dumps({"000000000001.jpg": ["A green bus."]}))
  data = data_config(
    source="llava_rlhf", path=str(tmp_path / "prefs.json"), image_folder=str(tmp_path),
    captions_path=str(tmp_path / "captions.json"), on_error="skip",
  )  # fmt: skip
  got, skipped = registry.read("pairs", data)
  assert skipped == {"skipped_identical_responses": 1}
  (record,) = got
  assert (record["chosen"], record["rejected"], record["facts"]) == (
    "Red.", "Green.", ["A green bus."]
  )  # fmt: skip
  assert isinstance(record["image"], ImageFile)
  # DPO encodes the earlier turns before the question, the image on the first one.
  pair = encode_pairs(got, encoding).pairs[0]
  history = turns("Describe it.", "x")
  want = conversation.encode_conversation(
    [*history, *turns("What colour?", "Red.", image=False)], encoding.tokenizer, TEMPLATE, P,
    IMAGE_ID,
  )  # fmt: skip
  np.testing.assert_array_equal(pair.chosen_ids, want.input_ids)
  (tmp_path / "other.json").write_text(json.dumps({"000000000002.jpg": ["A car."]}))
  data.update(on_error="raise", captions_path=str(tmp_path / "other.json"))
  with pytest.raises(DataError, match=r"record 0 \(id 'p1'\), field 'image': no captions"):
    registry.read("pairs", data)


def test_pairs_jsonl_through_the_registry(tmp_path, encoding):
  path = write_jsonl(tmp_path / "pairs.jsonl", [
    {"id": "a", "image": None, "question": "Q?", "chosen": "Yes.", "rejected": "No."},
    {"id": "b", "image": None, "question": 3, "chosen": "Yes.", "rejected": "No."},
  ])  # fmt: skip
  with pytest.raises(DataError, match=r"pairs\.jsonl: record 2 \(id 'b'\), field 'question'"):
    registry.read("pairs", data_config(source="pairs_jsonl", path=path))
  records, skipped = registry.read(
    "pairs", data_config(source="pairs_jsonl", path=path, on_error="skip")
  )
  assert [r["id"] for r in records] == ["a"] and skipped == {"skipped_bad_field": 1}
  assert len(encode_pairs(records, encoding)) == 1


# ------------------------------------------------------------------------------------------
# RL prompts.
# ------------------------------------------------------------------------------------------


def prompt_ids(record, encoding) -> np.ndarray:
  return conversation.encode_generation_prompt(
    record["question"], encoding.tokenizer, TEMPLATE, P, IMAGE_ID,
    with_image=record["image"] is not None, record_id=record["id"],
  ).input_ids  # fmt: skip


def test_rlaifv_jsonl_prompts_published_layout(tmp_path, encoding):
  images = tmp_path / "examples" / "imgs"
  images.mkdir(parents=True)
  (images / "a.jpg").write_bytes(png_bytes(3))
  (tmp_path / "b.png").write_bytes(png_bytes(4))
  path = write_jsonl(tmp_path / "detail_input.jsonl", [
    {"ds_question_id": "./examples/imgs/a.jpg", "image_path": "./examples/imgs/a.jpg",
     "question": "Describe the key features of the image.", "metainfos": {"reference": ""}},
    {"ds_question_id": "q2", "image_path": str(tmp_path / "b.png"),  # absolute, as written
     "question": "Offer a comprehensive description.", "metainfos": {"reference": "Landmark"}},
  ])  # fmt: skip
  records, skipped = registry.read("prompts", data_config(source="rlaifv_jsonl", path=path))
  assert not skipped and [r["id"] for r in records] == ["./examples/imgs/a.jpg", "q2"]
  assert records[1]["metainfos"] == {"reference": "Landmark"}
  assert (records[0]["caption_type"], records[0]["length_bonus"], records[0]["facts"]) == (
    1, 1.0, None,
  )  # fmt: skip
  np.testing.assert_array_equal(np.asarray(records[0]["image"]()), decoded(png_bytes(3)))
  np.testing.assert_array_equal(np.asarray(records[1]["image"]()), decoded(png_bytes(4)))
  assert int(np.sum(prompt_ids(records[0], encoding) == IMAGE_ID)) == P


def test_prompt_sources_bad_records_named_or_skipped(tmp_path):
  (tmp_path / "a.png").write_bytes(png_bytes(0))
  (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
  path = write_jsonl(tmp_path / "prompts.jsonl", [
    {"id": "ok", "image": "a.png", "question": "Describe the image."},
    {"id": "text", "image": None, "question": "Say hi."},
    {"id": "noq", "image": "a.png"},
    {"id": "gone", "image": "missing.png", "question": "Q?"},
    {"id": "up", "image": "../a.png", "question": "Q?"},
    {"id": "bad", "image": "bad.png", "question": "Q?"},
  ])  # fmt: skip
  data = data_config(source="prompts_jsonl", path=path, check_images="verify")
  with pytest.raises(DataError, match=r"prompts\.jsonl: record 2 \(id 'noq'\), field 'question'"):
    registry.read("prompts", data)
  data.on_error = "skip"
  records, skipped = registry.read("prompts", data)
  assert [r["id"] for r in records] == ["ok", "text"] and records[1]["image"] is None
  assert skipped == {
    "skipped_missing_question": 1, "skipped_missing_image": 1, "skipped_unsafe_image_path": 1,
    "skipped_corrupt_image": 1,
  }  # fmt: skip
  rlaifv = write_jsonl(tmp_path / "rlaifv.jsonl", [{"ds_question_id": "x", "question": "Q?"}])
  with pytest.raises(DataError, match=r"record 0 \(id 'x'\), field 'image_path'"):
    registry.read("prompts", data_config(source="rlaifv_jsonl", path=rlaifv))


def test_llava_rlhf_prompts_through_the_registry(tmp_path, encoding):
  (tmp_path / "000000000042.jpg").write_bytes(png_bytes(5))
  (tmp_path / "ppo.json").write_text(json.dumps([
    {"id": "q1", "image": "000000000042.jpg", "caption_type": 3, "length_bonus": 0.5,
     "conversations": turns("Which one? A. cat B. dog", "B")},
  ]))  # fmt: skip
  (tmp_path / "captions.json").write_text(json.dumps({"aok_000000000042.jpg": ["A dog."]}))
  data = data_config(
    source="llava_rlhf_prompts", path=str(tmp_path / "ppo.json"), image_folder=str(tmp_path),
    captions_path=str(tmp_path / "captions.json"),
  )  # fmt: skip
  (record,), skipped = registry.read("prompts", data)
  assert not skipped
  assert (record["caption_type"], record["length_bonus"], record["facts"]) == (3, 0.5, ["A dog."])
  assert int(np.sum(prompt_ids(record, encoding) == IMAGE_ID)) == P
