"""Reward-model filtering of SFT data: exactly the top fraction of hand-set scores is kept and
written as LLaVA JSON that `read_llava_json` reads, bad records are named or counted, and a
tiny in-process reward model scores records as a direct forward does."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmm_align.data import conversation, reward_data
from lmm_align.data.images import ImageProcessorConfig, preprocess_image
from lmm_align.data.llava_json import DataError, read_llava_json, save_llava_dataset
from lmm_align.data.tokenizer import train_bpe_tokenizer
from lmm_align.hf.reward import RewardModel
from lmm_align.models import Llava, get_variant
from lmm_align.models.llava import dummy_inputs
from lmm_align.rl import reward_filter as rf
from lmm_align.shapes import world as shapes
from lmm_align.shapes.data import record_facts, scene_facts

TEMPLATE = "vicuna_v1"
WORLD = shapes.ShapesWorldConfig(image_size=48, max_objects=2)
CONFIG = get_variant("tiny")
ROW_LENGTH = 640  # one length bucket for every reward-model row here
SCORES = {"a": 0.5, "b": 2.0, "c": -1.0, "d": 2.0, "e": 0.1, "f": 3.0}


@pytest.fixture(scope="module")
def tokenizer():
  tmpl = conversation.get_template(TEMPLATE)
  records = shapes.make_sft_records(40, shapes.ShapesWorldConfig(image_size=48), seed=1)
  corpus = [tmpl.system, reward_data.DEFAULT_FACT_PROMPT, reward_data.DEFAULT_FACT_LEAD_IN] * 2
  for r in records:
    corpus.append(conversation.render_conversation(r["conversations"], tmpl))
    corpus.append(" ".join(scene_facts(shapes.Scene.from_dict(r["metadata"]["scene"]))))
  return train_bpe_tokenizer(corpus, vocab_size=CONFIG.text.vocab_size)


@pytest.fixture
def dataset(tmp_path):
  """data.json: four image records (a-d), a text-only one (e), a two-round one (f)."""
  path = save_llava_dataset(shapes.make_sft_records(4, WORLD, seed=3), tmp_path)
  raw = json.loads(path.read_text())
  for record, new_id in zip(raw, "abcd"):
    record["id"] = new_id
  raw.append(
    {
      "id": "e",
      "conversations": [
        {"from": "human", "value": "Name a shape."},
        {"from": "gpt", "value": "A circle."},
      ],
    }
  )
  raw.append({"id": "f", "image": raw[0]["image"], "conversations": [
    {"from": "human", "value": "<image>\nWhat is there?"}, {"from": "gpt", "value": "Shapes."},
    {"from": "human", "value": "Which colour?"}, {"from": "gpt", "value": "Purple."}]})  # fmt: skip
  path.write_text(json.dumps(raw))
  return path, raw


class StubScorer:
  """Scores by record id from SCORES; remembers what it was given."""

  def __init__(self, fact_augmented: bool = False):
    self.fact_augmented = fact_augmented
    self.seen: list[rf.ScoredTurns] = []
    self.blocks: list[int] = []

  def __call__(self, items):
    self.seen += items
    self.blocks.append(len(items))
    return np.array([SCORES[item.record_id] for item in items])


def _read(path, folder, tokenizer):
  return read_llava_json(path, folder, tokenizer, template=TEMPLATE,
                         num_image_tokens=CONFIG.num_image_tokens,
                         image_token_id=CONFIG.image_token_id)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Selection.
# --------------------------------------------------------------------------------------------


def test_top_fraction_keeps_exactly_the_highest_scores_earlier_first_on_ties():
  scores = np.array([0.5, 2.0, -1.0, 2.0, 0.1, 3.0, -np.inf, 1.0, 0.0, 2.5])
  assert rf.top_fraction(scores, 0.3).tolist() == [1, 5, 9]  # 3.0, 2.5, then the first 2.0
  assert rf.top_fraction(scores, 0.5).tolist() == [1, 3, 5, 7, 9]
  assert rf.top_fraction(scores, 1.0).tolist() == list(range(10))
  assert [rf.keep_count(10, f) for f in (0.25, 0.24, 0.05, 0.04, 1.0)] == [3, 2, 1, 0, 10]
  for bad in (0.0, -0.1, 1.5):
    with pytest.raises(ValueError, match="keep_fraction"):
      rf.keep_count(10, bad)
  with pytest.raises(ValueError, match="NaN scores at positions \\[1\\]"):
    rf.top_fraction(np.array([1.0, np.nan]), 0.5)


def test_scoring_turns_of_the_first_round_or_the_whole_conversation():
  turns = [{"from": "gpt", "value": "Hi."},  # a leading answer is ignored, as LLaVA does
           {"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"},
           {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"}]  # fmt: skip
  assert rf.scoring_turns(turns, "first") == ([], "Q1", "A1")
  assert rf.scoring_turns(turns, "whole") == (turns[1:3], "Q2", "A2")
  with pytest.raises(rf.RecordIssue, match="turn 1 \\(human\\) is not followed by an answer"):
    rf.scoring_turns(turns[:2], "first")


def test_in_memory_records_take_their_own_facts_else_facts_from(tmp_path):
  records = [{"id": k, "image": None, "conversations": [
    {"from": "human", "value": f"Q{k}"}, {"from": "gpt", "value": f"A{k}"}]} for k in "abcd"]  # fmt: skip
  records[0]["facts"] = ["Own fact."]
  scorer = StubScorer(fact_augmented=True)
  result = rf.filter_records(
    records, tmp_path, scorer, keep_fraction=0.5, facts_from=lambda r: [f"Fact of {r['id']}."]
  )
  assert [item.facts for item in scorer.seen] == [
    ["Own fact."],
    ["Fact of b."],
    ["Fact of c."],
    ["Fact of d."],
  ]
  assert result.kept.tolist() == [1, 3]  # b 2.0 and d 2.0 over a 0.5 and c -1
  saved = json.loads(result.json_path.read_text())
  assert [r["id"] for r in saved] == ["b", "d"] and "image" not in saved[0]
  with pytest.raises(DataError, match="record 1 \\(id 'b'\\), field 'facts': no facts"):
    rf.filter_records(records, tmp_path / "bad", StubScorer(True), keep_fraction=0.5)
  skipped = rf.filter_records(
    records, tmp_path / "skip", StubScorer(True), keep_fraction=0.5, on_error="skip"
  )
  assert skipped.counts == {"records": 4, "scored": 1, "kept": 1, "skipped_missing_facts": 3}


# --------------------------------------------------------------------------------------------
# Files, with a stub scorer.
# --------------------------------------------------------------------------------------------


def test_filter_writes_the_top_half_as_llava_json_and_the_scores_beside_it(
  dataset, tmp_path, tokenizer
):
  path, raw = dataset
  scorer = StubScorer()
  out = tmp_path / "kept" / "kept.json"
  out.parent.mkdir()
  result = rf.filter_llava_json(path, tmp_path, out, scorer, keep_fraction=0.5, block_size=4)
  # Scores a .5 b 2 c -1 d 2 e .1 f 3: the top three are f, b, d (b before d on the tie).
  assert result.kept.tolist() == [1, 3, 5]
  assert result.counts == {"records": 6, "scored": 6, "kept": 3}
  assert scorer.blocks == [4, 2]
  assert json.loads(out.read_text()) == [raw[1], raw[3], raw[5]]  # as read, in file order
  examples, skipped = _read(out, tmp_path, tokenizer)
  assert [e.record_id for e in examples] == ["b", "d", "f"] and not skipped
  lines = [json.loads(x) for x in result.scores_path.read_text().splitlines()]
  assert result.scores_path == out.parent / "kept.scores.jsonl"
  assert lines == [
    {"index": i, "id": k, "score": SCORES[k], "kept": k in "bdf"} for i, k in enumerate("abcdef")
  ]
  seen = {item.record_id: item for item in scorer.seen}
  assert (seen["f"].history, seen["f"].question, seen["f"].answer) == (
    [],
    "<image>\nWhat is there?",
    "Shapes.",
  )
  assert seen["e"].image is None and seen["a"].image is not None and seen["a"].facts is None

  whole = StubScorer()
  rf.filter_llava_json(path, tmp_path, out, whole, keep_fraction=0.5, rounds="whole")
  f = next(item for item in whole.seen if item.record_id == "f")
  assert (len(f.history), f.question, f.answer) == (2, "Which colour?", "Purple.")


def test_facts_come_from_the_record_or_the_captions_and_missing_ones_are_named(dataset, tmp_path):
  path, raw = dataset
  raw[0]["facts"] = ["A purple diamond."]
  path.write_text(json.dumps(raw))
  captions = tmp_path / "image_to_caption.json"
  captions.write_text(json.dumps({raw[1]["image"]: ["Caption of b."], raw[2]["image"]: ["c."]}))
  scorer = StubScorer(fact_augmented=True)
  out = tmp_path / "kept.json"
  with pytest.raises(DataError) as error:
    rf.filter_llava_json(path, tmp_path, out, scorer, keep_fraction=0.5, captions_path=captions)
  message = str(error.value)
  assert str(path) in message and "record 3 (id 'd'), field 'image'" in message
  assert "no captions under" in message and not out.exists()

  result = rf.filter_llava_json(path, tmp_path, out, scorer, keep_fraction=0.5,
                                captions_path=captions, on_error="skip")  # fmt: skip
  # d, e and f have no facts: a, b, c are scored (.5, 2, -1) and round(1.5) = 2 kept.
  assert result.counts == {"records": 6, "scored": 3, "kept": 2, "skipped_missing_facts": 3}
  assert [raw[i]["id"] for i in result.kept] == ["a", "b"]
  facts = {item.record_id: item.facts for item in scorer.seen}
  assert facts == {"a": ["A purple diamond."], "b": ["Caption of b."], "c": ["c."]}

  with pytest.raises(DataError, match="record 1 \\(id 'b'\\), field 'facts'.*no facts"):
    rf.filter_llava_json(path, tmp_path, out, StubScorer(), keep_fraction=0.5, require_facts=True)


def test_a_missing_image_is_named_or_skipped(dataset, tmp_path):
  path, raw = dataset
  raw[2]["image"] = "images/nowhere.png"
  path.write_text(json.dumps(raw))
  out = tmp_path / "kept.json"
  with pytest.raises(DataError, match="record 2 \\(id 'c'\\), field 'image'.*not found"):
    rf.filter_llava_json(path, tmp_path, out, StubScorer(), keep_fraction=0.5)
  result = rf.filter_llava_json(path, tmp_path, out, StubScorer(), keep_fraction=0.5,
                                on_error="skip")  # fmt: skip
  assert result.counts["skipped_missing_image"] == 1 and result.counts["scored"] == 5


# --------------------------------------------------------------------------------------------
# A real (tiny, random) reward model on in-memory shapes records.
# --------------------------------------------------------------------------------------------


def _random_params(config, seed: int) -> dict:
  """Random weights of the right shapes without compiling `init` (eval_shape only traces it)."""
  import flax.linen as nn

  shapes_tree = nn.unbox(
    jax.eval_shape(Llava(config).init, jax.random.key(0), *dummy_inputs(config))
  )
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    noise = rng.normal(size=leaf.shape).astype(np.float32)
    return 1.0 + 0.1 * noise if path[-1].key == "scale" else 0.05 * noise

  return jax.tree_util.tree_map_with_path(fill, shapes_tree["params"])


def test_a_tiny_reward_model_scores_like_a_direct_forward_and_the_top_is_written(
  tmp_path, tokenizer
):
  image_config = ImageProcessorConfig(size=32, crop_size=32)
  head = {"kernel": np.random.default_rng(1).normal(size=64).astype(np.float32), "bias": 0.5}
  prompt = reward_data.load_reward_prompt(None, fact_augmented=True)
  rm = RewardModel(Llava(CONFIG), _random_params(CONFIG, 0), head, True, prompt)
  scorer = rf.RewardModelRecordScorer(rm, tokenizer, image_config, template=TEMPLATE,
                                      fact_seed=7, batch_size=4, buckets=(ROW_LENGTH,))  # fmt: skip
  records = shapes.make_sft_records(5, WORLD, seed=4)
  result = rf.filter_records(records, tmp_path, scorer, keep_fraction=0.4, facts_from=record_facts)

  forward = jax.jit(lambda ids, pixels: rm.model.apply(
    {"params": rm.backbone}, ids, pixel_values=pixels, with_logits=False).hidden_states)  # fmt: skip
  expected = []
  for index, record in enumerate(records):
    facts = scene_facts(shapes.Scene.from_dict(record["metadata"]["scene"]))
    suffix = reward_data.reward_suffix(
      prompt, facts, np.random.default_rng([7, index]), fact_augmented=True
    )
    (question, answer) = (t["value"] for t in record["conversations"])
    ids = reward_data.encode_reward_sequence(question, answer, tokenizer, TEMPLATE,
                                             CONFIG.num_image_tokens, CONFIG.image_token_id,
                                             suffix, True)  # fmt: skip
    padded = np.zeros(
      (1, ROW_LENGTH), np.int32
    )  # causal: the padding after the row changes nothing
    padded[0, : len(ids)] = ids
    pixels = preprocess_image(record["image"], image_config)[None]
    hidden = np.asarray(forward(jnp.asarray(padded), jnp.asarray(pixels))[0, len(ids) - 1])
    expected.append(float(hidden.astype(np.float64) @ head["kernel"] + head["bias"]))
  np.testing.assert_allclose(result.scores, expected, rtol=1e-4, atol=1e-4)
  assert np.ptp(expected) > 1e-3
  assert result.kept.tolist() == sorted(np.argsort(expected)[::-1][:2].tolist())

  examples, skipped = _read(tmp_path / "data.json", tmp_path, tokenizer)
  assert [e.record_id for e in examples] == [records[i]["id"] for i in result.kept]
  lines = [json.loads(x) for x in (tmp_path / "data.scores.jsonl").read_text().splitlines()]
  assert [line["kept"] for line in lines] == [i in result.kept for i in range(5)]

  bare = [{**records[0], "metadata": {}}]
  with pytest.raises(DataError, match="record 0 .*field 'metadata'.*no metadata.scene"):
    rf.filter_records(bare, tmp_path / "bad", scorer, keep_fraction=0.5, facts_from=record_facts)
