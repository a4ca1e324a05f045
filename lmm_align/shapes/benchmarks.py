"""Evaluation sets on shapes-world scenes: POPE yes/no probes and MMHal-Bench-style questions.

Both take scenes (e.g. `make_scenes(n, config, seed)` with a seed the training data does not
use) and return records in the benchmark's own format, with the rendered image and exact
answers, so the project's POPE and MMHal evaluators run on them unchanged and
`shapes_metrics` can score free-form answers without a judge.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from lmm_align.shapes.world import (
  ALL_POSITIONS,
  COLOURS,
  RELATION_PHRASES,
  SHAPES,
  Scene,
  colour_free_reference,
  count_phrase,
  existence_question,
  object_phrase,
  partner_shape,
  position_phrase,
  relations,
  render,
  scene_caption,
)

# MMHal-Bench's 8 question types, in its cyclic order (question i has type i % 8).
MMHAL_QUESTION_TYPES = (
  "attribute",
  "adversarial",
  "comparison",
  "counting",
  "relation",
  "environment",
  "holistic",
  "other",
)
POPE_STRATEGIES = ("random", "popular", "adversarial")


def _cap(text: str) -> str:
  return text[0].upper() + text[1:]


def _vocab_order(pair: tuple[str, str]) -> tuple[int, int]:
  return list(SHAPES).index(pair[1]), list(COLOURS).index(pair[0])


def _vocabulary(scenes: Sequence[Scene]) -> list[tuple[str, str]]:
  """Every (colour, shape) over the colours and shapes seen in `scenes`, in vocabulary order."""
  colours = {o.colour for s in scenes for o in s.objects}
  shapes = {o.shape for s in scenes for o in s.objects}
  return sorted(itertools.product(colours, shapes), key=_vocab_order)


def make_pope_probes(
  scenes: Sequence[Scene], strategy: str, seed: int = 0, *, per_scene: int = 3, image_size: int = 64
) -> list[dict[str, Any]]:
  """POPE yes/no probes "Is there a {colour shape} in the image?", balanced per scene.

  An object is a (colour, shape) pair, so a probe tests the object and its colour at once, and
  the candidate set is every pair over the colours and shapes seen in `scenes` (POPE's 80 COCO
  classes). Per scene, k = min(per_scene, #objects) present pairs are asked (label "yes") and k
  absent ones (label "no"), interleaved. The absent pairs are, as in POPE:
    random:      uniform over the absent pairs;
    popular:     the absent pairs most frequent across `scenes`;
    adversarial: the absent pairs that co-occur most with the present ones, i.e. the largest
                 sum over present pairs p of #scenes holding both p and the candidate.
  Ties go to the more frequent pair, then to vocabulary order (shape, then colour).

  Returns records {question_id (from 1), image_id, image, text, label, category, object}.
  """
  if strategy not in POPE_STRATEGIES:
    raise ValueError(f"unknown POPE strategy {strategy!r}; known: {POPE_STRATEGIES}")
  universe = _vocabulary(scenes)
  frequency = collections.Counter(p for s in scenes for p in s.pairs)
  cooccurrence = collections.Counter(
    pq for s in scenes for pq in itertools.permutations(sorted(s.pairs), 2)
  )
  rng = np.random.default_rng(seed)
  probes: list[dict[str, Any]] = []
  for scene in scenes:
    present = sorted(scene.pairs, key=_vocab_order)
    absent = [p for p in universe if p not in scene.pairs]
    k = min(per_scene, len(present), len(absent))
    positives = [present[i] for i in rng.permutation(len(present))[:k]]
    if strategy == "random":
      negatives = [absent[i] for i in rng.permutation(len(absent))[:k]]
    elif strategy == "popular":
      negatives = sorted(absent, key=lambda p: -frequency[p])[:k]
    else:
      score = {p: sum(cooccurrence[q, p] for q in present) for p in absent}
      negatives = sorted(absent, key=lambda p: (-score[p], -frequency[p]))[:k]
    image = render(scene, image_size)
    for pair, label in itertools.chain.from_iterable(
      zip(((p, "yes") for p in positives), ((p, "no") for p in negatives))
    ):
      name = f"{pair[0]} {pair[1]}"
      probes.append(
        {
          "question_id": len(probes) + 1,
          "image_id": scene.id,
          "image": image,
          "text": existence_question(name),
          "label": label,
          "category": strategy,
          "object": name,
        }
      )
  return probes


def _mmhal_question(
  qtype: str, scene: Scene, rng: np.random.Generator, vocabulary: Sequence[tuple[str, str]]
) -> tuple[str, str]:
  """(question, ground-truth answer) of one MMHal type; one-object scenes fall back as noted."""
  objects = [scene.objects[i] for i in rng.permutation(len(scene.objects))]
  a = objects[0]
  b = objects[1] if len(objects) > 1 else None
  if qtype == "attribute":
    ref = colour_free_reference(a, scene)
    return f"What color is {ref}?", f"{_cap(ref)} is {a.colour}."
  if qtype == "adversarial":  # asks about an absent shape, preferably the partner of a present one
    absent = sorted({s for _, s in vocabulary if not scene.count(shape=s)}, key=SHAPES.index)
    partners = [s for s in absent if any(partner_shape(o.shape) == s for o in objects)]
    if absent:
      pool = partners or absent
      shape = pool[rng.integers(len(pool))]
      return f"What color is the {shape} in the image?", f"There is no {shape} in the image."
    pairs = [f"{c} {s}" for c, s in vocabulary if (c, s) not in scene.pairs]
    name = pairs[rng.integers(len(pairs))]
    return f"Is the {name} small or large?", f"There is no {name} in the image."
  if qtype == "comparison":
    if b is None:  # nothing to compare with: ask for the size itself
      return f"Is the {a.name} small or large?", f"The {a.name} is {a.size}."
    question = f"Which is larger, the {a.name} or the {b.name}?"
    if a.size == b.size:
      return question, f"The {a.name} and the {b.name} are the same size; both are {a.size}."
    big, small = (a, b) if a.size == "large" else (b, a)
    return question, f"The {big.name} is larger than the {small.name}."
  if qtype == "counting":
    n = len(objects)
    return (
      "How many objects are there in the image?",
      f"There {'is' if n == 1 else 'are'} {count_phrase(n, 'object', 'objects')} in the image.",
    )
  if qtype == "relation":
    if b is None:
      return (
        f"Where is the {a.name} in the image?",
        f"The {a.name} is {position_phrase(a.position)} of the image.",
      )
    rel = relations(a, b)
    vertical = [RELATION_PHRASES[r] for r in rel if r in ("above", "below")]
    horizontal = [RELATION_PHRASES[r] for r in rel if r in ("left", "right")]
    return (
      f"Where is the {a.name} relative to the {b.name}?",
      f"The {a.name} is {' and '.join(vertical + horizontal)} the {b.name}.",
    )
  if qtype == "environment":
    return "What color is the background of the image?", f"The background is {scene.background}."
  if qtype == "holistic":
    return "Describe the image in detail.", scene_caption(scene, rng, template=0)
  if qtype == "other":  # what is at a grid position: occupied or empty, equally often
    occupied = {o.position: o for o in objects}
    empty = [p for p in ALL_POSITIONS if p not in occupied]
    position = a.position if not empty or rng.random() < 0.5 else empty[rng.integers(len(empty))]
    question = f"What is {position_phrase(position)} of the image?"
    if position in occupied:
      return (
        question,
        f"There is {object_phrase(occupied[position])} {position_phrase(position)} of the image.",
      )
    return question, f"Nothing: the {position} of the image is empty."
  raise ValueError(f"unknown MMHal question type {qtype!r}")


def make_mmhal_questions(
  scenes: Sequence[Scene], seed: int = 0, *, image_size: int = 64
) -> list[dict[str, Any]]:
  """One MMHal-style question per scene; question i has type MMHAL_QUESTION_TYPES[i % 8].

  Records follow MMHal-Bench's response template (question_type, question_topic, image_id,
  image_content, question, gt_answer, model_answer) plus the rendered `image` and the `scene`.
  Types map to shapes as: attribute = an object's colour; adversarial = the colour of an absent
  shape (the partner of a present one where possible), answered "There is no ..."; comparison =
  which of two objects is larger; counting = how many objects; relation = where one object is
  relative to another; environment = the background colour; holistic = a detailed description;
  other = what is at a grid position, which may be empty. With one object, comparison asks for
  its size and relation for its position. Absent shapes come from those seen in `scenes`.
  """
  vocabulary = _vocabulary(scenes)
  rng = np.random.default_rng(seed)
  out = []
  for i, scene in enumerate(scenes):
    qtype = MMHAL_QUESTION_TYPES[i % len(MMHAL_QUESTION_TYPES)]
    question, gt_answer = _mmhal_question(qtype, scene, rng, vocabulary)
    out.append(
      {
        "question_type": qtype,
        "question_topic": "shapes",
        "image_id": scene.id,
        "image": render(scene, image_size),
        "image_content": [o.name for o in scene.objects],
        "question": question,
        "gt_answer": gt_answer,
        "model_answer": "",
        "scene": scene.to_dict(),
      }
    )
  return out
