"""The CLIP ViT vision tower, as transformers' `CLIPVisionModel` computes it.

Input pixels are NHWC float32 [B, H, W, 3] (our preprocessing's layout). The tower returns
every hidden state the way HF's `hidden_states` tuple holds them: index 0 is the pre-layernorm
output that enters the encoder, index i the output of encoder layer i.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmm_align.models.config import RuntimeConfig, VisionConfig
from lmm_align.models.layers import (
  bidirectional_attention,
  dense_general,
  dtype_of,
  layer_norm,
  partitioned,
  stack_layers,
)

Array = jax.Array


def quick_gelu(x: Array) -> Array:
  return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS = {
  "quick_gelu": quick_gelu,
  "gelu": lambda x: nn.gelu(x, approximate=False),
  "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
}


class EncoderLayer(nn.Module):
  """Pre-LN transformer block. Called as (hidden, _) -> (hidden, hidden) so a scan stacks outputs."""

  config: VisionConfig
  runtime: RuntimeConfig

  @nn.compact
  def __call__(self, hidden: Array, _):
    c = self.config
    dtype, param_dtype = dtype_of(self.runtime.dtype), dtype_of(self.runtime.param_dtype)
    head_dim = c.hidden_size // c.num_heads
    x = layer_norm(c.layer_norm_eps, dtype, param_dtype, "layer_norm1")(hidden)
    proj = lambda name: dense_general(
      (c.num_heads, head_dim),
      -1,
      ("embed", "heads", "kv"),
      dtype,
      param_dtype,
      True,
      name,
      lora=self.runtime.lora,
    )(x)
    attn = bidirectional_attention(proj("q_proj"), proj("k_proj"), proj("v_proj"), head_dim**-0.5)
    attn = dense_general(
      c.hidden_size,
      (-2, -1),
      ("heads", "kv", "embed"),
      dtype,
      param_dtype,
      True,
      "out_proj",
      lora=self.runtime.lora,
    )(attn)
    hidden = hidden + attn
    x = layer_norm(c.layer_norm_eps, dtype, param_dtype, "layer_norm2")(hidden)
    x = dense_general(
      c.intermediate_size,
      -1,
      ("embed", "mlp"),
      dtype,
      param_dtype,
      True,
      "fc1",
      lora=self.runtime.lora,
    )(x)
    x = _ACTIVATIONS[c.hidden_act](x)
    hidden = hidden + dense_general(
      c.hidden_size, -1, ("mlp", "embed"), dtype, param_dtype, True, "fc2", lora=self.runtime.lora
    )(x)
    return hidden, hidden


def patch_embeddings(pixel_values: Array, c: VisionConfig, r: RuntimeConfig, use_bias: bool):
  """pixel_values float32[B, H, W, 3] -> [B, P, D]: the patch convolution ("patch_embedding",
  created in the calling tower's scope), row-major over the patch grid as HF flattens it."""
  dtype, param_dtype = dtype_of(r.dtype), dtype_of(r.param_dtype)
  if pixel_values.shape[1:] != (c.image_size, c.image_size, c.num_channels):
    raise ValueError(
      f"pixel_values has shape {pixel_values.shape}; the vision tower expects "
      f"[B, {c.image_size}, {c.image_size}, {c.num_channels}] (NHWC)"
    )
  bias = {"bias_init": partitioned(nn.initializers.zeros, ("embed",))} if use_bias else {}
  patches = nn.Conv(
    c.hidden_size,
    kernel_size=(c.patch_size, c.patch_size),
    strides=(c.patch_size, c.patch_size),
    padding="VALID",
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=param_dtype,
    kernel_init=partitioned(nn.initializers.normal(0.02), (None, None, None, "embed")),
    name="patch_embedding",
    **bias,
  )(pixel_values.astype(dtype))
  return patches.reshape(patches.shape[0], -1, c.hidden_size)


def encoder_hidden_states(
  embeddings: Array, c: VisionConfig, r: RuntimeConfig
) -> tuple[Array, list[Array]]:
  """(last hidden state, every layer's output) of the encoder stack on `embeddings` [B, T, D]:
  one scanned "layers" module, or "layers_0", "layers_1", ... (created in the caller's scope)."""
  block = stack_layers(
      EncoderLayer, scan=r.scan_layers, remat=r.remat_policy, num_layers=c.num_layers,
      in_axes=(nn.broadcast,), static_argnums=(),
  )  # fmt: skip
  if r.scan_layers:
    last, stacked = block(c, r, name="layers")(embeddings, None)
    return last, [stacked[i] for i in range(c.num_layers)]
  per_layer, hidden = [], embeddings
  for i in range(c.num_layers):
    hidden, _ = block(c, r, name=f"layers_{i}")(hidden, None)
    per_layer.append(hidden)
  return hidden, per_layer


class ClipVisionTower(nn.Module):
  config: VisionConfig
  runtime: RuntimeConfig

  @nn.compact
  def __call__(self, pixel_values: Array) -> tuple[Array, ...]:
    """pixel_values float32[B, H, W, 3] -> hidden states, a tuple of L + 1 arrays [B, P + 1, D]."""
    c, r = self.config, self.runtime
    dtype, param_dtype = dtype_of(r.dtype), dtype_of(r.param_dtype)
    patches = patch_embeddings(pixel_values, c, r, use_bias=False)
    b = patches.shape[0]
    class_embedding = self.param(
      "class_embedding",
      partitioned(nn.initializers.normal(0.02), ("embed",)),
      (c.hidden_size,),
      param_dtype,
    )
    cls = jnp.broadcast_to(class_embedding.astype(dtype), (b, 1, c.hidden_size))
    position_embedding = self.param(
      "position_embedding",
      partitioned(nn.initializers.normal(0.02), (None, "embed")),
      (c.num_patches + 1, c.hidden_size),
      param_dtype,
    )
    hidden = jnp.concatenate([cls, patches], axis=1) + position_embedding.astype(dtype)[None]
    embeddings = layer_norm(c.layer_norm_eps, dtype, param_dtype, "pre_layrnorm")(hidden)

    last, per_layer = encoder_hidden_states(embeddings, c, r)
    # Unused by LLaVA (it reads an intermediate layer) but part of the checkpoint, so it is
    # created to keep import/export exact; XLA drops the computation.
    layer_norm(c.layer_norm_eps, dtype, param_dtype, "post_layernorm")(last[:, 0])
    return (embeddings, *per_layer)
