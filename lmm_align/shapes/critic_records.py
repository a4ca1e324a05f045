"""Critic instruction data from the shapes world's ground truth, in llava-critic-113k's layout:
"<image>\\n" + a critic prompt of `lmm_align.feedback.critic`, answered by a reason naming each
hallucinated object and the verdict line the critic parsers read.

  pairwise   the truthful caption against a hallucinated one (or, with `tie_fraction`, two
             truthful captions: a tie), in a random order; the reason names the errors.
  pointwise  one caption (truthful or hallucinated), scored by its share of correct object
             claims on the scale given.

Records are {"id", "image" (PIL), "conversations", "metadata"} and can be written with
`llava_json.save_llava_dataset` and trained on as SFT data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from lmm_align.feedback.critic import (
  IMAGE_PLACEHOLDER,
  PAIRWISE_VERDICT_LINES,
  final_score_line,
  pairwise_prompt,
  pointwise_prompt,
  score_scale,
)
from lmm_align.shapes import metrics as shapes_metrics
from lmm_align.shapes import world as shapes


def hallucinated_mentions(text: str, scene: shapes.Scene) -> list[tuple[str | None, str]]:
  """The (colour, shape) mentions in `text` that no object of `scene` matches, by the rule of
  `shapes_metrics.response_hallucination_counts` (its `hallucinated_mentions` is their count)."""
  wrong = []
  for colour, shape in shapes_metrics.parse_mentions(text):
    if not any(o.shape == shape and colour in (None, o.colour) for o in scene.objects):
      wrong.append((colour, shape))
  return wrong


def _mention_name(colour: str | None, shape: str) -> str:
  return f"{colour} {shape}" if colour else shape


def _error_sentence(colour: str | None, shape: str, scene: shapes.Scene) -> str:
  name = _mention_name(colour, shape)
  present = sorted({o.colour for o in scene.objects if o.shape == shape})
  if present:
    colours = " and ".join(present)
    return f"there is no {name} in the image (its {shape} is {colours})"
  return f"there is no {name} in the image"


def _describe_errors(label: str, text: str, scene: shapes.Scene) -> str:
  wrong = hallucinated_mentions(text, scene)
  if not wrong:
    return f"Every object that {label} mentions is in the image."
  named = ", ".join(shapes.with_article(_mention_name(c, s)) for c, s in wrong)
  errors = "; ".join(_error_sentence(c, s, scene) for c, s in wrong)
  return f"{label[0].upper()}{label[1:]} mentions {named}, but {errors}."


def claim_accuracy(text: str, scene: shapes.Scene) -> tuple[int, int]:
  """(correct object claims, all object claims) of `text` about `scene`."""
  counts = shapes_metrics.response_hallucination_counts(text, scene)
  return counts["mentions"] - counts["hallucinated_mentions"], counts["mentions"]


def _caption_world(world: shapes.ShapesWorldConfig) -> shapes.ShapesWorldConfig:
  # Caption records with an injected hallucination: the gpt turn is a hallucinated caption
  # and metadata["facts"] the truthful one in the same wording.
  return dataclasses.replace(world, task_mix=(("caption", 1.0),), hallucination_rate=1.0)


def _question(record: dict[str, Any]) -> str:
  return record["conversations"][0]["value"].replace(IMAGE_PLACEHOLDER, "").strip()


def _pairwise_item(record, scene, rng, tie_fraction) -> tuple[list[str], str, str]:
  """(responses [first, second], winner, reason) for one scene."""
  truthful, hallucinated = record["metadata"]["facts"], record["conversations"][1]["value"]
  if rng.random() < tie_fraction:
    kinds = rng.permutation(shapes.CAPTION_TEMPLATES)[:2]
    pair = [shapes.scene_caption(scene, rng, template=int(k)) for k in kinds]
    reason = "Both responses describe only objects that are in the image, with the right colours."
    return pair, "tie", reason
  truthful_first = bool(rng.random() < 0.5)
  pair = [truthful, hallucinated] if truthful_first else [hallucinated, truthful]
  winner = "first" if truthful_first else "second"
  loser = "second" if truthful_first else "first"
  reason = " ".join([
    _describe_errors(f"the {loser} response", hallucinated, scene),
    _describe_errors(f"the {winner} response", truthful, scene),
    f"The {winner} response is more accurate.",
  ])  # fmt: skip
  return pair, winner, reason


def _pointwise_item(record, scene, rng, scale) -> tuple[str, float, str]:
  """(response, score, reason): the truthful or the hallucinated caption, scored by the share
  of its object claims that are right."""
  use_truthful = bool(rng.random() < 0.5)
  response = record["metadata"]["facts"] if use_truthful else record["conversations"][1]["value"]
  correct, claims = claim_accuracy(response, scene)
  low, high = score_scale(scale)
  score = float(round(low + (high - low) * (correct / claims if claims else 0.0)))
  summary = f"The response makes {claims} claims about objects, and {correct} of them are right."
  reason = f"{summary} {_describe_errors('the response', response, scene)}"
  return response, score, reason


def _critic_record(record_id, image, prompt, answer, metadata) -> dict[str, Any]:
  return {
    "id": record_id,
    "image": image,
    "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}],
    "metadata": metadata,
  }


def make_critic_record(
  index: int,
  world: shapes.ShapesWorldConfig,
  *,
  kind: str,
  seed: int | Sequence[int] = 0,
  scale: str | tuple[float, float] = "0-100",
  tie_fraction: float = 0.0,
) -> dict[str, Any]:
  """Record `index` of the shapes critic data: {"id", "image" (PIL), "conversations",
  "metadata"}. The human turn is "<image>\\n" + our critic prompt; the gpt turn is a reason
  naming each hallucinated object, then the verdict line. kind: "pairwise" (the truthful vs a
  hallucinated caption, or with `tie_fraction` two truthful captions: a tie) or "pointwise"
  (one caption, scored by its share of correct object claims on `scale`).
  A pure function of (index, world, kind, seed, ...), like `shapes.make_sft_record`; record i
  shows the scene of SFT record i of the same seed, so use a seed the SFT and eval data do not.
  """
  seeds = list(seed) if isinstance(seed, Sequence) else [seed]
  record = shapes.make_sft_record(index, _caption_world(world), seed)
  scene = shapes.Scene.from_dict(record["metadata"]["scene"])
  rng = np.random.default_rng([*seeds, index, 1])  # apart from the record's own stream
  question = _question(record)
  base = {"kind": kind, "scene": record["metadata"]["scene"], "question": question}
  if kind == "pairwise":
    (first, second), winner, reason = _pairwise_item(record, scene, rng, tie_fraction)
    prompt = pairwise_prompt(question, first, second)
    answer = f"{reason}\n{PAIRWISE_VERDICT_LINES[winner]}"
    metadata = {**base, "responses": [first, second], "winner": winner}
  elif kind == "pointwise":
    response, score, reason = _pointwise_item(record, scene, rng, scale)
    prompt = pointwise_prompt(question, response, scale=scale)
    answer = f"{reason}\n{final_score_line(score)}"
    metadata = {**base, "responses": [response], "score": score, "scale": list(score_scale(scale))}
  else:
    raise ValueError(f"kind {kind!r}: use 'pairwise' or 'pointwise'")
  return _critic_record(f"{record['id']}-critic-{kind}", record["image"], prompt, answer, metadata)


def make_critic_records(
  n: int,
  world: shapes.ShapesWorldConfig,
  *,
  seed: int | Sequence[int] = 0,
  pairwise_fraction: float = 0.5,
  scale: str | tuple[float, float] = "0-100",
  tie_fraction: float = 0.0,
) -> list[dict[str, Any]]:
  """Records 0..n-1, the first round(n * pairwise_fraction) pairwise and the rest pointwise
  (llava-critic-113k mixes both kinds; SFT shuffles)."""
  if not 0.0 <= pairwise_fraction <= 1.0 or not 0.0 <= tie_fraction <= 1.0:
    raise ValueError(f"fractions must be in [0, 1], got {pairwise_fraction}, {tie_fraction}")
  num_pairwise = round(n * pairwise_fraction)
  return [
    make_critic_record(
      i,
      world,
      kind="pairwise" if i < num_pairwise else "pointwise",
      seed=seed,
      scale=scale,
      tie_fraction=tie_fraction,
    )  # fmt: skip
    for i in range(n)
  ]
