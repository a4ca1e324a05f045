"""Building blocks shared by the vision tower and the decoder.

Shape letters: B batch, T query length, S key length (cache slots), D model width,
N query heads, K kv heads, G = N // K query heads per kv head, H head dim, F mlp width.
Every parameter carries logical axis names; `lmm_align.sharding` maps them to mesh axes.
"""

from __future__ import annotations

import math
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmm_align.models.config import LoraConfig, RopeScaling

Array = jax.Array

# Additive mask value: finite so that a query row with no visible key (a left-pad slot)
# gives a uniform softmax instead of NaN, as transformers does.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def dtype_of(name: str) -> jnp.dtype:
  return jnp.dtype(name)


def partitioned(init: nn.initializers.Initializer, names: tuple[str | None, ...]):
  return nn.with_logical_partitioning(init, names)


class RMSNorm(nn.Module):
  """LLaMA RMSNorm: normalise in float32, cast back, then scale (the order HF uses)."""

  eps: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param(
      "scale", partitioned(nn.initializers.ones, ("norm",)), (x.shape[-1],), self.param_dtype
    )
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * normed.astype(self.dtype)


def vision_activation(name: str):
  """A ViT MLP activation by its HF `hidden_act` name: CLIP's quick_gelu, SigLIP's tanh GELU."""
  activations = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
  }
  if name not in activations:
    raise ValueError(f"hidden_act {name!r} is not one of {sorted(activations)}")
  return activations[name]


def layer_norm(eps: float, dtype: jnp.dtype, param_dtype: jnp.dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
    epsilon=eps,
    dtype=dtype,
    param_dtype=param_dtype,
    scale_init=partitioned(nn.initializers.ones, ("norm",)),
    bias_init=partitioned(nn.initializers.zeros, ("norm",)),
    name=name,
  )


class DenseGeneral(nn.Module):
  """y = x . kernel (+ bias), contracting the last `num_in` axes of x with the first of kernel.

  Our own rather than flax's: flax's DenseGeneral initialises multi-axis kernels through a
  flat shape, which breaks logical sharding constraints during a sharded init.
  """

  features: tuple[int, ...]
  num_in: int
  names: tuple[str | None, ...]
  use_bias: bool
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  lora: LoraConfig | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_shape = x.shape[x.ndim - self.num_in :]
    kernel = self.param(
      "kernel",
      partitioned(nn.initializers.normal(0.02), self.names),
      (*in_shape, *self.features),
      self.param_dtype,
    )
    y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=self.num_in)
    if self.lora is not None and is_lora_target(self.path, self.lora):
      y = y + self._lora_delta(x, in_shape)
    if self.use_bias:
      bias_names = self.names[len(self.names) - len(self.features) :]
      bias = self.param(
        "bias", partitioned(nn.initializers.zeros, bias_names), self.features, self.param_dtype
      )
      y = y + bias.astype(self.dtype)
    return y

  def _lora_delta(self, x: Array, in_shape: tuple[int, ...]) -> Array:
    lora = self.lora
    in_names = self.names[: self.num_in]
    out_names = self.names[self.num_in :]
    fan_in = int(np.prod(in_shape))
    # PEFT's kaiming_uniform_(a=sqrt(5)) on A: bound = 1 / sqrt(fan_in).
    a_init = partitioned(_symmetric_uniform(fan_in**-0.5), (*in_names, "lora_rank"))
    b_init = partitioned(nn.initializers.zeros, ("lora_rank", *out_names))
    a_shape, b_shape = (*in_shape, lora.rank), (lora.rank, *self.features)
    a = self.variable(
      "lora", "a", lambda: a_init(self.make_rng("params"), a_shape, self.param_dtype)
    ).value
    b = self.variable(
      "lora", "b", lambda: b_init(self.make_rng("params"), b_shape, self.param_dtype)
    ).value
    if lora.dropout > 0 and self.has_rng("dropout"):
      keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - lora.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - lora.dropout), 0.0)
    h = jnp.tensordot(x.astype(self.dtype), a.astype(self.dtype), axes=self.num_in)
    return jnp.tensordot(h, b.astype(self.dtype), axes=1) * lora.scale


def _symmetric_uniform(bound: float) -> nn.initializers.Initializer:
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

  return init


def is_lora_target(path: tuple[str, ...], lora: LoraConfig) -> bool:
  name = "/".join(path)
  return any(re.fullmatch(t, name) for t in lora.targets)


def dense_general(
  features: int | tuple[int, ...],
  axis: int | tuple[int, ...],
  names: tuple[str | None, ...],
  dtype: jnp.dtype,
  param_dtype: jnp.dtype,
  use_bias: bool,
  name: str,
  lora: LoraConfig | None = None,
) -> DenseGeneral:
  """A dense layer over the trailing `axis` (-1, or (-2, -1)) whose params carry logical names."""
  features = (features,) if isinstance(features, int) else tuple(features)
  num_in = 1 if isinstance(axis, int) else len(axis)
  return DenseGeneral(features, num_in, names, use_bias, dtype, param_dtype, lora, name=name)


# --------------------------------------------------------------------------------------------
# Rotary position embeddings (rotate-half layout, as transformers' LLaMA).
# --------------------------------------------------------------------------------------------


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> Array:
  """float32[H/2] inverse frequencies, with Llama-3 frequency-dependent scaling if asked."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if scaling is None or scaling.rope_type != "llama3":
    return inv_freq
  old_context = scaling.original_max_position_embeddings
  low_freq_wavelen = old_context / scaling.low_freq_factor
  high_freq_wavelen = old_context / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = (old_context / wavelen - scaling.low_freq_factor) / (
    scaling.high_freq_factor - scaling.low_freq_factor
  )
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x: Array, positions: Array, inv_freq: Array, scaling: RopeScaling | None) -> Array:
  """Rotates x [B, T, heads, H] by positions [B, T]; cos/sin in float32, as HF computes them."""
  pos = positions.astype(jnp.float32)
  if scaling is not None and scaling.rope_type == "linear":
    pos = pos / scaling.factor
  freqs = pos[..., None] * inv_freq  # [B, T, H/2]
  angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


# --------------------------------------------------------------------------------------------
# Attention.
# --------------------------------------------------------------------------------------------


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer, for decoding one chunk at a time inside jit.

  key: per layer [B, K, H, S] (keys transposed); value: per layer [B, K, S, H]. The layouts
    make both attention dots plain [G*T, H] @ [H, S] and [G*T, S] @ [S, H] matmuls per (row,
    kv head), which XLA:CPU's matmul library runs fastest (with keys as [S, H] the logits dot
    took 3x as long).
    "Per layer" is one array with a leading L axis for a model with scanned layers (the scan
    slices it), and a tuple of L arrays for unrolled layers: each decode step then attends
    over each buffer as it is, where slicing a layer out of a stacked cache makes XLA:CPU
    copy the slice, a copy of the whole cache per token.
  valid: bool[B, S], slots that hold a real (non-pad) token.
  index: int32 scalar, the next free slot; all rows write the same slots, which is what
    left-padded batches need.
  """

  key: Array | tuple[Array, ...]
  value: Array | tuple[Array, ...]
  valid: Array
  index: Array

  @classmethod
  def create(
    cls,
    num_layers: int,
    batch: int,
    max_length: int,
    num_kv_heads: int,
    head_dim: int,
    dtype,
    stacked: bool,
  ) -> KVCache:
    key_shape = (batch, num_kv_heads, head_dim, max_length)
    value_shape = (batch, num_kv_heads, max_length, head_dim)
    if stacked:
      key = jnp.zeros((num_layers, *key_shape), dtype)
      value = jnp.zeros((num_layers, *value_shape), dtype)
    else:
      key = tuple(jnp.zeros(key_shape, dtype) for _ in range(num_layers))
      value = tuple(jnp.zeros(value_shape, dtype) for _ in range(num_layers))
    return cls(
      key=key,
      value=value,
      valid=jnp.zeros((batch, max_length), bool),
      index=jnp.zeros((), jnp.int32),
    )

  @property
  def stacked(self) -> bool:
    return not isinstance(self.key, tuple)

  @property
  def max_length(self) -> int:
    return self.valid.shape[1]

  def unstacked(self) -> KVCache:
    """The same cache as one buffer per layer (for unrolled layers); copies a stacked one."""
    if not self.stacked:
      return self
    return self.replace(key=tuple(self.key), value=tuple(self.value))


def dot_product_attention(
  q: Array, k: Array, v: Array, key_valid: Array, query_slots: Array, scale: float
) -> Array:
  """Causal grouped-query attention with a key padding mask.

  q: [B, T, N, H]; k: [B, K, H, S] (transposed, as the cache keeps it); v: [B, K, S, H];
  key_valid: bool[B, S];
  query_slots: int32[T], the key slot of each query (a query sees keys at slots <= its own).
  Returns [B, T, N, H]. Logits and softmax in float32.
  """
  b, t, n, h = q.shape
  kv_heads = k.shape[1]
  groups = n // kv_heads
  # Queries as [B, K, G*T, H]: both dots are then plain batched matmuls over (B, K) that read
  # the cache in place (see KVCache).
  q = jnp.transpose(q.reshape(b, t, kv_heads, groups, h), (0, 2, 3, 1, 4))
  q = q.reshape(b, kv_heads, groups * t, h)
  logits = jnp.einsum("bkqh,bkhs->bkqs", q, k, preferred_element_type=jnp.float32) * scale
  causal = jnp.arange(k.shape[3])[None, :] <= query_slots[:, None]  # [T, S]
  visible = jnp.tile(causal, (groups, 1))[None, None] & key_valid[:, None, None, :]
  logits = jnp.where(visible, logits, _MASK_VALUE)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkqs,bksh->bkqh", weights, v).reshape(b, kv_heads, groups, t, h)
  return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, n, h)


def bidirectional_attention(q: Array, k: Array, v: Array, scale: float) -> Array:
  """Full attention without masks (the ViT). q, k, v: [B, P, N, H] -> [B, P, N, H]."""
  logits = jnp.einsum("bqnh,bknh->bnqk", q, k, preferred_element_type=jnp.float32) * scale
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bnqk,bknh->bqnh", weights, v)


def remat_policy(name: str):
  """The jax.checkpoint policy for a config's remat_policy name ("none" means no remat)."""
  policies = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
  }
  return policies[name]


def stack_layers(
  block: type[nn.Module],
  *,
  scan: bool,
  remat: str,
  num_layers: int,
  in_axes: tuple,
  static_argnums: tuple,
):
  """Wraps a layer class for a repeated stack: remat per the policy, then nn.scan if asked.

  The layer's call is (carry, scanned, *broadcast) -> (carry, out); with scan the params get a
  leading "layers" axis and `scanned` is sliced along axis 0.
  """
  if remat != "none":
    block = nn.remat(
      block, policy=remat_policy(remat), prevent_cse=not scan, static_argnums=static_argnums
    )
  if not scan:
    return block
  return nn.scan(
    block,
    variable_axes={"params": 0, "lora": 0},
    split_rngs={"params": True, "dropout": True},
    in_axes=in_axes,
    length=num_layers,
    metadata_params={nn.PARTITION_NAME: "layers"},
  )
