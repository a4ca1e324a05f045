"""The shapes world's data sources: records with exact ground truth (reward pairs, caption
pairs, RL prompts, facts), read through `lmm_align.data.registry` under the names configs use,
and the world's own tokenizer corpus."""

import ml_collections
import numpy as np
import pytest

from configs import common
from configs import shapes as shapes_configs
from lmm_align.data import conversation, preference, registry, sources
from lmm_align.data import preference_sources as ps
from lmm_align.data.tokenizer import train_bpe_tokenizer
from lmm_align.shapes import data as shapes_data
from lmm_align.shapes import world as shapes

P, IMAGE_ID = 3, 4  # tiny image-token count; id 4 is <image> in train_bpe_tokenizer
TEMPLATE = conversation.get_template("vicuna_v1")


WORLD = shapes.ShapesWorldConfig(image_size=32)


def _mentions(text, obj):
  return obj.name in text


def _pairs_named(text):
  return {(c, s) for c in shapes.COLOURS for s in shapes.SHAPES if f"{c} {s}" in text}


def test_reward_records_prefer_the_truth():
  records = shapes_data.reward_records(40, WORLD, seed=3)
  again = shapes_data.reward_records(40, WORLD, seed=3)
  assert [(r["question"], r["chosen"]) for r in again] == [
    (r["question"], r["chosen"]) for r in records
  ]
  scenes = shapes.make_scenes(40, WORLD, seed=3)
  kinds = {"caption": 0, "existence": 0, "omission": 0}
  for record, scene in zip(records, scenes):
    assert record["id"] == scene.id and record["chosen"] != record["rejected"]
    np.testing.assert_array_equal(np.asarray(record["image"]), np.asarray(shapes.render(scene, 32)))
    facts = record["facts"]
    assert facts == shapes_data.scene_facts(scene)
    assert all(any(_mentions(f, o) for f in facts) for o in scene.objects)
    assert record["chosen"] not in facts and record["rejected"] not in facts
    if record["question"].startswith("Is there"):
      kinds["existence"] += 1
      name = record["question"][len("Is there ") : -len(" in the image?")].split(" ", 1)[1]
      present = tuple(name.split()) in scene.pairs
      assert record["chosen"].startswith("Yes" if present else "No")
      assert record["rejected"].startswith("No" if present else "Yes")
    else:
      assert _pairs_named(record["chosen"]) == scene.pairs  # the truth, complete
      rejected = _pairs_named(record["rejected"])
      if rejected < scene.pairs:  # truthful but one object short
        kinds["omission"] += 1
        assert len(scene.pairs - rejected) == 1
      else:
        kinds["caption"] += 1
        assert rejected - scene.pairs  # names an absent pair
  assert kinds["caption"] > 0 and kinds["existence"] > 0 and kinds["omission"] > 0


def test_scene_facts_by_hand():
  objects = (
    shapes.SceneObject("circle", "red", "large", 0, 0),
    shapes.SceneObject("star", "orange", "small", 1, 1),
  )
  scene = shapes.Scene(objects, background="gray")
  assert shapes_data.scene_facts(scene) == [
    "A large red circle is located in the top left.",
    "A small orange star is located in the center.",
    "The picture has a gray background.",
    "The picture contains two shapes in total.",
  ]


def test_ppo_prompts_label_yes_no_from_the_ground_truth():
  records = shapes_data.ppo_prompts(40, WORLD, seed=5)
  scenes = shapes.make_scenes(40, WORLD, seed=5)
  types = [r["caption_type"] for r in records]
  assert {ps.GENERAL, ps.NO_IN_YESNO, ps.YES_IN_YESNO} <= set(types)
  for record, scene in zip(records, scenes):
    assert record["facts"] == shapes_data.scene_facts(scene) and record["length_bonus"] == 1.0
    assert record["scene"] == scene.to_dict()
    assert record["image"].size == (32, 32)
    if record["caption_type"] == ps.GENERAL:
      assert record["question"] == "Describe the image."
    else:
      colour, shape = record["question"].split()[3:5]
      present = (colour, shape) in scene.pairs
      assert record["caption_type"] == (ps.YES_IN_YESNO if present else ps.NO_IN_YESNO)
  again = shapes_data.ppo_prompts(40, WORLD, seed=5)
  assert [r["question"] for r in again] == [r["question"] for r in records]


# ------------------------------------------------------------------------------------------
# Through the registry.
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoding():
  texts = [TEMPLATE.system, "USER: What colour is the square? ASSISTANT: It is red.</s>"] * 4
  tokenizer = train_bpe_tokenizer(texts, vocab_size=320)
  return registry.ConversationEncoding(tokenizer, TEMPLATE, P, IMAGE_ID)


def data_config(**fields) -> ml_collections.ConfigDict:
  data = shapes_configs.base_config().data
  data.shapes.num_train = 6
  data.update(fields)
  return data


def encode_pairs(records, encoding) -> preference.PreferenceData:
  pairs = [preference.encode_pair(r, encoding.tokenizer, "vicuna_v1", P, IMAGE_ID) for r in records]
  return preference.PreferenceData(pairs, None, max_length=512, buckets=(64, 512), pad_id=0, seed=0)


def test_conversations_through_the_registry(encoding):
  examples, skipped = registry.read(
    "conversations", data_config(source="shapes"), encoding=encoding
  )
  assert not skipped and len(examples) == 6
  assert all(int(np.sum(e.input_ids == IMAGE_ID)) == P for e in examples)
  want = shapes.make_sft_records(6, shapes_data.world_config(data_config()), seed=0)
  assert [e.record_id for e in examples] == [r["id"] for r in want]


def test_pairs_through_the_registry(encoding):
  data = data_config(source="shapes_pairs")
  reward, _ = registry.read("pairs", data)
  assert all(r["facts"] for r in reward)  # the reward model's ground truth has facts
  world = shapes_data.world_config(data)
  assert [r["chosen"] for r in reward] == [
    r["chosen"] for r in shapes_data.reward_records(6, world, seed=data.shapes.seed)
  ]
  data.shapes.pair_set = "captions"
  captions, _ = registry.read("pairs", data)
  assert all("facts" not in r and r["question"].startswith("<image>") for r in captions)
  assert len(encode_pairs(reward, encoding)) == len(encode_pairs(captions, encoding)) == 6
  data.shapes.pair_set = "other"
  with pytest.raises(ValueError, match="data.shapes.pair_set='other'"):
    registry.read("pairs", data)


def test_prompts_through_the_registry():
  records, _ = registry.read("prompts", data_config(source="shapes_prompts"), yes_no_fraction=1.0)
  assert len(records) == 6 and all(r["caption_type"] in (6, 7) and r["scene"] for r in records)


def test_caption_pairs_prefer_the_truthful_caption():
  records = shapes_data.preference_records(12, WORLD, seed=1)
  scenes = shapes.make_scenes(12, WORLD, seed=1)
  for record, scene in zip(records, scenes):
    assert record["id"] == scene.id and record["question"].startswith("<image>\n")
    assert _pairs_named(record["chosen"]) == scene.pairs
    assert _pairs_named(record["rejected"]) != scene.pairs


def test_record_facts_read_the_scene_or_name_the_field():
  (record,) = shapes.make_sft_records(1, WORLD, seed=2)
  scene = shapes.Scene.from_dict(record["metadata"]["scene"])
  assert shapes_data.record_facts(record) == shapes_data.scene_facts(scene)
  with pytest.raises(ps.RecordIssue, match="no metadata.scene") as e:
    shapes_data.record_facts({**record, "metadata": {}})
  assert e.value.field == "metadata"


def test_the_world_trains_its_own_tokenizer_and_other_sources_do_not(tmp_path):
  data = data_config(source="shapes")
  data.shapes.tokenizer_records = 3
  texts, vocab_size = registry.tokenizer_corpus(data)
  assert vocab_size == data.shapes.vocab_size and texts[0] == TEMPLATE.system
  assert len(texts) == 1 + 2 * 3  # each record's conversation, then its facts
  records = shapes.make_sft_records(3, shapes_data.world_config(data), seed=[data.shapes.seed, 7])
  assert texts[1] == conversation.render_conversation(records[0]["conversations"], TEMPLATE)
  assert texts[2] == records[0]["metadata"]["facts"]
  assert registry.tokenizer_corpus(data_config(source="llava_json")) is None
  assert "shapes" in registry.tokenizer_corpus_names()
  config = common.base_config()
  config.data.source, config.tokenizer, config.init_from = "llava_json", "", ""
  with pytest.raises(ValueError, match=r"data.source='llava_json' trains no tokenizer.*'shapes'"):
    sources.tokenizer_for(config, str(tmp_path))
