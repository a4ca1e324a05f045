"""A model's greedy answers to questions about images: what every model-based evaluation asks
(`lmm-align eval`'s benchmarks, a registered evaluation kind, the experiments)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lmm_align import sampling
from lmm_align.data import conversation
from lmm_align.data.images import ImageProcessorConfig, preprocess_image
from lmm_align.models.llava import Llava


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
  """Greedy answers (text, token count) to one question per image, `batch_size` rows per
  sampler call on the KV-cached sampler."""
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
