"""The shapes world's data sources, registered with `lmm_align.data.registry` under the names
configs use, and the records behind them.

  conversations  "shapes"          SFT records (`world.make_sft_records`), encoded.
  pairs          "shapes_pairs"    data.shapes.pair_set "reward": `reward_records` (captions
                                   and yes/no questions, with facts: the reward model's ground
                                   truth); "captions": `preference_records` (caption pairs only,
                                   the DPO runs' ground truth).
  prompts        "shapes_prompts"  `ppo_prompts`: RL prompts with facts and the scene itself.
  tokenizer      "shapes"          a BPE corpus of shapes-world text (`tokenizer_corpus`), so a
                                   run on the shapes world needs no published tokenizer.

Every reader takes `config.data`, whose `shapes` block sets the world (`world_config`) and the
record counts. The records have the published formats' fields (`preference_sources`), with
facts phrased as short captions (`scene_facts`), so the fact-augmented reward model can be
trained and used on CPU.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from lmm_align.data import conversation, registry
from lmm_align.data.conversation import IMAGE_PLACEHOLDER
from lmm_align.data.pipeline import Example
from lmm_align.data.preference_sources import GENERAL, NO_IN_YESNO, YES_IN_YESNO, RecordIssue
from lmm_align.shapes import world as shapes


def world_config(data_config: ml_collections.ConfigDict) -> shapes.ShapesWorldConfig:
  """The world a run's `config.data.shapes` block describes."""
  s = data_config.shapes
  return shapes.ShapesWorldConfig(
    image_size=s.image_size,
    hallucination_rate=s.hallucination_rate,
    max_objects=s.max_objects,
    seed=s.seed,
  )


def _seed_list(seed: int | Sequence[int]) -> list[int]:
  return list(seed) if isinstance(seed, Sequence) else [seed]


# ------------------------------------------------------------------------------------------
# Facts.
# ------------------------------------------------------------------------------------------


def scene_facts(scene: shapes.Scene) -> list[str]:
  """Caption-like sentences about a scene: one per object, its background, its count.

  Worded unlike the answers (`shapes.scene_caption`), so a reward model cannot score an answer
  by string overlap with the facts alone.
  """
  facts = [
    f"{shapes.with_article(f'{o.size} {o.name}').capitalize()} is located "
    f"{shapes.position_phrase(o.position)}."
    for o in scene.objects
  ]
  n = len(scene.objects)
  facts.append(f"The picture has a {scene.background} background.")
  facts.append(f"The picture contains {shapes.count_phrase(n, 'shape', 'shapes')} in total.")
  return facts


def record_facts(record: Mapping[str, Any]) -> list[str]:
  """`scene_facts` of an SFT record's `metadata.scene` (what `reward_filter.filter_records`
  takes as `facts_from`); RecordIssue (field 'metadata') when the record has no scene."""
  scene = (record.get("metadata") or {}).get("scene")
  if scene is None:
    raise RecordIssue("metadata", "missing_facts", "no metadata.scene to take the facts from")
  return scene_facts(shapes.Scene.from_dict(scene))


# ------------------------------------------------------------------------------------------
# Preference pairs and RL prompts.
# ------------------------------------------------------------------------------------------


def _caption_world(world: shapes.ShapesWorldConfig) -> shapes.ShapesWorldConfig:
  # Every record a caption with an injected hallucination: `caption_pair` needs one.
  return dataclasses.replace(world, hallucination_rate=1.0, task_mix=(("caption", 1.0),))


def _existence_query(
  scene: shapes.Scene, rng: np.random.Generator, world: shapes.ShapesWorldConfig
) -> tuple[str, bool]:
  """(object name, present?): a present object or an absent (colour, shape), evenly."""
  if rng.random() < 0.5:
    return scene.objects[rng.integers(len(scene.objects))].name, True
  absent = [(c, s) for s in world.shapes for c in world.colours if (c, s) not in scene.pairs]
  colour, shape = absent[rng.integers(len(absent))]
  return f"{colour} {shape}", False


def preference_records(
  n: int,
  world: shapes.ShapesWorldConfig,
  seed: int,
  omission_fraction: float = 0.3,
  binding_fraction: float = 0.0,
) -> list[dict[str, Any]]:
  """Ground-truth caption pairs: the truthful caption (the scene's facts) is chosen, the same
  caption with an injected hallucination (an absent object, or a wrong colour) is rejected,
  or, for the fractions given, the caption with an object left out or with a binding error
  (`shapes.caption_pair`). Records {"id", "image", "question" (with "<image>\\n"), "chosen",
  "rejected"}, as `preference.encode_pair` takes them."""
  out = []
  for i, record in enumerate(shapes.make_sft_records(n, _caption_world(world), seed=seed)):
    chosen, rejected = shapes.caption_pair(
      record, np.random.default_rng([seed, i, 3]),
      omission_fraction=omission_fraction, binding_fraction=binding_fraction,
    )  # fmt: skip
    out.append({
        "id": record["id"], "image": record["image"],
        "question": record["conversations"][0]["value"], "chosen": chosen, "rejected": rejected,
    })  # fmt: skip
  return out


def reward_records(
  n: int,
  world: shapes.ShapesWorldConfig,
  seed: int | Sequence[int],
  *,
  existence_fraction: float = 0.3,
  omission_fraction: float = 0.3,
  binding_fraction: float = 0.0,
) -> list[dict[str, Any]]:
  """Ground-truth reward pairs on shapes scenes, with facts.

  Most records are captions: the truthful caption is chosen, the same caption with one
  injected hallucination (an absent object or a wrong colour) rejected. A fraction
  `existence_fraction` instead asks whether an object is in the image and prefers the true
  yes/no answer; a fraction `omission_fraction` of the caption records (scenes with two or
  more objects) rejects the truthful caption with one object left out, so that the reward
  values completeness too and a policy cannot win by saying less, and a fraction
  `binding_fraction` one with a binding error (`shapes.caption_pair`). Record i depends only
  on (seed, i).
  """
  caption_world = _caption_world(world)
  out = []
  for i in range(n):
    sft = shapes.make_sft_record(i, caption_world, seed=seed)
    scene = shapes.Scene.from_dict(sft["metadata"]["scene"])
    rng = np.random.default_rng([*_seed_list(seed), i, 1])
    record = {"id": sft["id"], "image": sft["image"], "history": [], "facts": scene_facts(scene)}
    if rng.random() < existence_fraction:
      name, present = _existence_query(scene, rng, world)
      yes, no = shapes.existence_answers(name)
      question = shapes.existence_question(name)
      record.update(
        question=question, chosen=yes if present else no, rejected=no if present else yes
      )
    else:
      question = sft["conversations"][0]["value"].replace(f"{IMAGE_PLACEHOLDER}\n", "")
      chosen, rejected = shapes.caption_pair(
        sft, rng, omission_fraction=omission_fraction, binding_fraction=binding_fraction
      )
      record.update(question=question, chosen=chosen, rejected=rejected)
    out.append(record)
  return out


def ppo_prompts(
  n: int,
  world: shapes.ShapesWorldConfig,
  seed: int | Sequence[int],
  *,
  yes_no_fraction: float = 0.5,
) -> list[dict[str, Any]]:
  """RL prompts on shapes scenes, in the `preference_sources.read_ppo_prompts` record format.

  "Describe the image." (caption_type 1) or, for a fraction `yes_no_fraction`, "Is there a
  {colour} {shape} in the image?" with caption_type 7 (yes) or 6 (no) from the ground truth.
  Images are rendered PIL images; facts are `scene_facts`; "scene" is the scene itself (its
  dict), for a reward that reads the ground truth (PPO's `reward_source=scene`).
  """
  out = []
  for i, scene in enumerate(shapes.make_scenes(n, world, seed=seed)):
    rng = np.random.default_rng([*_seed_list(seed), i, 2])
    question, caption_type = "Describe the image.", GENERAL
    if rng.random() < yes_no_fraction:
      name, present = _existence_query(scene, rng, world)
      question = shapes.existence_question(name)
      caption_type = YES_IN_YESNO if present else NO_IN_YESNO
    out.append({
        "id": scene.id, "image": shapes.render(scene, world.image_size), "image_file": None,
        "question": question, "caption_type": caption_type, "length_bonus": 1.0,
        "facts": scene_facts(scene), "facts_key": None, "scene": scene.to_dict(),
    })  # fmt: skip
  return out


# ------------------------------------------------------------------------------------------
# The registered sources.
# ------------------------------------------------------------------------------------------


@registry.register("conversations", "shapes")
def read_conversations(
  data: ml_collections.ConfigDict, *, encoding: registry.ConversationEncoding
) -> tuple[list[Example], collections.Counter]:
  """data.shapes.num_train SFT records of the world, encoded."""
  records = shapes.make_sft_records(
    data.shapes.num_train, world_config(data), seed=data.shapes.seed
  )
  examples = []
  for record in records:
    encoded = conversation.encode_conversation(
      record["conversations"], encoding.tokenizer, encoding.template, encoding.num_image_tokens,
      encoding.image_token_id, record_id=record["id"],
    )  # fmt: skip
    examples.append(Example(record["id"], encoded.input_ids, encoded.labels, record.get("image")))
  return examples, collections.Counter()


@registry.register("pairs", "shapes_pairs")
def read_pairs(
  data: ml_collections.ConfigDict, **_options: Any
) -> tuple[list[dict[str, Any]], collections.Counter]:
  """data.shapes.pair_set: "reward" (captions and yes/no questions with facts, the reward
  model's ground truth) or "captions" (caption pairs only, the DPO runs' ground truth)."""
  s, world = data.shapes, world_config(data)
  pair_set = s.get("pair_set", "reward")
  if pair_set == "reward":
    records = reward_records(
      s.num_train, world, seed=s.seed, omission_fraction=s.omission_fraction,
      binding_fraction=s.binding_fraction,
    )  # fmt: skip
  elif pair_set == "captions":
    records = preference_records(
      s.num_train, world, seed=s.seed, omission_fraction=s.omission_fraction,
      binding_fraction=s.binding_fraction,
    )  # fmt: skip
  else:
    raise ValueError(f"data.shapes.pair_set={pair_set!r}: use 'reward' or 'captions'")
  return records, collections.Counter()


@registry.register("prompts", "shapes_prompts")
def read_prompts(
  data: ml_collections.ConfigDict, *, yes_no_fraction: float = 0.5, **_options: Any
) -> tuple[list[dict[str, Any]], collections.Counter]:
  """data.shapes.num_train RL prompts (`ppo_prompts`)."""
  return ppo_prompts(
    data.shapes.num_train, world_config(data), seed=data.shapes.seed,
    yes_no_fraction=yes_no_fraction,
  ), collections.Counter()  # fmt: skip


@registry.register_tokenizer_corpus("shapes")
def tokenizer_corpus(data: ml_collections.ConfigDict) -> tuple[list[str], int]:
  """(texts, vocabulary size) for the world's own BPE tokenizer: the template's system prompt,
  then data.shapes.tokenizer_records rendered conversations and their facts (seed
  [data.shapes.seed, 7], apart from the training records' stream); data.shapes.vocab_size."""
  template = conversation.get_template(data.template)
  records = shapes.make_sft_records(
    data.shapes.tokenizer_records, world_config(data), seed=[data.shapes.seed, 7]
  )
  texts = [template.system]
  for record in records:
    texts.append(conversation.render_conversation(record["conversations"], template))
    texts.append(record["metadata"]["facts"])
  return texts, data.shapes.vocab_size
