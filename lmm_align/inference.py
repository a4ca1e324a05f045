"""A local HF model folder loaded for inference: weights, tokenizer, the image preprocessing
saved beside them and the conversation template to prompt it with (evaluation, judges, the
iterative loop's policy, labeler and critic)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from lmm_align.data.anyres import AnyresImageConfig, image_config_for_model
from lmm_align.data.images import ImageProcessorConfig

DEFAULT_CONV_TEMPLATE = "vicuna_v1"  # LLaVA-1.5's evaluation conversation


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  model: Any  # lmm_align.models.llava.Llava
  params: Any  # on the default local device
  tokenizer: Any
  # None for a text-only model (a judge); the tiling processor for LLaVA-NeXT / OneVision
  image_config: ImageProcessorConfig | AnyresImageConfig | None
  template: str  # conversation template name
  model_id: str


def image_config_from_folder(folder: str, aspect_mode: str | None = None) -> ImageProcessorConfig:
  """The preprocessing saved with a model folder (preprocessor_config.json, or a
  processor_config.json nesting it); `aspect_mode` ('crop' or 'pad') replaces the saved one."""
  for name in ("preprocessor_config.json", "processor_config.json"):
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      continue
    try:
      with open(path) as f:
        config = ImageProcessorConfig.from_hf_dict(json.load(f))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not JSON ({e.msg}, line {e.lineno})") from None
    except (ValueError, TypeError) as e:
      raise ValueError(f"{path}: {e}") from None
    return config if aspect_mode is None else dataclasses.replace(config, aspect_mode=aspect_mode)
  raise FileNotFoundError(
    f"{folder} has no preprocessor_config.json: the image preprocessing is not known "
    "(export the model with `lmm-align export`, which writes it)"
  )


def load_model_folder(
  path: str,
  *,
  template: str = DEFAULT_CONV_TEMPLATE,
  dtype: str = "float32",
  aspect_mode: str | None = None,
  model_id: str | None = None,
) -> LoadedModel:
  """A local LLaVA (1.5, NeXT, OneVision) or text model folder: weights, tokenizer, processor
  (a NeXT / OneVision folder's tiling processor, checked against the model's tiles)."""
  from lmm_align import hf
  from lmm_align.data import conversation
  from lmm_align.data.tokenizer import load_tokenizer

  conversation.get_template(template)  # an unknown name fails before the weights load
  tokenizer = load_tokenizer(path)
  model, params = hf.load_pretrained(path, dtype=dtype)
  image_config = None
  if model.config.anyres:
    saved = os.path.join(path, "preprocessor_config.json")
    hf_dict = None
    if os.path.isfile(saved):
      with open(saved) as f:
        hf_dict = json.load(f)
    image_config = image_config_for_model(model.config, hf_dict, saved if hf_dict else path)
  elif model.config.has_vision:
    image_config = image_config_from_folder(path, aspect_mode)
    side = model.config.vision.image_size
    if image_config.crop_size != (side, side):
      raise ValueError(
        f"{path}: the processor crops {image_config.crop_size}, the vision tower takes {side}"
      )
  name = model_id or os.path.basename(os.path.normpath(path))
  return LoadedModel(model, params, tokenizer, image_config, template, name)
