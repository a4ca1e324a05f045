"""Scoring a (query, response) batch with a reward model, shared by PPO's rollouts, best-of-N
and reward filtering: the policy's query encoding and the reward model's sequence score.
Rows are left-padded queries followed by right-padded responses (see `trainers.ppo`)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from lmm_align.data import conversation
from lmm_align.data.pipeline import image_inputs
from lmm_align.models.heads import ScalarHead, sequence_scores
from lmm_align.models.llava import Llava


def hidden_or_logits(model: Llava, variables: dict, batch: dict, with_logits: bool):
  """The model on a batch of input_ids / attention_mask (pixel_values when present; an anyres
  batch's tiles [B, tiles, H, W, 3] with its `pack_plan.*` fields, `pipeline.image_inputs`):
  logits and final hidden states, or the hidden states alone (`with_logits=False`, the heads'
  input)."""
  return model.apply(
    variables,
    batch["input_ids"],
    attention_mask=batch["attention_mask"],
    with_logits=with_logits,
    **image_inputs(batch),
  )


def query_ids(
  question: str,
  has_image: bool,
  record_id: str,
  tokenizer: Any,
  template,
  model_config,
  num_image_tokens: int | None = None,
) -> np.ndarray:
  """The question's tokens ending with the assistant's turn, "<image>\n" first when the record
  has an image and the question no placeholder: what the policy is prompted with. The image is
  `num_image_tokens` placeholders (an anyres image: the count its tiles pack into), by default
  the model's single-image count."""
  return conversation.encode_generation_prompt(
    question, tokenizer, template, num_image_tokens or model_config.num_image_tokens,
    model_config.image_token_id, with_image=has_image and conversation.IMAGE_PLACEHOLDER not in
    question, record_id=record_id,
  ).input_ids  # fmt: skip


def reward_scores(
  model: Llava, head: ScalarHead, backbone: Any, head_params: Any, batch: dict
) -> jax.Array:
  """The reward model's score of each (query, response, evaluation prompt) row: [B]."""
  out = hidden_or_logits(model, {"params": backbone}, batch, False)
  per_position = head.apply({"params": head_params}, out.hidden_states)
  return sequence_scores(per_position, batch["attention_mask"])
