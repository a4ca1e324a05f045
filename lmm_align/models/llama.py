"""The LLaMA decoder (Vicuna / Llama 2 / Llama 3): RMSNorm, RoPE, grouped-query attention, SwiGLU.

Qwen2 is the same decoder with biases on the q, k and v projections (`TextConfig.qkv_bias`),
its own RoPE theta and vocabulary; both families run this code.

One forward serves training (no cache) and decoding (a KVCache updated in place, one chunk
of tokens per call), so the sampler and the trainers run the same code.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmm_align.models.config import RuntimeConfig, TextConfig
from lmm_align.models.layers import (
  KVCache,
  RMSNorm,
  apply_rope,
  dense_general,
  dot_product_attention,
  dtype_of,
  partitioned,
  rope_inverse_frequencies,
  stack_layers,
)

Array = jax.Array
ACTIVATION = ("activation_batch", "activation_length", "activation_embed")


class DecoderLayer(nn.Module):
  """Pre-norm attention + SwiGLU MLP. Called as (hidden, kv, ...) -> (hidden, kv).

  hidden: [B, T, D]. kv: None (no cache) or this layer's (key [B, K, H, S], value
  [B, K, S, H]) cache (layouts: see KVCache), into which the layer writes its T new slots at
  `cache_index` (in place under jit).
  """

  config: TextConfig
  runtime: RuntimeConfig

  @nn.compact
  def __call__(self, hidden: Array, kv, positions: Array, key_valid: Array, cache_index: Array):
    c = self.config
    dtype, param_dtype = dtype_of(self.runtime.dtype), dtype_of(self.runtime.param_dtype)
    hidden = nn.with_logical_constraint(hidden, ACTIVATION)

    x = RMSNorm(c.rms_norm_eps, dtype, param_dtype, name="input_layernorm")(hidden)
    proj = lambda features, names, name: dense_general(
      features, -1, names, dtype, param_dtype, c.qkv_bias, name, lora=self.runtime.lora
    )(x)
    q = proj((c.num_heads, c.head_dim), ("embed", "heads", "kv"), "q_proj")
    k = proj((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "kv"), "k_proj")
    v = proj((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "kv"), "v_proj")
    inv_freq = rope_inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling)
    q = apply_rope(q, positions, inv_freq, c.rope_scaling)
    k = apply_rope(k, positions, inv_freq, c.rope_scaling)

    t = hidden.shape[1]
    k, v = jnp.transpose(k, (0, 2, 3, 1)), jnp.swapaxes(v, 1, 2)  # [B, K, H, T], [B, K, T, H]
    if kv is None:
      keys, values, query_slots = k, v, jnp.arange(t)
    else:
      cache_k, cache_v = kv
      cache_k = jax.lax.dynamic_update_slice(
        cache_k, k.astype(cache_k.dtype), (0, 0, 0, cache_index)
      )
      cache_v = jax.lax.dynamic_update_slice(
        cache_v, v.astype(cache_v.dtype), (0, 0, cache_index, 0)
      )
      keys, values = cache_k.astype(dtype), cache_v.astype(dtype)
      query_slots = cache_index + jnp.arange(t)
      kv = (cache_k, cache_v)
    attn = dot_product_attention(q, keys, values, key_valid, query_slots, c.head_dim**-0.5)
    attn = dense_general(
      c.hidden_size,
      (-2, -1),
      ("heads", "kv", "embed"),
      dtype,
      param_dtype,
      False,
      "o_proj",
      lora=self.runtime.lora,
    )(attn)
    hidden = hidden + attn

    x = RMSNorm(c.rms_norm_eps, dtype, param_dtype, name="post_attention_layernorm")(hidden)
    mlp = lambda names, features, name: dense_general(
      features, -1, names, dtype, param_dtype, False, name, lora=self.runtime.lora
    )
    gate = mlp(("embed", "mlp"), c.intermediate_size, "gate_proj")(x)
    up = mlp(("embed", "mlp"), c.intermediate_size, "up_proj")(x)
    h = nn.with_logical_constraint(
      nn.silu(gate) * up, ("activation_batch", "activation_length", "activation_mlp")
    )
    hidden = hidden + mlp(("mlp", "embed"), c.hidden_size, "down_proj")(h)
    return hidden, kv


class LlamaDecoder(nn.Module):
  """Token embeddings, the decoder stack, the final norm and the LM head."""

  config: TextConfig
  runtime: RuntimeConfig

  def setup(self):
    c, r = self.config, self.runtime
    self.embed_tokens = nn.Embed(
      c.vocab_size,
      c.hidden_size,
      dtype=dtype_of(r.dtype),
      param_dtype=dtype_of(r.param_dtype),
      embedding_init=partitioned(nn.initializers.normal(0.02), ("vocab", "embed")),
    )
    block = stack_layers(
      DecoderLayer,
      scan=r.scan_layers,
      remat=r.remat_policy,
      num_layers=c.num_layers,
      in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
      static_argnums=(),
    )
    if r.scan_layers:
      self.layers = block(c, r)
    else:
      self.layers = [block(c, r, name=f"layers_{i}") for i in range(c.num_layers)]
    self.norm = RMSNorm(c.rms_norm_eps, dtype_of(r.dtype), dtype_of(r.param_dtype))
    if not c.tie_word_embeddings:
      self.lm_head = dense_general(
        c.vocab_size,
        -1,
        ("embed", "vocab"),
        dtype_of(r.dtype),
        dtype_of(r.param_dtype),
        False,
        "lm_head",
        lora=r.lora,
      )

  def embed(self, input_ids: Array) -> Array:
    """int[B, T] -> [B, T, D]."""
    return self.embed_tokens(input_ids)

  def __call__(
    self,
    embeds: Array,
    positions: Array,
    key_valid: Array,
    cache: KVCache | None,
    with_logits: bool = True,
  ) -> tuple[Array | None, Array, KVCache | None]:
    """embeds [B, T, D], positions int[B, T], key_valid bool[B, S] (S = T without a cache).

    Returns (logits float32[B, T, V] or None, final hidden states [B, T, D], updated cache).
    """
    cache_index = jnp.zeros((), jnp.int32) if cache is None else cache.index
    hidden = embeds
    if self.runtime.scan_layers:
      if cache is not None and not cache.stacked:
        raise ValueError("scanned layers need a stacked KVCache (init_cache of the same config)")
      kv = None if cache is None else (cache.key, cache.value)
      hidden, kv = self.layers(hidden, kv, positions, key_valid, cache_index)
    else:
      if cache is not None and cache.stacked:
        raise ValueError("unrolled layers need a per-layer KVCache (KVCache.unstacked)")
      new_kv = []
      for i, layer in enumerate(self.layers):
        layer_kv = None if cache is None else (cache.key[i], cache.value[i])
        hidden, layer_kv = layer(hidden, layer_kv, positions, key_valid, cache_index)
        new_kv.append(layer_kv)
      kv = None if cache is None else tuple(zip(*new_kv))
    hidden = self.norm(hidden)
    if cache is not None:
      cache = KVCache(key=kv[0], value=kv[1], valid=key_valid, index=cache.index + embeds.shape[1])
    logits = None
    if with_logits:
      if self.config.tie_word_embeddings:
        logits = self.embed_tokens.attend(hidden)
      else:
        logits = self.lm_head(hidden)
      logits = nn.with_logical_constraint(
        logits.astype(jnp.float32), ("activation_batch", "activation_length", "activation_vocab")
      )
    return logits, hidden, cache
