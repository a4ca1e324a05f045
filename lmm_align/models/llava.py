"""LLaVA: vision tower -> projector -> decoder, with image features spliced into the token
embeddings at the image placeholder tokens (the llava-hf convention: the processor has already
expanded each `<image>` into `num_image_tokens` placeholders).

The tower is CLIP's (LLaVA-1.5) or SigLIP's, the decoder LLaMA or Qwen2, as the config says;
they compose the same way. The same module is a text-only decoder when `config.vision` is None.

Anyres configs (LLaVA-NeXT, LLaVA-OneVision; `config.image_grid_pinpoints`) take one tiled
image per row: pixel_values [B, tiles, H, W, 3] (base tile first, then the grid, padded tiles
at the end) and image_sizes [B, 2]. The tower reads every tile; the features are packed by a
`PackPlan` (`lmm_align.models.anyres`: unpadding, OneVision's downsampling, `image_newline`
after each row) into [B, L, D], and the k-th placeholder of row b takes packed[b, k].
"""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmm_align.models import anyres
from lmm_align.models.clip_vit import ClipVisionTower
from lmm_align.models.config import ModelConfig
from lmm_align.models.layers import KVCache, dense_general, dtype_of
from lmm_align.models.llama import LlamaDecoder
from lmm_align.models.siglip import SiglipVisionTower

Array = jax.Array


@flax.struct.dataclass
class ModelOutput:
  """logits float32[B, T, V] (None when not asked for), hidden_states [B, T, D] after the final
  norm (what reward and value heads read), and the updated KVCache when one was passed."""

  logits: Array | None
  hidden_states: Array
  cache: KVCache | None = None


class Projector(nn.Module):
  """Vision features [N, P, Dv] -> decoder embeddings [N, P, D]: `mlp2x_gelu` or `linear`."""

  config: ModelConfig

  @nn.compact
  def __call__(self, features: Array) -> Array:
    c = self.config
    dtype, param_dtype = dtype_of(c.runtime.dtype), dtype_of(c.runtime.param_dtype)
    # Named like an MLP so that the mesh rules shard it as one (never the same mesh axis twice).
    dense = lambda name, names: dense_general(
      c.text.hidden_size, -1, names, dtype, param_dtype, c.projector_bias, name, lora=c.runtime.lora
    )
    x = dense("linear_1", ("embed", "mlp"))(features)
    if c.projector_type == "mlp2x_gelu":
      x = dense("linear_2", ("mlp", "embed"))(nn.gelu(x, approximate=False))
    return x


def count_image_tokens(input_ids: np.ndarray | Array, image_token_id: int) -> int:
  return int(np.sum(np.asarray(input_ids) == image_token_id))


def check_image_tokens(config: ModelConfig, input_ids, num_images: int) -> None:
  """Host-side check that the placeholders in input_ids match the images, with a clear error.

  Inside jit the count is data and cannot raise, so every entry point that builds batches on
  the host (data pipeline, sampler, evaluators) calls this first.
  """
  found = count_image_tokens(input_ids, config.image_token_id)
  expected = num_images * config.num_image_tokens
  if found != expected:
    raise ValueError(
      f"input_ids hold {found} image placeholder tokens (id {config.image_token_id}) but "
      f"{num_images} image(s) x {config.num_image_tokens} features per image = {expected} are needed"
    )


class Llava(nn.Module):
  """The full model. Params live outside: `model.apply({"params": params}, input_ids, ...)`."""

  config: ModelConfig

  def setup(self):
    c = self.config
    if c.vision is not None:
      tower = SiglipVisionTower if c.vision.tower == "siglip" else ClipVisionTower
      self.vision_tower = tower(c.vision, c.runtime)
      self.multi_modal_projector = Projector(c)
    # Declared only when it exists, so that a decode step applied with the decoder's params
    # alone (the sampler's unrolled step) does not look for it.
    if c.anyres and (self.is_initializing() or self.has_variable("params", "image_newline")):
      d = c.text.hidden_size
      # transformers draws it from N(0, 1/D), the scale of the projected features.
      self.image_newline = self.param(
        "image_newline",
        nn.with_logical_partitioning(
          lambda key, shape, dtype: jax.random.normal(key, shape, dtype) / np.sqrt(d), ("embed",)
        ),
        (d,),
        dtype_of(c.runtime.param_dtype),
      )
    self.language_model = LlamaDecoder(c.text, c.runtime)

  def image_features(self, pixel_values: Array) -> Array:
    """float32[N, H, W, 3] -> projected features [N, P, D] (P = config.num_image_tokens)."""
    c = self.config
    hidden_states = self.vision_tower(pixel_values)
    selected = [hidden_states[layer] for layer in c.vision_feature_layers]
    if c.vision_feature_select_strategy == "default":
      # CLIP's class token; for SigLIP (no class token) the first patch, as transformers does.
      selected = [h[:, 1:] for h in selected]
    return self.multi_modal_projector(jnp.concatenate(selected, axis=-1))

  def splice_images(
    self, input_ids: Array, pixel_values: Array, embeds: Array, concrete: bool
  ) -> Array:
    """Replaces the placeholder embeddings by image features, in placeholder order.

    pixel_values [N, H, W, 3]: the batch's images in row-major placeholder order (llava-hf).
    pixel_values [B, I, H, W, 3]: I image slots per row, row-aligned; unused slots are ignored
      (static shapes for training batches that mix image and text-only rows).
    """
    c = self.config
    if c.vision is None:
      raise ValueError("pixel_values given to a text-only model")
    b, t = input_ids.shape
    is_image = input_ids == c.image_token_id
    if pixel_values.ndim == 5:
      if pixel_values.shape[0] != b:
        raise ValueError(
          f"row-aligned pixel_values {pixel_values.shape} do not match batch size {b}"
        )
      slots = pixel_values.shape[1]
      features = self.image_features(pixel_values.reshape(b * slots, *pixel_values.shape[2:]))
      features = features.astype(embeds.dtype).reshape(b, -1, features.shape[-1])  # [B, I*P, D]
      if concrete:
        per_row = np.sum(np.asarray(is_image), axis=1)
        if np.any(per_row > features.shape[1]) or np.any(per_row % c.num_image_tokens):
          raise ValueError(
            f"image placeholders per row {per_row.tolist()} must be a multiple of {c.num_image_tokens} "
            f"and at most {slots} image slot(s) x {c.num_image_tokens}"
          )
      order = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, features.shape[1] - 1)
      spliced = jnp.take_along_axis(features, order[..., None], axis=1)
    else:
      if concrete:
        check_image_tokens(c, input_ids, pixel_values.shape[0])
      features = self.image_features(pixel_values).astype(embeds.dtype)
      if c.anyres:
        # Single-tile images (OneVision's multi-image layout): P features, then image_newline.
        newline = jnp.broadcast_to(
          self.image_newline.astype(features.dtype), (features.shape[0], 1, features.shape[-1])
        )
        features = jnp.concatenate([features, newline], axis=1)
      features = features.reshape(-1, features.shape[-1])
      order = jnp.cumsum(is_image.reshape(-1)).reshape(b, t) - 1
      spliced = features[jnp.clip(order, 0, features.shape[0] - 1)]
    return jnp.where(is_image[..., None], spliced, embeds)

  def splice_tiled_images(
    self,
    input_ids: Array,
    pixel_values: Array,
    image_sizes: Array | np.ndarray | None,
    plan: anyres.PackPlan | dict | None,
    embeds: Array,
    concrete: bool,
    rows_per_image: int = 1,
  ) -> Array:
    """Anyres: one tiled image per row, packed, then spliced at the row's placeholders.

    pixel_values [N, tiles, H, W, 3]; image_sizes int[N, 2] (height, width), (0, 0) for a row
    without an image; plan: a `PackPlan` (or its `as_arrays()`) for these sizes, needed under
    jit, built here from concrete image_sizes otherwise. Image n serves the `rows_per_image`
    consecutive rows from n * rows_per_image (B = N * rows_per_image; a preference pair's
    chosen and rejected share one), so the tower reads each image once.
    """
    c = self.config
    b, tiles = pixel_values.shape[:2]
    if b * rows_per_image != input_ids.shape[0]:
      raise ValueError(
        f"tiled pixel_values {pixel_values.shape} x {rows_per_image} row(s) per image do not "
        f"match batch size {input_ids.shape[0]}"
      )
    if plan is None:
      if image_sizes is None or isinstance(image_sizes, jax.core.Tracer):
        raise ValueError(
          "tiled pixel_values need image_sizes as host numbers, or a pack plan "
          "(lmm_align.models.anyres.pack_plan) under jit"
        )
      sizes = np.asarray(image_sizes).reshape(b, 2)
      plan = anyres.pack_plan([tuple(map(int, hw)) for hw in sizes], c.packing)
    is_image = input_ids == c.image_token_id
    num_tokens = plan.num_tokens if isinstance(plan, anyres.PackPlan) else plan["num_tokens"]
    if concrete and not isinstance(num_tokens, jax.core.Tracer):
      per_row = np.sum(np.asarray(is_image), axis=1)
      if not np.array_equal(per_row, np.repeat(np.asarray(num_tokens), rows_per_image)):
        raise ValueError(
          f"image placeholders per row {per_row.tolist()} differ from the tokens the images "
          f"pack into {np.asarray(num_tokens).tolist()} (anyres.num_image_tokens per image size)"
        )
    features = self.image_features(pixel_values.reshape(b * tiles, *pixel_values.shape[2:]))
    features = features.reshape(b, tiles, *features.shape[1:])  # [B, tiles, P, D]
    packed = anyres.apply_pack_plan(features, self.image_newline.astype(features.dtype), plan)
    packed = jnp.repeat(packed.astype(embeds.dtype), rows_per_image, axis=0)  # [B, L, D]
    order = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, packed.shape[1] - 1)
    spliced = jnp.take_along_axis(packed, order[..., None], axis=1)
    return jnp.where(is_image[..., None], spliced, embeds)

  def __call__(
    self,
    input_ids: Array,
    pixel_values: Array | None = None,
    attention_mask: Array | None = None,
    positions: Array | None = None,
    cache: KVCache | None = None,
    with_logits: bool = True,
    image_sizes: Array | np.ndarray | None = None,
    pack_plan: anyres.PackPlan | dict | None = None,
    rows_per_image: int = 1,
  ) -> ModelOutput:
    """Forward over one chunk of tokens.

    input_ids: int[B, T]. pixel_values: float32[N, H, W, 3], the batch's images in the order
    their placeholders appear (row-major over [B, T]), or float32[B, I, H, W, 3] with I image
    slots per row; rows without an image are allowed either way.
    attention_mask: [B, T], 1 for real tokens (left or right padding). positions: int[B, T];
    by default each row counts its real tokens (in the cache first, then this chunk) from 0.
    cache: a KVCache to write this chunk into and attend over (prefill, then decode steps).
    image_sizes: int[B, 2] (height, width) of each row's image, for an anyres config with
    pixel_values [B, tiles, H, W, 3] (one tiled image per row); (0, 0) for a text-only row.
    pack_plan: the `anyres.pack_plan` of those sizes (or its `as_arrays()`), required under jit.
    An anyres config given [N, H, W, 3] reads each image as one tile (P features, then
    `image_newline`: OneVision's multi-image layout).
    rows_per_image: with tiled pixel_values [B / rows_per_image, tiles, H, W, 3], each image
    (its size, its plan) serves that many consecutive rows, encoded once.
    """
    c = self.config
    b, t = input_ids.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), jnp.int32)
    mask = attention_mask.astype(jnp.int32)
    if positions is None:
      before = 0 if cache is None else jnp.sum(cache.valid, axis=-1, dtype=jnp.int32)[:, None]
      positions = jnp.maximum(before + jnp.cumsum(mask, axis=-1) - 1, 0)

    embeds = self.language_model.embed(input_ids)
    concrete = not isinstance(input_ids, jax.core.Tracer)
    tiled = c.anyres and pixel_values is not None and pixel_values.ndim == 5
    if (image_sizes is not None or pack_plan is not None or rows_per_image != 1) and not tiled:
      raise ValueError(
        "image_sizes / pack_plan / rows_per_image are for an anyres config "
        "(image_grid_pinpoints) with tiled pixel_values [B, tiles, H, W, 3]"
      )
    if tiled:
      embeds = self.splice_tiled_images(
        input_ids, pixel_values, image_sizes, pack_plan, embeds, concrete, rows_per_image
      )
    elif pixel_values is not None:
      embeds = self.splice_images(input_ids, pixel_values, embeds, concrete=concrete)
    elif c.vision is not None and cache is None and not isinstance(input_ids, jax.core.Tracer):
      check_image_tokens(c, input_ids, 0)

    if cache is None:
      key_valid = mask.astype(bool)
    else:
      key_valid = jax.lax.dynamic_update_slice(cache.valid, mask.astype(bool), (0, cache.index))
    logits, hidden, cache = self.language_model(embeds, positions, key_valid, cache, with_logits)
    return ModelOutput(logits=logits, hidden_states=hidden, cache=cache)


def init_cache(config: ModelConfig, batch: int, max_length: int) -> KVCache:
  """An empty KVCache with `max_length` slots per row, in the compute dtype, stacked when the
  config scans its layers."""
  t = config.text
  return KVCache.create(
    t.num_layers, batch, max_length, t.num_kv_heads, t.head_dim, dtype_of(config.runtime.dtype),
    stacked=config.runtime.scan_layers,
  )  # fmt: skip


def init_params(config: ModelConfig, rng: Array) -> dict:
  """Random params (unboxed) for a config, from dummy inputs of the right shapes."""
  model = Llava(config)
  return nn.unbox(jax.jit(model.init)(rng, *dummy_inputs(config))["params"])


def dummy_inputs(config: ModelConfig, batch: int = 1) -> tuple[Array, Array | None]:
  """(input_ids, pixel_values) that exercise every parameter: one image, its placeholders."""
  if config.vision is None:
    return jnp.zeros((batch, 8), jnp.int32), None
  v = config.vision
  ids = jnp.full((batch, config.num_image_tokens + 4), config.image_token_id, jnp.int32)
  ids = ids.at[:, -4:].set(0)
  pixels = jnp.zeros((batch, v.image_size, v.image_size, v.num_channels), jnp.float32)
  return ids, pixels
