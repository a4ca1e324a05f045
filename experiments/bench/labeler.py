"""Labeler throughput: one forward pass per question vs sampling the answer token, CPU.

  python experiments/bench/labeler.py

RLAIF-V's labeler needs only the next-token distribution after the prompt. Published code
gets it by generating one token; `lmm_align.feedback.labeler.YesNoLabeler` runs one forward
pass and reads p_yes / p_no at the last prompt position. Both sides here answer the same
questions with the same model, batch size and length buckets:

* questions: shapes-world captions (`shapes.scene_caption`) split into claims and turned
  into yes/no questions by the rule-based splitter and question maker, each asked about its
  scene's image with LLaVA's short-answer suffix, as the RLAIF-V chain asks them;
* model: the "shapes" variant (about 1M params) with the shapes-world tokenizer and random
  weights (throughput does not depend on training);
* labeler: `YesNoLabeler.score` (p_yes from " Yes", p_no from " No", the single-token
  spellings the shapes tokenizer has);
* sampler: `sampling.generate` greedy with max_new_tokens=1 on the same prompts, sorted and
  batched the same way, then the decoded token read by POPE's yes/no rule.

Each timed pass covers the whole host path on both sides (encoding the prompts, preprocessing
the images, the device calls, reading the answers). After one warm-up pass each
(compilation), the passes alternate between the two, so that load from other processes on a
shared CPU hits both alike, and the median of 5 per side is reported. The last line is
`labeler_speedup_vs_sampler: X.XXx` (claims per second, labeler over sampler).
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lmm_align import sampling  # noqa: E402
from lmm_align.data import conversation  # noqa: E402
from lmm_align.data.images import ImageProcessorConfig, preprocess_image  # noqa: E402
from lmm_align.data.tokenizer import train_bpe_tokenizer  # noqa: E402
from lmm_align.feedback import claims, labeler  # noqa: E402
from lmm_align.models import get_variant, init_params  # noqa: E402
from lmm_align.shapes import metrics as shapes_metrics  # noqa: E402
from lmm_align.shapes import world as shapes  # noqa: E402

TEMPLATE, BATCH, SCENES, RUNS = "vicuna_v1", 16, 48, 5
SUFFIX = "\n" + shapes.SHORT_ANSWER_PROMPT


def shapes_tokenizer(world: shapes.ShapesWorldConfig):
  """A BPE trained on shapes-world conversations, as the shapes configs train theirs."""
  template = conversation.get_template(TEMPLATE)
  records = shapes.make_sft_records(2000, world, seed=[0, 7])
  texts = [template.system] + [
    conversation.render_conversation(r["conversations"], template) for r in records
  ]
  return train_bpe_tokenizer(texts, 600)


def shapes_questions(world: shapes.ShapesWorldConfig):
  """(questions, images): the rule-made questions of one caption per scene."""
  questions, images = [], []
  for i, scene in enumerate(shapes.make_scenes(SCENES, world, seed=123)):
    image = shapes.render(scene, world.image_size)
    caption = shapes.scene_caption(scene, np.random.default_rng(i))
    for question in claims.RuleQuestionMaker().questions([claims.split_claims_rules(caption)])[0]:
      questions.append(question)
      images.append(image)
  return questions, images


def median_seconds(*fns) -> list[float]:
  """Median wall time of each function over RUNS alternating passes, after one warm-up each."""
  for fn in fns:
    fn()  # warm-up: compilation
  times = [[] for _ in fns]
  for _ in range(RUNS):
    for fn, out in zip(fns, times):
      start = time.perf_counter()
      fn()
      out.append(time.perf_counter() - start)
  return [statistics.median(t) for t in times]


def main():
  world = shapes.ShapesWorldConfig(image_size=48)
  tokenizer = shapes_tokenizer(world)
  config = get_variant("shapes")
  config = config.replace(text=config.text.__class__(**{**config.text.__dict__, "vocab_size": len(tokenizer)}))  # fmt: skip
  params = init_params(config, jax.random.key(0))
  image_config = ImageProcessorConfig(size=48, crop_size=48)
  questions, images = shapes_questions(world)

  lab = labeler.YesNoLabeler(
      config, params, tokenizer, image_config, template=TEMPLATE, batch_size=BATCH,
      answer_tokens=labeler.answer_token_ids(tokenizer, ("Yes",), ("No",)), question_suffix=SUFFIX,
  )  # fmt: skip

  settings = sampling.SamplingSettings(temperature=0.0, max_new_tokens=1, stop_token_ids=())

  def by_labeler():
    return lab.score(questions, images).rejected

  def by_sampler():
    # The very prompts the labeler builds, in the labeler's batch order.
    prompts = [lab.encode(q, True) for q in questions]
    order = np.argsort([len(p) for p in prompts], kind="stable")
    pixels = {id(im): preprocess_image(im, image_config) for im in images}
    answers = []
    for start in range(0, len(order), BATCH):
      rows = list(order[start : start + BATCH])
      rows += [rows[-1]] * (BATCH - len(rows))  # one compiled shape, as the labeler does
      out = sampling.generate(
          config, params, [prompts[i] for i in rows], np.stack([pixels[id(images[i])] for i in rows]),
          settings=settings, rng=None, pad_id=tokenizer.pad_token_id,
      )  # fmt: skip
      answers += [tokenizer.decode(t, skip_special_tokens=True) for t in out.token_lists()]
    return [shapes_metrics.parse_yes_no(a) == "no" for a in answers[: len(order)]]

  labeler_s, sampler_s = median_seconds(by_labeler, by_sampler)
  n = len(questions)
  prompts = [lab.encode(q, True) for q in questions]
  print(
    f"model: shapes variant, {sum(x.size for x in jax.tree_util.tree_leaves(params)) / 1e6:.2f}M "
    f"params, vocab {len(tokenizer)}; {n} questions from {SCENES} scenes, batch {BATCH}, prompt "
    f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens with {config.num_image_tokens} "
    f"image tokens; jax on {jax.devices()[0].platform}"
  )
  print(f"one forward pass (YesNoLabeler): {n / labeler_s:8.1f} claims/s ({labeler_s:.3f} s)")
  print(f"sampler, max_new_tokens=1:       {n / sampler_s:8.1f} claims/s ({sampler_s:.3f} s)")
  print(f"labeler_speedup_vs_sampler: {sampler_s / labeler_s:.2f}x")


if __name__ == "__main__":
  main()
