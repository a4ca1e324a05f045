"""`lmm-align export --workdir DIR --out HF_DIR`: a run's latest checkpoint as an HF folder.

The folder holds config.json, safetensors, the tokenizer and (for LLaVA) a processor, so that
`LlavaForConditionalGeneration.from_pretrained` and `AutoProcessor.from_pretrained` load it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections

from lmm_align import checkpoint, hf, sharding
from lmm_align.data import sources
from lmm_align.models.llava import Llava
from lmm_align.trainers import modelling
from lmm_align.trainers import state as state_lib


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir} a training workdir?")
  return ml_collections.ConfigDict(json.loads(open(path).read()))


def hf_processor(tokenizer: Any, model: Llava, image_config) -> Any:
  """A transformers LlavaProcessor equal to our preprocessing (None for text-only models)."""
  if model.config.vision is None or image_config is None:
    return None
  from transformers import CLIPImageProcessor, LlavaProcessor

  image_processor = CLIPImageProcessor(**image_config.to_hf_dict())
  return LlavaProcessor(
    image_processor=image_processor,
    tokenizer=tokenizer,
    patch_size=model.config.vision.patch_size,
    vision_feature_select_strategy=model.config.vision_feature_select_strategy,
    image_token="<image>",
    num_additional_image_tokens=1,
  )


def restore_params(
  config: ml_collections.ConfigDict, workdir: str, model: Llava
) -> tuple[Any, int]:
  """The latest checkpoint's params, on one device (export reads them to host anyway)."""
  checkpointer = checkpoint.Checkpointer.for_workdir(workdir, async_save=False)
  step = checkpointer.latest_step()
  if step is None:
    raise FileNotFoundError(f"{workdir} has no committed checkpoint to export")
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  rules = tuple(tuple(r) for r in config.mesh.rules)
  with sharding.activation_sharding(mesh, rules):
    shards = state_lib.param_shardings(model, mesh, rules)
    params = state_lib.init_params_sharded(model, jax.random.key(0), shards)
    tx = state_lib.make_optimizer(config, params)
    state, state_shards = state_lib.create_train_state(
      params, shards, tx, tuple(config.trainable), 0, mesh, config.optim.state_dtype
    )
    state, _ = checkpointer.restore(step, checkpoint.abstract_like(state, state_shards))
  checkpointer.close()
  return state.params, step


def export_workdir(workdir: str, out: str, peft: bool = False) -> str:
  config = load_workdir_config(workdir)
  if peft:
    raise ValueError("--peft needs a LoRA run; this run trained full params (config.lora is off)")
  tokenizer = sources.tokenizer_for(config, workdir)
  model = Llava(modelling.model_config_for(config, tokenizer))
  params, step = restore_params(config, workdir, model)
  processor = hf_processor(tokenizer, model, sources.image_config_for(config, model.config))
  hf.save_pretrained(
    model, params, out, tokenizer=None if processor else tokenizer, processor=processor
  )
  print(f"[export] step {step} of {workdir} -> {out}")
  return out
