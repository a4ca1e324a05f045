"""`lmm-align export --workdir DIR --out HF_DIR`: a run's latest checkpoint as an HF folder.

The folder holds config.json, safetensors, the tokenizer and (for LLaVA) a processor, so that
`LlavaForConditionalGeneration.from_pretrained` and `AutoProcessor.from_pretrained` load it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from safetensors.numpy import save_file

from lmm_align import checkpoint, hf, run_config, sharding
from lmm_align.data import sources
from lmm_align.hf.peft import peft_adapter_config, peft_tensors
from lmm_align.models.llava import Llava
from lmm_align.models.lora import merge_lora
from lmm_align.trainers import modelling, registry
from lmm_align.trainers import state as state_lib


def hf_processor(tokenizer: Any, model: Llava, image_config) -> Any:
  """A transformers LlavaProcessor equal to our preprocessing (None for text-only models)."""
  if model.config.vision is None or image_config is None:
    return None
  if model.config.anyres:
    # The image processor alone (preprocessor_config.json, the tokenizer beside it): the
    # NeXT / OneVision processors also want a video processor and a chat template.
    return hf_anyres_image_processor(model, image_config)
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


def hf_anyres_image_processor(model: Llava, image_config) -> Any:
  """transformers' LLaVA-NeXT / OneVision image processor equal to our tiling."""
  import transformers

  name = "LlavaNext" if model.config.family == "llava_next" else "LlavaOnevision"
  settings = image_config.to_hf_dict()
  settings.pop("image_processor_type")
  # The pillow backend: it needs no torchvision, and our preprocessing equals it.
  return getattr(transformers, f"{name}ImageProcessorPil")(**settings)


def restore_latest(
  config: ml_collections.ConfigDict, workdir: str, build: Callable[[Any, Any], tuple]
) -> tuple[Any, Any, int]:
  """(train state, what `build` returned beside it, step) of the run's latest checkpoint, on
  one device. `build(mesh, rules)` -> (state, its shardings, extra) rebuilds the state the
  run trained, the template the checkpoint is restored into."""
  checkpointer = checkpoint.Checkpointer.for_workdir(workdir, async_save=False)
  step = checkpointer.latest_step()
  if step is None:
    raise FileNotFoundError(f"{workdir} has no committed checkpoint to export")
  # This process's first device: with several processes (a pod's hosts) each restores the
  # whole state onto its own device (orbax needs every process in a restore), so each can
  # write the folder; in one process this is jax.devices()[0].
  mesh = sharding.make_mesh((1, 1, 1), jax.local_devices()[:1])
  rules = tuple(tuple(r) for r in config.mesh.rules)
  with sharding.activation_sharding(mesh, rules):
    state, state_shards, extra = build(mesh, rules)
    state, _ = checkpointer.restore(step, checkpoint.abstract_like(state, state_shards))
  checkpointer.close()
  return state, extra, step


def restore_params(
  config: ml_collections.ConfigDict, workdir: str, model: Llava
) -> tuple[Any, Any, int]:
  """(trained params, base params or None, step) of the latest checkpoint, on one device.

  For a full fine-tune the trained params are the model's params; for LoRA they are the
  adapters and the base is rebuilt as the run built it (init_from, or the seed).
  """

  def build(mesh, rules):
    shards = state_lib.param_shardings(model, mesh, rules)
    params = modelling.initial_params(
      model, config, "init_from" if config.init_from else "scratch", None, shards
    )
    params, shards, base, _ = modelling.with_lora_split(
      model, params, shards, mesh, rules, jax.random.key(0)
    )
    tx = state_lib.make_optimizer(config, params)
    state, state_shards = state_lib.create_train_state(
      params, shards, tx, tuple(config.trainable), 0, mesh, config.optim.state_dtype
    )
    return state, state_shards, base

  state, base, step = restore_latest(config, workdir, build)
  return state.params, base, step


def export_workdir(workdir: str, out: str, peft: bool = False) -> str:
  """Writes the run's latest checkpoint as an HF folder, as its trainer's registration says:
  the policy (LoRA merged, or with `peft` the base model plus a PEFT adapter:
  adapter_config.json, adapter_model.safetensors) or the trainer's own export."""
  config = run_config.load_workdir_config(workdir)
  trainer = registry.get(config.trainer)
  if trainer.export is not None:
    return trainer.export(workdir, out, peft)
  if trainer.restore_policy is None:
    raise ValueError(
      f"{workdir}: a {config.trainer!r} run has no checkpoint to export (config.trainer)"
    )
  tokenizer = sources.tokenizer_for(config, workdir)
  model = Llava(run_config.model_config_for(config, tokenizer))
  lora = model.config.runtime.lora
  if peft and lora is None:
    raise ValueError(
      "--peft needs a LoRA run; this run trained full params (config.lora.rank is 0)"
    )
  trained, base, step = trainer.restore_policy(config, workdir, model)
  plain = Llava(model.config.with_runtime(lora=None))
  if lora is None:
    params = trained
  elif peft:
    params = base
    _write_peft_adapter(model.config, trained, lora, out, config.init_from)
  else:
    params = merge_lora(base, trained, lora)
  processor = hf_processor(tokenizer, plain, sources.image_config_for(config, model.config))
  hf.save_pretrained(
    plain,
    params,
    out,
    tokenizer=None if processor and not plain.config.anyres else tokenizer,
    processor=processor,
  )
  print(f"[export] step {step} of {workdir} -> {out}" + (" (+ PEFT adapter)" if peft else ""))
  return out


def _write_peft_adapter(model_config, adapters, lora, out: str, base_path: str) -> None:
  tensors = peft_tensors(adapters, model_config)
  adapter_config = peft_adapter_config(model_config, lora, base_path)
  adapter_config["target_modules"] = sorted({k.split(".")[-3] for k in tensors})
  os.makedirs(out, exist_ok=True)
  save_file(tensors, os.path.join(out, "adapter_model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(out, "adapter_config.json"), "w") as f:
    json.dump(adapter_config, f, indent=2)
