"""A model's greedy answers to questions about images: what every model-based evaluation asks
(`lmm-align eval`'s benchmarks, a registered evaluation kind, the experiments)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lmm_align import sampling
from lmm_align.data import conversation
from lmm_align.data.anyres import AnyresImageConfig, preprocess_anyres_batch
from lmm_align.data.images import ImageProcessorConfig, preprocess_image
from lmm_align.models.llava import Llava


def answer_questions(
  model: Llava,
  params: Any,
  tokenizer: Any,
  image_config: ImageProcessorConfig | AnyresImageConfig,
  questions: Sequence[str],
  images: Sequence[Any],
  *,
  template: str,
  batch_size: int,
  max_new_tokens: int,
) -> tuple[list[str], list[int]]:
  """Greedy answers (text, token count) to one question per image, `batch_size` rows per
  sampler call on the KV-cached sampler. With an `AnyresImageConfig` (LLaVA-NeXT / OneVision)
  each image is tiled, its placeholders counted by its packed size, and every call carries the
  processor's largest tile count (one compiled shape) and the images' sizes."""
  config = model.config
  tmpl = conversation.get_template(template)
  # The template's answer end (eos for vicuna, <|im_end|> for ChatML) and eos.
  stop = conversation.answer_stop_ids(tokenizer, tmpl)
  settings = sampling.SamplingSettings(
    temperature=0.0, max_new_tokens=max_new_tokens, stop_token_ids=stop
  )
  texts, lengths = [], []
  for start in range(0, len(questions), batch_size):
    chunk_q = questions[start : start + batch_size]
    chunk_i = images[start : start + batch_size]
    # A short last batch is padded with copies so the sampler keeps one compiled shape.
    pad = batch_size - len(chunk_q)
    chunk_q = list(chunk_q) + [chunk_q[-1]] * pad
    chunk_i = list(chunk_i) + [chunk_i[-1]] * pad
    sizes = None
    if isinstance(image_config, AnyresImageConfig):
      tiled = preprocess_anyres_batch(chunk_i, image_config, (image_config.max_tiles_per_image(),))
      pixels, sizes = tiled.pixel_values, tiled.image_sizes
      image_tokens = [config.image_tokens(tuple(size)) for size in sizes]
    else:
      pixels = np.stack([preprocess_image(im, image_config) for im in chunk_i])
      image_tokens = [config.num_image_tokens] * len(chunk_q)
    prompts = [
      conversation.encode_generation_prompt(q, tokenizer, tmpl, n, config.image_token_id).input_ids
      for q, n in zip(chunk_q, image_tokens, strict=True)
    ]
    out = sampling.generate(
      model, params, prompts, pixels, settings=settings, rng=None, pad_id=tokenizer.pad_token_id,
      image_sizes=sizes,
    )  # fmt: skip
    for tokens in out.token_lists(strip_stop=True)[: batch_size - pad]:
      texts.append(tokenizer.decode(tokens, skip_special_tokens=True).strip())
      lengths.append(len(tokens))
  return texts, lengths
