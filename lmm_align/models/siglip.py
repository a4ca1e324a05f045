"""The SigLIP vision tower, as transformers' `SiglipVisionModel` computes it.

Against CLIP's tower (clip_vit.py): no class token, a patch conv with a bias, learned position
embeddings for the patches only, no pre-LayerNorm, and an optional attention-pooling ("MAP")
head after the post-LayerNorm. The encoder block is CLIP's (the same pre-LN layer, with
SigLIP's `gelu_pytorch_tanh`), so the two towers share `EncoderLayer` and its HF names.

Input pixels are NHWC float32 [B, H, W, 3]. Like CLIP's, the tower returns every hidden state
the way HF's `hidden_states` tuple holds them: index 0 is the patch + position embeddings that
enter the encoder, index i the output of encoder layer i (before the post-LayerNorm). LLaVA
reads one or more of them (`vision_feature_layer`). The post-LayerNorm output and the pooled
vector (`last_hidden_state` [B, P, D] and `pooler_output` [B, D] in HF) are sown into the
"intermediates" collection: `apply(..., mutable=["intermediates"])` returns them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmm_align.models.clip_vit import encoder_hidden_states, patch_embeddings
from lmm_align.models.config import RuntimeConfig, VisionConfig
from lmm_align.models.layers import (
  bidirectional_attention,
  dense_general,
  dtype_of,
  layer_norm,
  partitioned,
  vision_activation,
)

Array = jax.Array


class AttentionPoolingHead(nn.Module):
  """SigLIP's multihead attention pooling (`SiglipMultiheadAttentionPoolingHead`).

  One learned probe query attends over the P tokens through `torch.nn.MultiheadAttention`'s
  packed projections (q, k, v stacked on one axis), then x + MLP(LayerNorm(x)).
  in_proj_kernel [D, 3, N, H] and in_proj_bias [3, N, H] are HF's in_proj_weight [3D, D] and
  in_proj_bias [3D], with q, k, v in that order.
  """

  config: VisionConfig
  runtime: RuntimeConfig

  @nn.compact
  def __call__(self, hidden: Array) -> Array:
    """hidden [B, P, D] (after the post-LayerNorm) -> pooled [B, D]."""
    c, r = self.config, self.runtime
    dtype, param_dtype = dtype_of(r.dtype), dtype_of(r.param_dtype)
    d, n = c.hidden_size, c.num_heads
    h = d // n
    probe = self.param(
      "probe", partitioned(nn.initializers.normal(0.02), (None, None, "embed")), (1, 1, d),
      param_dtype,
    )  # fmt: skip
    kernel = self.param(
      "in_proj_kernel",
      partitioned(nn.initializers.normal(0.02), ("embed", None, "heads", "kv")),
      (d, 3, n, h),
      param_dtype,
    ).astype(dtype)
    bias = self.param(
      "in_proj_bias", partitioned(nn.initializers.zeros, (None, "heads", "kv")), (3, n, h),
      param_dtype,
    ).astype(dtype)  # fmt: skip
    hidden = hidden.astype(dtype)
    b = hidden.shape[0]
    q = jnp.tensordot(probe.astype(dtype), kernel[:, 0], axes=1) + bias[0]  # [1, 1, N, H]
    q = jnp.broadcast_to(q, (b, 1, n, h))
    k = jnp.tensordot(hidden, kernel[:, 1], axes=1) + bias[1]  # [B, P, N, H]
    v = jnp.tensordot(hidden, kernel[:, 2], axes=1) + bias[2]
    attn = bidirectional_attention(q, k, v, h**-0.5)  # [B, 1, N, H]
    out_proj = dense_general(
      d, (-2, -1), ("heads", "kv", "embed"), dtype, param_dtype, True, "out_proj"
    )
    x = out_proj(attn)  # [B, 1, D]
    y = layer_norm(c.layer_norm_eps, dtype, param_dtype, "layernorm")(x)
    y = dense_general(c.intermediate_size, -1, ("embed", "mlp"), dtype, param_dtype, True, "fc1")(y)
    y = vision_activation(c.hidden_act)(y)
    y = dense_general(d, -1, ("mlp", "embed"), dtype, param_dtype, True, "fc2")(y)
    return (x + y)[:, 0]


class SiglipVisionTower(nn.Module):
  """The tower; called like `ClipVisionTower` (pixels in, the hidden-states tuple out)."""

  config: VisionConfig
  runtime: RuntimeConfig

  @nn.compact
  def __call__(self, pixel_values: Array) -> tuple[Array, ...]:
    """pixel_values float32[B, H, W, 3] -> hidden states, a tuple of L + 1 arrays [B, P, D]."""
    c, r = self.config, self.runtime
    if c.tower != "siglip":
      raise ValueError(f"SiglipVisionTower given a {c.tower!r} vision config")
    dtype, param_dtype = dtype_of(r.dtype), dtype_of(r.param_dtype)
    patches = patch_embeddings(pixel_values, c, r, use_bias=True)
    position_embedding = self.param(
      "position_embedding",
      partitioned(nn.initializers.normal(0.02), (None, "embed")),
      (c.num_patches, c.hidden_size),
      param_dtype,
    )
    embeddings = patches + position_embedding.astype(dtype)[None]

    last, per_layer = encoder_hidden_states(embeddings, c, r)
    # LLaVA reads intermediate layers and never these; they are part of the checkpoint, so
    # they are created to keep import / export exact, and XLA drops the unused computation.
    last_hidden_state = layer_norm(c.layer_norm_eps, dtype, param_dtype, "post_layernorm")(last)
    self.sow("intermediates", "last_hidden_state", last_hidden_state)
    if c.use_head:
      pooled = AttentionPoolingHead(c, r, name="head")(last_hidden_state)
      self.sow("intermediates", "pooler_output", pooled)
    return (embeddings, *per_layer)
