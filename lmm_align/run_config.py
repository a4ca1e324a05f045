"""What a run's config names, readable below the trainers: the model it builds (from
init_from's config.json or a variant, with the run's LoRA and runtime knobs) and the config a
workdir keeps (config.json). Evaluation, export and the trainers read them the same way."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_collections

from lmm_align import hf
from lmm_align.models.config import LoraConfig, ModelConfig, RuntimeConfig
from lmm_align.models.hf_config import from_hf_config
from lmm_align.models.variants import get_variant


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a training workdir was run with (its config.json)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir} a training workdir?")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def lora_for(config: ml_collections.ConfigDict) -> LoraConfig | None:
  """config.lora as a LoraConfig, or None when rank is 0 (full fine-tuning)."""
  lora = config.get("lora")
  if lora is None or lora.rank == 0:
    return None
  return LoraConfig(
    rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, targets=tuple(lora.targets)
  )


def runtime_for(config: ml_collections.ConfigDict) -> RuntimeConfig:
  m = config.model
  return RuntimeConfig(
    dtype=m.dtype,
    param_dtype=m.param_dtype,
    scan_layers=m.scan_layers,
    remat_policy=m.remat_policy,
    lora=lora_for(config),
  )


def model_config_for(config: ml_collections.ConfigDict, tokenizer: Any) -> ModelConfig:
  """config.init_from's config.json when set, else the variant; vocab and image token from
  the tokenizer when `model.vocab_from_tokenizer` (a model trained from scratch)."""
  runtime = runtime_for(config)
  if config.init_from:
    return from_hf_config(hf.read_config(config.init_from), runtime)
  model = get_variant(config.model.variant).replace(runtime=runtime)
  if config.model.image_size and model.vision is not None:
    model = model.replace(
      vision=dataclasses.replace(model.vision, image_size=config.model.image_size)
    )
  if config.model.vocab_from_tokenizer:
    if tokenizer is None:
      raise ValueError("model.vocab_from_tokenizer needs a tokenizer")
    text = dataclasses.replace(
      model.text,
      vocab_size=len(tokenizer),
      pad_token_id=tokenizer.pad_token_id,
      bos_token_id=tokenizer.bos_token_id,
      eos_token_id=tokenizer.eos_token_id,
    )
    model = model.replace(text=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
  return model
