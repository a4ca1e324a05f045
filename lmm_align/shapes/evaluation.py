"""Ground-truth evaluation on held-out shapes-world scenes, registered as evaluation kind
"shapes" (`lmm_align.evals.registry`): what every shapes pipeline reports.

Free-form descriptions -> CHAIR-like metrics against the exact scene (hallucination rate,
object recall, ...); POPE-style probes (random / popular / adversarial negatives) -> the
published POPE scorer. Generation is greedy, batched, on the KV-cached sampler.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from lmm_align.data.images import ImageProcessorConfig
from lmm_align.evals import registry
from lmm_align.evals.answers import answer_questions
from lmm_align.evals.pope import pope_metrics
from lmm_align.inference import LoadedModel
from lmm_align.models.llava import Llava
from lmm_align.shapes import benchmarks as shapes_benchmarks
from lmm_align.shapes import data as shapes_data
from lmm_align.shapes import metrics as shapes_metrics
from lmm_align.shapes import world as shapes

DESCRIBE_QUESTION = "Describe the image."
SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."
POPE_STRATEGIES = ("random", "popular", "adversarial")
MAIN_METRICS = ("hallucination_rate", "chair_i", "object_recall", "attribute_error_rate",
                "pope_f1")  # fmt: skip


def evaluate_shapes(
  model: Llava,
  params: Any,
  tokenizer: Any,
  image_config: ImageProcessorConfig,
  world: shapes.ShapesWorldConfig,
  *,
  num_scenes: int,
  seed: int,
  template: str,
  batch_size: int,
  max_new_tokens: int,
  pope_per_split: int,
) -> dict[str, Any]:
  """Metrics of one model on `num_scenes` held-out scenes (a seed the training data never uses).
  Beside the rates, what tells a cleaner answer from a shorter one: the share of answers that
  mention any object (`mention_rate`) and the hallucination rate among those (`chair_s_refine`,
  RLAIF-V's response-level rate); an answer naming no object counts as free of hallucination
  in `hallucination_rate`, so hallucination_rate = chair_s_refine x mention_rate."""
  scenes = shapes.make_scenes(num_scenes, world, seed=seed)
  images = [shapes.render(s, world.image_size) for s in scenes]
  kwargs = dict(template=template, batch_size=batch_size, max_new_tokens=max_new_tokens)
  texts, lengths = answer_questions(
    model, params, tokenizer, image_config, [DESCRIBE_QUESTION] * len(scenes), images, **kwargs
  )
  halluc = shapes_metrics.hallucination_metrics(texts, scenes)
  result: dict[str, Any] = {
    "hallucination_rate": halluc["hallucination_rate"],
    "chair_i": halluc["chair_i"],
    "object_recall": halluc["object_recall"],
    "attribute_error_rate": halluc["attribute_error_rate"],
    "binding_error_rate": halluc["binding_error_rate"],
    "object_chair_i": halluc["object_chair_i"],
    "chair_s_refine": halluc["chair_s_refine"],
    "mention_rate": halluc["responses_with_mentions"] / max(1, halluc["responses"]),
    "mean_answer_tokens": float(np.mean(lengths)),
    "mean_answer_words": halluc["mean_answer_words"],
  }
  f1s = []
  for strategy in POPE_STRATEGIES:
    probes = shapes_benchmarks.make_pope_probes(scenes, strategy=strategy, seed=seed)[
      :pope_per_split
    ]
    by_id = {s.id: im for s, im in zip(scenes, images)}
    answers, _ = answer_questions(
        model, params, tokenizer, image_config,
        [p["text"] + SHORT_ANSWER_SUFFIX for p in probes], [by_id[p["image_id"]] for p in probes],
        **{**kwargs, "max_new_tokens": 4},
    )  # fmt: skip
    metrics = pope_metrics(answers, [p["label"] for p in probes])
    result[f"pope_{strategy}_f1"] = metrics["f1"]
    result[f"pope_{strategy}_accuracy"] = metrics["accuracy"]
    f1s.append(metrics["f1"])
  result["pope_f1"] = float(np.mean(f1s))
  result["examples"] = [{"scene": s.id, "answer": t} for s, t in zip(scenes[:4], texts[:4])]
  return result


def report_examples(config: ml_collections.ConfigDict, examples: list[dict]) -> list[dict]:
  """`evaluate_shapes`'s examples with their scenes rendered, for `lmm-align eval shapes`."""
  world = shapes_data.world_config(config.data)
  scenes = shapes.make_scenes(config.eval.num_scenes, world, seed=config.data.shapes.eval_seed)
  by_id = {s.id: s for s in scenes}
  return [
    {"image": shapes.render(by_id[x["scene"]], world.image_size), "scene": x["scene"],
     "answer": x["answer"]} for x in examples
  ]  # fmt: skip


@registry.register(
  "shapes",
  default_config="configs/shapes/sft.py",
  main_metrics=MAIN_METRICS,
  limit_field="eval.num_scenes",
  seed_field="data.shapes.eval_seed",
  report_examples=report_examples,
)
def evaluate_model(config: ml_collections.ConfigDict, loaded: LoadedModel) -> dict[str, Any]:
  """`evaluate_shapes` with the run's world (config.data.shapes), on config.eval.num_scenes
  scenes of seed data.shapes.eval_seed, config.eval's generation settings."""
  e = config.eval
  return evaluate_shapes(
      loaded.model, loaded.params, loaded.tokenizer, loaded.image_config,
      shapes_data.world_config(config.data), num_scenes=e.num_scenes,
      seed=config.data.shapes.eval_seed, template=loaded.template, batch_size=e.batch_size,
      max_new_tokens=e.max_new_tokens, pope_per_split=e.pope_per_split,
  )  # fmt: skip
