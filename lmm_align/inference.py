"""A local HF model folder loaded for inference: weights, tokenizer, the image preprocessing
saved beside them and the conversation template to prompt it with (evaluation, judges, the
iterative loop's policy, labeler and critic).

A model too large for one device (RLAIF-V's LLaVA-NeXT-34B labeler, a 72B LLaVA-Critic) is
loaded onto a mesh: each param's sharding comes from the model's logical axis names and the
rules (`lmm_align.sharding`), as the trainers shard theirs, and `hf.load_pretrained` puts each
tensor straight onto its shards, so no device ever holds the whole model. The mesh may span
several hosts: every process reads the folder and places the shards of its own devices.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import Mesh

from lmm_align import sharding
from lmm_align.data.anyres import AnyresImageConfig, image_config_for_model
from lmm_align.data.images import ImageProcessorConfig

DEFAULT_CONV_TEMPLATE = "vicuna_v1"  # LLaVA-1.5's evaluation conversation


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  model: Any  # lmm_align.models.llava.Llava
  params: Any  # on the default local device, or sharded over `mesh`
  tokenizer: Any
  # None for a text-only model (a judge); the tiling processor for LLaVA-NeXT / OneVision
  image_config: ImageProcessorConfig | AnyresImageConfig | None
  template: str  # conversation template name
  model_id: str
  # The mesh the params are sharded over and the logical rules that placed them (None: one
  # device); the sampler, the labeler and the judge run model-sharded on it.
  mesh: Mesh | None = None
  rules: tuple[tuple[str, Any], ...] = sharding.DEFAULT_RULES


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


def param_shardings(model: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
  """NamedShardings of a Llava's params on `mesh`: its logical axis names through `rules`
  (abstract init: no weight is created). A logical name without a rule is an error."""
  from lmm_align.models.llava import dummy_inputs

  boxed = jax.eval_shape(model.init, jax.random.key(0), *dummy_inputs(model.config))["params"]
  return sharding.logical_shardings(boxed, mesh, rules)


def load_model_folder(
  path: str,
  *,
  template: str = DEFAULT_CONV_TEMPLATE,
  dtype: str = "float32",
  aspect_mode: str | None = None,
  model_id: str | None = None,
  mesh: Mesh | None = None,
  rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES,
) -> LoadedModel:
  """A local LLaVA (1.5, NeXT, OneVision) or text model folder: weights, tokenizer, processor
  (a NeXT / OneVision folder's tiling processor, checked against the model's tiles).

  dtype: the params' and the computation's dtype ("float32", "bfloat16", "float16").
  mesh: None loads every param onto the default device; with a mesh each param is sharded by
    `rules` over its fsdp / tensor axes (replicated over data) and placed shard by shard.
  """
  from lmm_align import hf
  from lmm_align.data import conversation
  from lmm_align.data.tokenizer import load_tokenizer

  conversation.get_template(template)  # an unknown name fails before the weights load
  tokenizer = load_tokenizer(path)
  rules = tuple(tuple(rule) for rule in rules)
  shardings = None
  if mesh is not None:
    shardings = param_shardings(hf.pretrained_model(path, dtype), mesh, rules)
  model, params = hf.load_pretrained(path, dtype=dtype, shardings=shardings)
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
  return LoadedModel(model, params, tokenizer, image_config, template, name, mesh, rules)
