"""LoRA adapters: merging into the base params, and the PEFT adapter layout.

The adapters are the "lora" collection of the model's variables: for a dense layer at path
P, `lora[P]["a"]` [(L,) *in, r] and `lora[P]["b"]` [(L,) r, *out], with the leading L when
the layers are scanned. Merged: kernel + (alpha / r) * a . b.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from lmm_align.models.config import LoraConfig, ModelConfig


def _delta(
  a: jax.Array, b: jax.Array, kernel_shape: tuple[int, ...], layered: bool, scale: float
) -> jax.Array:
  if layered:
    return jax.vmap(lambda a1, b1: _delta(a1, b1, kernel_shape[1:], False, scale))(a, b)
  rank = a.shape[-1]
  flat = a.reshape(-1, rank).astype(jnp.float32) @ b.reshape(rank, -1).astype(jnp.float32)
  return (scale * flat).reshape(kernel_shape)


def merge_lora(params: Any, lora_params: Any, lora: LoraConfig) -> Any:
  """Base params with every adapter folded into its kernel (for export or fast inference)."""
  flat = flax.traverse_util.flatten_dict(params)
  adapters = flax.traverse_util.flatten_dict(lora_params)
  modules = {path[:-1] for path in adapters}
  for module in modules:
    kernel_path = (*module, "kernel")
    if kernel_path not in flat:
      raise KeyError(f"adapter for {'/'.join(module)} has no base kernel")
    kernel = flat[kernel_path]
    delta = _delta(
      adapters[(*module, "a")],
      adapters[(*module, "b")],
      kernel.shape,
      "layers" in module,
      lora.scale,
    )
    flat[kernel_path] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
  return flax.traverse_util.unflatten_dict(flat)


def peft_tensors(lora_params: Any, config: ModelConfig) -> dict[str, np.ndarray]:
  """The adapters as PEFT's safetensors keys: `base_model.model.<HF module>.lora_A.weight`
  [r, in] and `.lora_B.weight` [out, r] (PyTorch Linear layout), named through the same
  declarative name map as the checkpoint export."""
  from lmm_align.hf import name_map

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
