"""Readers of the published preference / RL-prompt formats, on small hand-written files."""

import io
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lmm_align.data import preference_sources as ps
from lmm_align.data import reward_data as rd
from lmm_align.data.images import load_image
from lmm_align.data.llava_json import DataError
from lmm_align.data.tokenizer import train_bpe_tokenizer


def png_bytes(seed: int, size=(6, 5), mode="RGB") -> bytes:
  channels = {"RGB": 3, "RGBA": 4}[mode]
  pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels, mode).save(buffer, "PNG")
  return buffer.getvalue()


def turns(*values):
  return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


# ------------------------------------------------------------------------------------------
# LLaVA-RLHF human preferences.
# ------------------------------------------------------------------------------------------


def rlhf_records():
  """Preference 1 and 2, a multi-turn dialogue, and a text-only record."""
  return [
    {
      "id": "p1", "image": "000000000001.jpg",
      "conversations": turns("<image>\nWhat is on the table?", "(replaced)"),
      "output_1": {"from": "llava", "value": "A cup."},
      "output_2": {"from": "llava", "value": "A cup and a dog."},
      "preference": 1, "hallucination": True,
    },
    {
      "id": "p2", "image": "000000000002.jpg",
      "conversations": turns("<image>\nDescribe it.", "A bus.", "What colour?", "x"),
      "output_1": {"value": "Green."}, "output_2": {"value": "Red."},
      "preference": 2, "hallucination": False,
    },
    {
      "id": 3, "conversations": turns("Say hi.", "x"),
      "output_1": {"value": "Hi."}, "output_2": {"value": "Hello there."}, "preference": 2,
    },
  ]  # fmt: skip


CAPTIONS = {
  "000000000001.jpg": ["A cup on a table.", "A wooden table with a mug."],
  "000000000002.jpg": ["A red bus in a street."],
}


def write_rlhf(tmp_path, records, captions=CAPTIONS):
  folder = tmp_path / "train2017"
  folder.mkdir(exist_ok=True)
  for i in (1, 2):
    (folder / f"00000000000{i}.jpg").write_bytes(png_bytes(i))  # PNG bytes; any name works
  path = tmp_path / "prefs.json"
  path.write_text(json.dumps(records))
  captions_path = tmp_path / "image_to_caption.json"
  captions_path.write_text(json.dumps(captions))
  return path, folder, captions_path


def test_llava_rlhf_preferences_map_preference_to_chosen(tmp_path):
  path, folder, captions = write_rlhf(tmp_path, rlhf_records())
  records, skipped = ps.read_llava_rlhf_preferences(
    path, image_folder=folder, captions_path=captions, check_images=True
  )
  assert not skipped and [r["id"] for r in records] == ["p1", "p2", "3"]
  first, second, third = records
  assert (first["chosen"], first["rejected"]) == ("A cup.", "A cup and a dog.")  # preference 1
  assert (second["chosen"], second["rejected"]) == ("Red.", "Green.")  # preference 2
  assert first["question"] == "<image>\nWhat is on the table?" and first["history"] == []
  assert second["question"] == "What colour?"
  assert second["history"] == turns("<image>\nDescribe it.", "A bus.")
  assert first["facts"] == CAPTIONS["000000000001.jpg"]
  assert first["preference"] == 1 and first["hallucination"] is True
  assert first["image"] == ps.ImageFile((folder / "000000000001.jpg").resolve())
  np.testing.assert_array_equal(first["image"](), load_image(folder / "000000000001.jpg"))
  assert third["image"] is None and third["facts"] is None and third["image_file"] is None

  # Without captions there are no facts, and the vanilla reward model needs none.
  plain, _ = ps.read_llava_rlhf_preferences(path, image_folder=folder)
  assert [r["facts"] for r in plain] == [None, None, None]


def test_llava_rlhf_records_encode_as_reward_pairs(tmp_path):
  path, folder, captions = write_rlhf(tmp_path, rlhf_records())
  records, _ = ps.read_llava_rlhf_preferences(path, image_folder=folder, captions_path=captions)
  tokenizer = train_bpe_tokenizer(["USER: What colour? ASSISTANT: Red.</s>"] * 2, vocab_size=300)
  pairs, skipped = rd.encode_reward_pairs(
    records, tokenizer, "vicuna_v1", 3, 4, prompt=rd.load_reward_prompt(None, True),
    fact_augmented=True, rng=np.random.default_rng(0), on_error="skip",
  )  # fmt: skip
  # The text-only record has no captions: skipped when the reward is fact-augmented.
  assert [p.record_id for p in pairs] == ["p1", "p2"] and skipped == {"skipped_missing_facts": 1}
  assert all((p.chosen_ids == 4).sum() == 3 for p in pairs)  # one image, in the first turn


BAD_RLHF = [
  ("missing image file", {"image": "000000000009.jpg"}, "image", "missing_image"),
  ("preference 3", {"preference": 3}, "preference", "bad_preference"),
  ("preference as text", {"preference": "1"}, "preference", "bad_preference"),
  ("preference as bool", {"preference": True}, "preference", "bad_preference"),
  ("empty response", {"output_2": {"value": " "}}, "output_2", "empty_response"),
  ("no output", {"output_1": None}, "output_1", "empty_response"),
  ("identical", {"output_2": {"value": "A cup."}}, "output_2", "identical_responses"),
  ("last turn human", {"conversations": turns("<image>\nQ?")}, "conversations", None),
  ("two placeholders", {"conversations": turns("<image>\n<image>\nQ?", "x")}, "conversations",
   "placeholder_mismatch"),
]  # fmt: skip


@pytest.mark.parametrize("name, change, field, reason", BAD_RLHF, ids=[b[0] for b in BAD_RLHF])
def test_llava_rlhf_bad_records_are_named_or_counted(tmp_path, name, change, field, reason):
  bad = {**rlhf_records()[0], **change}
  path, folder, captions = write_rlhf(tmp_path, [rlhf_records()[1], bad])
  kwargs = dict(image_folder=folder, captions_path=captions)
  with pytest.raises(DataError, match=rf"prefs\.json: record 1 \(id '.+'\), field '{field}'"):
    ps.read_llava_rlhf_preferences(path, **kwargs)
  records, skipped = ps.read_llava_rlhf_preferences(path, on_error="skip", **kwargs)
  assert [r["id"] for r in records] == ["p2"] and sum(skipped.values()) == 1
  if reason is not None:
    assert skipped == {f"skipped_{reason}": 1}


def test_llava_rlhf_caption_problems(tmp_path, caplog):
  path, folder, captions = write_rlhf(tmp_path, rlhf_records()[:2], captions={"x.jpg": ["c"]})
  with pytest.raises(DataError, match=r"record 0 \(id 'p1'\), field 'image': no captions"):
    ps.read_llava_rlhf_preferences(path, image_folder=folder, captions_path=captions)
  with caplog.at_level(logging.WARNING):
    records, skipped = ps.read_llava_rlhf_preferences(
      path, image_folder=folder, captions_path=captions, on_error="skip"
    )
  assert not records and skipped == {"skipped_missing_facts": 2}
  assert "skipped 2 of 2" in caplog.text

  captions.write_text(json.dumps({"000000000001.jpg": []}))
  with pytest.raises(DataError, match="non-empty list of captions"):
    ps.read_llava_rlhf_preferences(path, image_folder=folder, captions_path=captions)
  captions.write_text(json.dumps([["not", "a", "dict"]]))
  with pytest.raises(DataError, match=r"image_to_caption\.json: expected a JSON object"):
    ps.read_llava_rlhf_preferences(path, image_folder=folder, captions_path=captions)


def test_llava_rlhf_image_records_need_a_folder_and_a_readable_file(tmp_path):
  path, folder, _ = write_rlhf(tmp_path, rlhf_records()[:1])
  with pytest.raises(DataError, match="field 'image': the record has an image but no folder"):
    ps.read_llava_rlhf_preferences(path)
  (folder / "000000000001.jpg").write_bytes(b"not an image")
  assert ps.read_llava_rlhf_preferences(path, image_folder=folder)[0]  # existence only
  with pytest.raises(DataError, match="not a readable image"):
    ps.read_llava_rlhf_preferences(path, image_folder=folder, check_images=True)


# ------------------------------------------------------------------------------------------
# LLaVA-RLHF RL prompts.
# ------------------------------------------------------------------------------------------


def ppo_records():
  return [
    {"id": "g", "image": "000000000001.jpg",
     "conversations": turns("<image>\nDescribe the image.", "x", "More?", "y")},
    {"id": "mc", "image": "000000000002.jpg", "caption_type": 3, "length_bonus": 0.5,
     "conversations": turns("<image>\nWhat is it?\nA. cat\nB. bus", "B")},
    {"image": "000000000001.jpg", "caption_type": 6,
     "conversations": turns("<image>\nIs there a dog?", "No")},
  ]  # fmt: skip


PPO_CAPTIONS = {
  "000000000001.jpg": ["A cup on a table."],
  "aok_000000000002.jpg": ["A bus.", "Rationale: buses are large."],
}


def test_ppo_prompts_fields_defaults_and_caption_keys(tmp_path):
  path, folder, captions = write_rlhf(tmp_path, ppo_records(), captions=PPO_CAPTIONS)
  records, skipped = ps.read_ppo_prompts(path, image_folder=folder, captions_path=captions)
  assert not skipped and [r["id"] for r in records] == ["g", "mc", "2"]
  general, choice, yes_no = records
  assert general["question"] == "<image>\nDescribe the image."  # the first human turn only
  assert (general["caption_type"], general["length_bonus"]) == (1, 1.0)  # the defaults
  assert (choice["caption_type"], choice["length_bonus"]) == (3, 0.5)
  assert choice["facts_key"] == "aok_000000000002.jpg"
  assert choice["facts"] == PPO_CAPTIONS["aok_000000000002.jpg"]
  assert yes_no["facts_key"] == "000000000001.jpg" and yes_no["caption_type"] == 6
  assert general["image"] == ps.ImageFile((folder / "000000000001.jpg").resolve())


def test_facts_key_is_the_zero_padded_coco_id():
  assert ps.facts_key("123.jpg", ps.GENERAL) == "000000000123.jpg"
  assert ps.facts_key("000000000123.jpg", ps.YES_IN_YESNO) == "000000000123.jpg"
  for t in (ps.A_IN_ABCD, ps.B_IN_ABCD, ps.C_IN_ABCD, ps.D_IN_ABCD):
    assert ps.facts_key("train2017/000000000123.jpg", t) == "aok_000000000123.jpg"
  with pytest.raises(ps.RecordIssue, match="COCO image id"):
    ps.facts_key("COCO_train2014_000000000123.jpg", ps.GENERAL)


BAD_PPO = [
  ({"caption_type": 8}, "caption_type"),
  ({"caption_type": "2"}, "caption_type"),
  ({"caption_type": 2.5}, "caption_type"),
  ({"length_bonus": "big"}, "length_bonus"),
  ({"image": None}, "image"),
  ({"image": "dog.jpg"}, "image"),
  ({"conversations": turns("", "x")}, "conversations"),
  ({"conversations": [{"from": "gpt", "value": "hi"}]}, "conversations"),
]


@pytest.mark.parametrize("change, field", BAD_PPO)
def test_ppo_bad_records(tmp_path, change, field):
  (tmp_path / "train2017").mkdir()
  (tmp_path / "train2017" / "dog.jpg").write_bytes(png_bytes(0))
  path, folder, _ = write_rlhf(tmp_path, [{**ppo_records()[0], **change}])
  with pytest.raises(DataError, match=rf"record 0 \(id 'g'\), field '{field}'"):
    ps.read_ppo_prompts(path, image_folder=folder)
  records, skipped = ps.read_ppo_prompts(path, image_folder=folder, on_error="skip")
  assert not records and sum(skipped.values()) == 1


def test_ppo_missing_aok_captions_are_named(tmp_path):
  captions = {"000000000002.jpg": ["plain key, not the aok_ one"], "000000000001.jpg": ["c"]}
  path, folder, captions_path = write_rlhf(tmp_path, ppo_records(), captions=captions)
  with pytest.raises(DataError, match=r"record 1 \(id 'mc'\).*'aok_000000000002\.jpg'"):
    ps.read_ppo_prompts(path, image_folder=folder, captions_path=captions_path)


# ------------------------------------------------------------------------------------------
# RLAIF-V parquet.
# ------------------------------------------------------------------------------------------


def rlaifv_table(rows, struct_images=True):
  image_type = (
    pa.struct([("bytes", pa.binary()), ("path", pa.string())]) if struct_images else pa.binary()
  )
  images = [
    (None if b is None else {"bytes": b, "path": "x.png"}) if struct_images else b
    for b in (r["image"] for r in rows)
  ]
  return pa.table({
      "ds_name": [r["ds_name"] for r in rows], "image": pa.array(images, image_type),
      "question": [r["question"] for r in rows], "chosen": [r["chosen"] for r in rows],
      "rejected": [r["rejected"] for r in rows], "origin_dataset": ["VQAv2"] * len(rows),
      "idx": [r["idx"] for r in rows],
  })  # fmt: skip


def rlaifv_rows(n, start=0):
  return [
    {"ds_name": "RLAIF-V", "idx": str(start + i), "image": png_bytes(start + i),
     "question": f"What is shown in picture {i}?", "chosen": f"A cat {i}.",
     "rejected": f"A dog {i}."}
    for i in range(n)
  ]  # fmt: skip


def test_rlaifv_parquet_records_and_lazy_images(tmp_path):
  first, second = tmp_path / "RLAIF-V-Dataset_000.parquet", tmp_path / "RLAIF-V-Dataset_001.parquet"
  rows = rlaifv_rows(5)
  pq.write_table(rlaifv_table(rows[:3]), first, row_group_size=2)  # two row groups
  pq.write_table(rlaifv_table(rows[3:], struct_images=False), second)  # plain bytes column
  records, skipped = ps.read_rlaifv_parquet([first, second], check_images=True)
  assert not skipped
  assert [r["id"] for r in records] == [f"RLAIF-V-{i}" for i in range(5)]
  for record, row in zip(records, rows):
    for field in ("question", "chosen", "rejected"):
      assert record[field] == row[field]
    assert record["facts"] is None and record["history"] == []
    assert record["origin_dataset"] == "VQAv2" and record["idx"] == row["idx"]
    assert isinstance(record["image"], ps.ParquetImage)
    assert record["image"].read_bytes() == row["image"]
    want = np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(record["image"]()), want)
  assert (records[2]["image"].row_group, records[2]["image"].row) == (1, 0)


def test_rlaifv_bad_rows_and_files(tmp_path):
  rows = rlaifv_rows(4)
  rows[1]["rejected"] = rows[1]["chosen"]
  rows[2]["image"] = None
  rows[3]["chosen"] = ""
  path = tmp_path / "shard.parquet"
  pq.write_table(rlaifv_table(rows), path)
  with pytest.raises(
    DataError, match=r"shard\.parquet: record 1 \(id 'RLAIF-V-1'\), field 'rejected'"
  ):
    ps.read_rlaifv_parquet(path)
  records, skipped = ps.read_rlaifv_parquet(path, on_error="skip")
  assert [r["id"] for r in records] == ["RLAIF-V-0"]
  assert skipped == {
    "skipped_identical_responses": 1, "skipped_missing_image": 1, "skipped_empty_response": 1
  }  # fmt: skip

  no_image = tmp_path / "no_image.parquet"
  pq.write_table(rlaifv_table(rlaifv_rows(1)).drop_columns(["image"]), no_image)
  with pytest.raises(DataError, match=r"no_image\.parquet: missing column\(s\) \['image'\]"):
    ps.read_rlaifv_parquet(no_image, on_error="skip")
  broken = tmp_path / "broken.parquet"
  broken.write_bytes(b"not parquet")
  with pytest.raises(DataError, match=r"broken\.parquet: cannot read"):
    ps.read_rlaifv_parquet(broken)
  corrupt = rlaifv_rows(1)
  corrupt[0]["image"] = b"\x89PNG garbage"
  pq.write_table(rlaifv_table(corrupt), path)
  assert ps.read_rlaifv_parquet(path)[0]  # bytes are present; not opened by default
  with pytest.raises(DataError, match="field 'image': not a readable image"):
    ps.read_rlaifv_parquet(path, check_images="verify")


@pytest.mark.parametrize(
  "change, message",
  [
    (
      {"chosen": None},
      r"pairs.jsonl: record 2 \(id 'b'\), field 'chosen': missing or not a string",
    ),
    ({"facts": "A red circle."}, r"record 2 \(id 'b'\), field 'facts': must be a list of strings"),
    ({"image": 3}, r"record 2 \(id 'b'\), field 'image': must be a path string or null"),
    ({"sft_weight": -1}, r"record 2 \(id 'b'\), field 'sft_weight': -1 is not a number >= 0"),
    ({"sft_weight": "1"}, r"record 2 \(id 'b'\), field 'sft_weight': '1' is not a number"),
  ],
)
def test_pairs_jsonl_refuses_wrong_types_naming_file_line_and_field(tmp_path, change, message):
  good = {"id": "a", "image": "a.png", "question": "Q?", "chosen": "A red circle.",
          "rejected": "A red star.", "facts": ["A red circle."]}  # fmt: skip
  path = tmp_path / "pairs.jsonl"
  path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "id": "b", **change}) + "\n")
  with pytest.raises(DataError, match=message):
    ps.read_pairs_jsonl(str(path), str(tmp_path))
  path.write_text(json.dumps(good) + "\n")
  (record,) = ps.read_pairs_jsonl(str(path), str(tmp_path))
  assert record["image"] == ps.ImageFile(tmp_path / "a.png")


def test_rlaifv_logps_cell_list_or_dict_in_published_order():
  per_token_c, per_token_r = [-1.0, -2.0], [-3.0, -4.0]
  values = [-3.0, -1.5, per_token_c, -7.0, -3.5, per_token_r]
  assert ps.rlaifv_logps(json.dumps(values)) == ([-3.0, -7.0], [-1.5, -3.5])
  keys = ("ref_win_logp", "ref_win_avg_logp", "ref_win_per_token_logp", "ref_rej_logp",
          "ref_rej_avg_logp", "ref_rej_per_token_logp")  # fmt: skip
  assert ps.rlaifv_logps(json.dumps(dict(zip(keys, values)))) == ([-3.0, -7.0], [-1.5, -3.5])
  with pytest.raises(ps.RecordIssue, match="finite numbers"):
    ps.rlaifv_logps(json.dumps([float("nan"), 0, [], 0, 0, []]).replace("NaN", '"x"'))
