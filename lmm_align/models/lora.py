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

from lmm_align.models.config import LoraConfig


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


def model_variables(trained: Any, base_params: Any) -> dict[str, Any]:
  """{"params": ...} for a full fine-tune; {"params": base, "lora": adapters} for LoRA."""
  if base_params is None:
    return {"params": trained}
  return {"params": base_params, "lora": trained}
