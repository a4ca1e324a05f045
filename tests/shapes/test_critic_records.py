"""The shapes world's critic instruction data: records that encode for SFT, read back through
the LLaVA JSON reader, and parse back to their labels with the critic's own parsers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmm_align.data import conversation
from lmm_align.data.llava_json import read_llava_json, save_llava_dataset
from lmm_align.data.tokenizer import train_bpe_tokenizer
from lmm_align.judges.verdicts import parse_pairwise, parse_pointwise
from lmm_align.shapes import critic_records
from lmm_align.shapes import metrics as shapes_metrics
from lmm_align.shapes import world as shapes

WORLD = shapes.ShapesWorldConfig(image_size=32)


@pytest.fixture(scope="module")
def records():
  return critic_records.make_critic_records(
    12, WORLD, seed=5, pairwise_fraction=0.5, tie_fraction=0.25
  )


@pytest.fixture(scope="module")
def tokenizer(records):
  texts = [conversation.render_conversation(r["conversations"], "vicuna_v1") for r in records]
  return train_bpe_tokenizer(texts, vocab_size=500)


def test_critic_records_parse_back_to_their_labels(records):
  kinds = [r["metadata"]["kind"] for r in records]
  assert kinds == ["pairwise"] * 6 + ["pointwise"] * 6
  winners = set()
  for record in records:
    human, gpt = record["conversations"]
    meta = record["metadata"]
    scene = shapes.Scene.from_dict(meta["scene"])
    assert human["from"] == "human" and gpt["from"] == "gpt"
    assert human["value"].startswith("<image>\n") and record["image"].size == (32, 32)
    json.dumps(meta)  # JSON-native, so save_llava_dataset can write it
    if meta["kind"] == "pairwise":
      verdict = parse_pairwise(gpt["value"])
      assert verdict.winner == meta["winner"] and verdict.format in (
        "better_response",
        "equally_good",
      )
      winners.add(meta["winner"])
      errors = [len(critic_records.hallucinated_mentions(t, scene)) for t in meta["responses"]]
      if meta["winner"] == "tie":
        assert errors == [0, 0]
        continue
      loser = meta["responses"][1 if meta["winner"] == "first" else 0]
      assert errors[0 if meta["winner"] == "first" else 1] == 0 and max(errors) >= 1
      for colour, shape in critic_records.hallucinated_mentions(loser, scene):
        assert f"there is no {colour} {shape}" in gpt["value"]  # the reason names it
    else:
      assert parse_pointwise(gpt["value"], low=0, high=100).score == meta["score"]
      correct, claims = critic_records.claim_accuracy(meta["responses"][0], scene)
      assert meta["score"] == round(100 * correct / claims)
  assert winners == {"first", "second", "tie"}
  assert {r["metadata"]["score"] for r in records[6:]} - {100.0}  # some hallucinated captions


def test_hallucinated_mentions_agree_with_the_metric(records):
  for record in records:
    scene = shapes.Scene.from_dict(record["metadata"]["scene"])
    for text in record["metadata"]["responses"]:
      counts = shapes_metrics.response_hallucination_counts(text, scene)
      assert (
        len(critic_records.hallucinated_mentions(text, scene)) == counts["hallucinated_mentions"]
      )


def test_critic_records_are_deterministic_and_one_to_ten_scale():
  a = critic_records.make_critic_record(3, WORLD, kind="pointwise", seed=5, scale="1-10")
  b = critic_records.make_critic_record(3, WORLD, kind="pointwise", seed=5, scale="1-10")
  assert a["conversations"] == b["conversations"] and a["id"] == b["id"]
  assert 1 <= a["metadata"]["score"] <= 10 and "from 1 to 10" in a["conversations"][0]["value"]
  with pytest.raises(ValueError, match="kind"):
    critic_records.make_critic_record(0, WORLD, kind="listwise")


def test_critic_records_encode_for_sft(records, tokenizer):
  for record in records:
    encoded = conversation.encode_conversation(
      record["conversations"], tokenizer, "vicuna_v1", num_image_tokens=4, image_token_id=4,
      num_images=1, record_id=record["id"],
    )  # fmt: skip
    trained = encoded.labels[encoded.labels != conversation.IGNORE_INDEX]
    assert trained[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(trained[:-1]).strip() == record["conversations"][1]["value"]
    assert int(np.sum(encoded.input_ids == 4)) == 4


def test_critic_records_read_back_through_the_llava_json_reader(records, tokenizer, tmp_path):
  path = save_llava_dataset([dict(r) for r in records[:4]], tmp_path)
  examples, skipped = read_llava_json(
    path, tmp_path, tokenizer, template="vicuna_v1", num_image_tokens=4, image_token_id=4,
    num_workers=1,
  )  # fmt: skip
  assert not skipped and [e.record_id for e in examples] == [r["id"] for r in records[:4]]
