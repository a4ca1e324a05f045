"""The model a config asks for, and its first params for each restore source."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections

from lmm_align import hf
from lmm_align.models.config import ModelConfig, RuntimeConfig, get_variant
from lmm_align.models.llava import Llava
from lmm_align.trainers import state as state_lib


def runtime_for(config: ml_collections.ConfigDict) -> RuntimeConfig:
  m = config.model
  return RuntimeConfig(
    dtype=m.dtype, param_dtype=m.param_dtype, scan_layers=m.scan_layers, remat_policy=m.remat_policy
  )


def model_config_for(config: ml_collections.ConfigDict, tokenizer: Any) -> ModelConfig:
  """config.init_from's config.json when set, else the variant; vocab and image token from
  the tokenizer when `model.vocab_from_tokenizer` (a model trained from scratch)."""
  runtime = runtime_for(config)
  if config.init_from:
    from lmm_align.models.config import from_hf_config

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


def initial_params(
  model: Llava, config: ml_collections.ConfigDict, source: str, where: Any, shardings: Any
) -> Any:
  """Params to build the state around: an HF folder's for 'init_from', random otherwise (a
  workdir / resume restore overwrites them, but they fix the state's structure)."""
  if source == "init_from":
    _, params = hf.load_pretrained(where, runtime=model.config.runtime, shardings=shardings)
    return params
  return state_lib.init_params_sharded(model, jax.random.key(config.seed), shardings)


def check_data_fingerprint(saved: dict, current: dict, source: str) -> None:
  """A checkpoint continued on different data would silently change the run: refuse it."""
  mismatched = {k: (saved.get(k), v) for k, v in current.items() if k in saved and saved[k] != v}
  if mismatched and source == "workdir":
    raise ValueError(
      f"the workdir's checkpoint was made on different data (saved, now): {mismatched}; "
      "use a new workdir, or config.resume=<old workdir> to start from its weights on new data"
    )
