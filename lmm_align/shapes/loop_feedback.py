"""The shapes world in the iterative loop (`trainers.iterative`, `feedback.registry`): new
scenes each round as its prompts (prompts.source "shapes"), and feedback read off each scene:

  ground_truth  score = -(hallucinated mentions) + feedback.recall_weight * (recalled
                objects); with weight 0 RLAIF-V's precision-only score, which shortens answers
  correction    RLHF-V's fine-grained corrections with the scene as the annotator: the
                ground_truth score, and each hallucinating answer's minimal correction
                (`metrics.corrected_response`), paired as (corrected, original)

Every round's pairs also get their scene's facts (a fact-augmented reward model reads them)
and are checked against the scene (`ground_truth_agreement`, a diagnostic only).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from lmm_align.data import jsonl
from lmm_align.feedback import registry
from lmm_align.feedback.candidates import pair_prompt_id
from lmm_align.shapes import data, metrics
from lmm_align.shapes import world as shapes

PROMPTS_SOURCE = "shapes"


def read_scenes(prompts_dir: pathlib.Path) -> dict[str, shapes.Scene]:
  """The scene of each prompt id in a round's prompts_dir/prompts.jsonl (records without one,
  from another source, are left out)."""
  records = jsonl.read_jsonl(prompts_dir / "prompts.jsonl", tolerate_cut_tail=True)
  return {r["id"]: shapes.Scene.from_dict(r["scene"]) for r in records if "scene" in r}


def ground_truth_agreement(
  pairs: Sequence[dict[str, Any]], scenes: dict[str, shapes.Scene]
) -> dict[str, int]:
  """How many pairs the scene agrees with: the chosen response has fewer hallucinated mentions
  (correct), more (wrong), or as many (tie)."""
  out = {"correct": 0, "wrong": 0, "tie": 0}
  for p in pairs:
    scene = scenes[pair_prompt_id(p)]
    counts = [
      metrics.response_hallucination_counts(p[k], scene)["hallucinated_mentions"]
      for k in ("chosen", "rejected")
    ]
    out["correct" if counts[0] < counts[1] else "wrong" if counts[0] > counts[1] else "tie"] += 1
  return out


def annotate_pairs(pairs: list[dict[str, Any]], prompts_dir: pathlib.Path) -> dict | None:
  """Adds each pair's scene facts ("facts") and returns `ground_truth_agreement` (None when
  the round's prompts carry no scene)."""
  scenes = read_scenes(prompts_dir)
  if not scenes:
    return None
  for pair in pairs:
    pair["facts"] = data.scene_facts(scenes[pair_prompt_id(pair)])
  return ground_truth_agreement(pairs, scenes)


@registry.register_prompts(PROMPTS_SOURCE, annotate_pairs=annotate_pairs)
def write_round_prompts(
  config: ml_collections.ConfigDict, round_index: int, out: pathlib.Path
) -> list[dict[str, Any]]:
  """prompts.num_per_round scenes drawn with seed [prompts.seed, round], so every round sees
  new ones, rendered to out/images/<id>.png; each record asks prompts.question and carries its
  "scene"."""
  world = data.world_config(config.data)
  scenes = shapes.make_scenes(
    config.prompts.num_per_round, world, seed=[config.prompts.seed, round_index]
  )
  (out / "images").mkdir(parents=True, exist_ok=True)
  records = []
  for scene in scenes:
    relative = f"images/{scene.id}.png"
    shapes.render(scene, world.image_size).save(out / relative)
    record = {"id": scene.id, "question": config.prompts.question, "image": relative}
    records.append({**record, "scene": scene.to_dict()})
  return records


def ground_truth_feedback(
  candidates: Sequence[dict[str, Any]],
  scenes: dict[str, shapes.Scene],
  recall_weight: float,
  corrections: bool = False,
) -> list[dict[str, Any]]:
  """score = -(hallucinated mentions) + recall_weight * (scene objects recalled).

  With recall_weight 0 this is RLAIF-V's score (rejected claims only), and a response that
  mentions no object has no claims and is never paired, as in RLAIF-V (else "say nothing"
  would always win); a precision-only score still favours the shorter of two answers, which
  collapses recall over rounds. With a positive weight the oracle also values what an answer
  finds, and an answer that mentions nothing scores 0 like any other. With `corrections` each
  record also has "hallucinated" (its hallucinated mentions) and "correction": the answer
  minimally corrected, or None (nothing to correct, or out of the rewrite's reach).
  """
  out = []
  for c in candidates:
    scene = scenes[c["prompt_id"]]
    counts = metrics.response_hallucination_counts(c["response"], scene)
    mentions = counts["mentions"]
    scored = mentions > 0 or recall_weight > 0
    score = metrics.ground_truth_score(counts, recall_weight)
    out.append({
      "id": c["id"], "prompt_id": c["prompt_id"], "question": c["question"],
      "image": c["image"], "response": c["response"], "num_claims": mentions,
      "num_judged": mentions, "score": score if scored else None,
      "status": "ok" if scored else "no_claims",
    })  # fmt: skip
    if corrections:
      out[-1]["hallucinated"] = counts["hallucinated_mentions"]
      out[-1]["correction"] = metrics.corrected_response(c["response"], scene)
  return out


def _scene_feedback(corrections: bool) -> registry.LabelFn:
  def label(
    config: ml_collections.ConfigDict,
    policy: Callable[[], Any],
    candidates: Sequence[dict[str, Any]],
    prompts_dir: pathlib.Path,
    out_path: pathlib.Path,
  ) -> None:
    del policy  # the scene is the labeler
    records = ground_truth_feedback(
      candidates, read_scenes(prompts_dir), config.feedback.recall_weight, corrections
    )
    out_path.write_text("".join(json.dumps(r) + "\n" for r in records))

  return label


registry.register_kind("ground_truth", pair_method="rlaifv", prompt_sources=(PROMPTS_SOURCE,))(
  _scene_feedback(corrections=False)
)
registry.register_kind("correction", pair_method="correction", prompt_sources=(PROMPTS_SOURCE,))(
  _scene_feedback(corrections=True)
)
