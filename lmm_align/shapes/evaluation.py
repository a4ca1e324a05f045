"""Ground-truth evaluation on held-out shapes-world scenes: every pipeline reports these.

Free-form descriptions -> CHAIR-like metrics against the exact scene (hallucination rate,
object recall, ...); POPE-style probes (random / popular / adversarial negatives) -> the
published POPE scorer. Generation is greedy, batched, on the KV-cached sampler.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from lmm_align import sampling, sharding
from lmm_align.data import conversation
from lmm_align.data.images import ImageProcessorConfig, preprocess_image
from lmm_align.evals.pope import pope_metrics
from lmm_align.models.llava import Llava
from lmm_align.shapes import benchmarks as shapes_benchmarks
from lmm_align.shapes import metrics as shapes_metrics
from lmm_align.shapes import world as shapes

DESCRIBE_QUESTION = "Describe the image."
SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."
POPE_STRATEGIES = ("random", "popular", "adversarial")


def answer_questions(
  model: Llava,
  params: Any,
  tokenizer: Any,
  image_config: ImageProcessorConfig,
  questions: Sequence[str],
  images: Sequence[Any],
  *,
  template: str,
  batch_size: int,
  max_new_tokens: int,
) -> tuple[list[str], list[int]]:
  """Greedy answers (text, token count) to one question per image."""
  config = model.config
  tmpl = conversation.get_template(template)
  settings = sampling.SamplingSettings(
    temperature=0.0, max_new_tokens=max_new_tokens, stop_token_ids=(tokenizer.eos_token_id,)
  )
  texts, lengths = [], []
  for start in range(0, len(questions), batch_size):
    chunk_q = questions[start : start + batch_size]
    chunk_i = images[start : start + batch_size]
    prompts = [
      conversation.encode_generation_prompt(
        q, tokenizer, tmpl, config.num_image_tokens, config.image_token_id
      ).input_ids
      for q in chunk_q
    ]
    # A short last batch is padded with copies so the sampler keeps one compiled shape.
    pad = batch_size - len(prompts)
    prompts += [prompts[-1]] * pad
    pixels = np.stack(
      [preprocess_image(im, image_config) for im in list(chunk_i) + [chunk_i[-1]] * pad]
    )
    out = sampling.generate(
      model, params, prompts, pixels, settings=settings, rng=None, pad_id=tokenizer.pad_token_id
    )
    for tokens in out.token_lists(strip_stop=True)[: len(chunk_q)]:
      texts.append(tokenizer.decode(tokens, skip_special_tokens=True).strip())
      lengths.append(len(tokens))
  return texts, lengths


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
  """Metrics of one model on `num_scenes` held-out scenes (a seed the training data never uses)."""
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


def evaluate_workdir_model(
  config: ml_collections.ConfigDict, workdir: str, params: Any
) -> dict[str, Any]:
  """The shapes evaluation of a trainer's final params, with the run's tokenizer and model."""
  from lmm_align import run_config
  from lmm_align.data import sources

  tokenizer = sources.tokenizer_for(config, workdir)
  model = Llava(run_config.model_config_for(config, tokenizer).with_runtime(lora=None))
  if jax.process_count() > 1:
    # Params sharded across hosts cannot be read by one host: gather full copies (every host
    # then runs the small evaluation on its own device; process 0 writes the summary).
    from jax.experimental import multihost_utils

    params = multihost_utils.process_allgather(params, tiled=True)
  else:
    params = jax.device_get(params)  # off the training mesh, onto the evaluation device
  e = config.eval
  # Evaluate on this process's first device, outside the training mesh: the sampler's
  # outputs must be readable by this host.
  local = sharding.make_mesh((1, 1, 1), jax.local_devices()[:1])
  with sharding.activation_sharding(local, tuple(tuple(r) for r in config.mesh.rules)):
    return _evaluate_shapes_config(config, model, params, tokenizer, e)


def _evaluate_shapes_config(config, model, params, tokenizer, e) -> dict[str, Any]:
  from lmm_align.data import sources
  from lmm_align.shapes import data as shapes_data

  return evaluate_shapes(
      model, params, tokenizer, sources.image_config_for(config, model.config), shapes_data.world_config(config.data),
      num_scenes=e.num_scenes, seed=config.data.shapes.eval_seed, template=config.data.template,
      batch_size=e.batch_size, max_new_tokens=e.max_new_tokens, pope_per_split=e.pope_per_split,
  )  # fmt: skip
