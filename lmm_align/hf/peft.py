"""LoRA adapters as a PEFT adapter folder's tensors and adapter_config.json, named through the
same declarative name map as the checkpoint export, so `peft.PeftModel.from_pretrained` loads
them onto the exported base."""

from __future__ import annotations

from typing import Any

import flax
import numpy as np

from lmm_align.hf import name_map
from lmm_align.models.config import LoraConfig, ModelConfig


def peft_tensors(lora_params: Any, config: ModelConfig) -> dict[str, np.ndarray]:
  """The adapters as PEFT's safetensors keys: `base_model.model.<HF module>.lora_A.weight`
  [r, in] and `.lora_B.weight` [out, r] (PyTorch Linear layout), named through the same
  declarative name map as the checkpoint export."""
  scan = config.runtime.scan_layers
  text_only = config.vision is None
  hf_module = {}  # (our kernel path, stacked-layer index or None) -> HF module name
  for rule in name_map.rules_for(config):
    if rule.transform not in ("linear", "linear_2"):
      continue
    layers = range(name_map.num_layers(config, rule)) if rule.layered else [None]
    for layer in layers:
      path, index = name_map.our_path(rule.ours, layer, scan)
      hf_key = rule.hf.replace("{i}", str(layer)) if layer is not None else rule.hf
      hf_module[(path[:-1], index)] = name_map.export_key(hf_key, text_only).removesuffix(".weight")

  out = {}
  flat = flax.traverse_util.flatten_dict(lora_params)
  for module in sorted({p[:-1] for p in flat}):
    a, b = (
      np.asarray(flat[(*module, "a")], np.float32),
      np.asarray(flat[(*module, "b")], np.float32),
    )
    stacked = scan and "layers" in module
    for index in range(a.shape[0]) if stacked else [None]:
      a1, b1 = (a[index], b[index]) if stacked else (a, b)
      name = hf_module.get((module, index))
      if name is None:
        raise KeyError(f"adapter {'/'.join(module)} has no HF module in the name map")
      rank = a1.shape[-1]
      out[f"base_model.model.{name}.lora_A.weight"] = np.ascontiguousarray(a1.reshape(-1, rank).T)
      out[f"base_model.model.{name}.lora_B.weight"] = np.ascontiguousarray(b1.reshape(rank, -1).T)
  return out


def peft_adapter_config(
  config: ModelConfig, lora: LoraConfig, base_model_path: str = ""
) -> dict[str, Any]:
  """adapter_config.json for PEFT: target modules as the regex PEFT matches on HF names."""
  return {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "base_model_name_or_path": base_model_path,
    "r": lora.rank,
    "lora_alpha": lora.alpha,
    "lora_dropout": lora.dropout,
    "bias": "none",
    "fan_in_fan_out": False,
    "inference_mode": True,
    "target_modules": None,  # filled by the exporter with the exact module names it wrote
  }
