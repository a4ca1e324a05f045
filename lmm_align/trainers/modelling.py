"""The model a config asks for, and its first params for each restore source."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from lmm_align import hf
from lmm_align.models.llava import Llava
from lmm_align.trainers import state as state_lib


def initial_params(
  model: Llava, config: ml_collections.ConfigDict, source: str, where: Any, shardings: Any
) -> Any:
  """The base params: init_from's HF weights whenever it is set (a LoRA run restores only its
  adapters, so its base always comes from there), else random from the seed with the parts
  `model.vision_init` (a vision tower folder) and `model.text_init` (a language model folder)
  name read from them. For a full fine-tune a workdir / resume restore then overwrites them."""
  if config.init_from and (source == "init_from" or model.config.runtime.lora is not None):
    _, params = hf.load_pretrained(
      config.init_from, runtime=model.config.runtime, shardings=shardings
    )
    return params
  params = state_lib.init_params_sharded(model, jax.random.key(config.seed), shardings)
  if config.init_from:
    return params
  # LLaVA's stage 1: a pretrained tower and a pretrained LLM, a new projector between them.
  part = lambda name: None if shardings is None else shardings[name]
  if config.model.get("vision_init"):
    tower = hf.load_vision_tower(config.model.vision_init, model.config, part("vision_tower"))
    params = {**params, "vision_tower": tower}
  if config.model.get("text_init"):
    text = hf.load_language_model(config.model.text_init, model.config, part("language_model"))
    params = {**params, "language_model": text}
  return params


def with_lora_split(
  model: Llava, initial: Any, initial_shards: Any, mesh: Any, rules: Any, key: jax.Array
) -> tuple[Any, Any, Any, Any]:
  """(trained params, their shardings, frozen base or None, its shardings).

  With LoRA the state trains fresh adapters (from `key`) and `initial` becomes the frozen base
  outside it; without, the state trains `initial` itself and there is no base.
  """
  if model.config.runtime.lora is None:
    return initial, initial_shards, None, None
  shards = state_lib.param_shardings(model, mesh, rules, "lora")
  adapters = state_lib.init_params_sharded(model, key, shards, "lora")
  return adapters, shards, initial, initial_shards


def check_data_fingerprint(saved: dict, current: dict, source: str) -> None:
  """A checkpoint continued on different data would silently change the run: refuse it."""
  mismatched = {k: (saved.get(k), v) for k, v in current.items() if k in saved and saved[k] != v}
  if mismatched and source == "workdir":
    raise ValueError(
      f"the workdir's checkpoint was made on different data (saved, now): {mismatched}; "
      "use a new workdir, or config.resume=<old workdir> to start from its weights on new data"
    )
