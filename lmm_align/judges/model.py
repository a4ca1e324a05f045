"""The in-process judge: a LLaVA model in JAX answering judge requests greedily, in batches.

`ModelJudge` is what a trained critic (or any policy asked for a verdict) runs on, with no
server: each request's prompt is rendered with a conversation template into a generation
prompt (`conversation.encode_generation_prompt`, "<image>" expanded to the model's image
tokens), its image (a file path) loaded with PIL and preprocessed, and the batch decoded
greedily by `sampling.generate` on the KV cache.

Shapes stay fixed so that jit compiles once per prompt-length bucket: every batch has
`batch_size` rows (a short last batch is padded with copies of its last row, whose replies
are dropped), images go in row-aligned slots float32[B, 1, H, W, 3] (zeros for a text-only
row, whose slot is ignored), and each row's `max_tokens` is a per-row limit under the static
`max_new_tokens`. A reply ends at the template's end-of-answer token (`</s>` for vicuna_v1,
`<|im_end|>` for qwen_1_5, as `conversation.answer_stop_ids` gives) or the tokenizer's eos.
With `mesh=` (a critic too large for one device: a 72B LLaVA-Critic) the params stay sharded
as loaded and the sampler decodes over the mesh (`sampling.generate(mesh=...)`), its
activations and KV cache following the logical rules.
A request that cannot be prepared (unreadable image, an "<image>" without
an image, an image for a text-only model) gets `JudgeReply(None, error=...)`; the rest of the
batch is answered.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from jax.sharding import Mesh

from lmm_align import sampling, sharding
from lmm_align.data import conversation
from lmm_align.data.anyres import AnyresImageConfig, choose_tile_bucket, preprocess_anyres_image
from lmm_align.data.images import ImageProcessorConfig, load_image, preprocess_image
from lmm_align.judges.base import JudgeReply, JudgeRequest
from lmm_align.models.llava import Llava


@dataclasses.dataclass(frozen=True)
class _Prepared:
  """One request ready for the sampler: token ids [T], pixels [H, W, 3] (anyres: its tiles
  [tiles, H, W, 3] and the image's (height, width)) or None, a limit."""

  index: int
  input_ids: list[int]
  pixels: np.ndarray | None
  max_tokens: int
  image_size: tuple[int, int] | None = None


class ModelJudge:
  """The Judge protocol over a Llava model and its params.

  Args:
    model: the Llava module (its config gives image tokens and vision settings).
    params: its params (unboxed).
    tokenizer: the model's HF tokenizer (eos ends a reply).
    image_config: preprocessing for the vision tower; None for a text-only model. An
      `AnyresImageConfig` (LLaVA-NeXT / OneVision) tiles each image, its placeholders counted
      by its size, the batch's tiles padded to the smallest of `tile_buckets` that holds them
      (default: the most an image can take).
    template: conversation template name ("vicuna_v1", "llava_v1", "qwen_1_5" for
      LLaVA-OneVision and LLaVA-Critic, ...). A request's `system` replaces the template's
      system message.
    batch_size: rows per sampler call.
    max_new_tokens: the static reply budget; a request's max_tokens is capped by it.
    buckets: prompt-length buckets passed to `sampling.generate` (None: powers of two).
    mesh: the mesh the params are sharded over (None: one device); decoding runs on it.
    rules: the logical axis rules the activations and the KV cache follow on the mesh.
  """

  def __init__(
    self,
    model: Llava,
    params: Any,
    tokenizer: Any,
    image_config: ImageProcessorConfig | None,
    *,
    template: str = "vicuna_v1",
    batch_size: int = 8,
    max_new_tokens: int = 512,
    buckets: Sequence[int] | None = None,
    name: str = "model",
    tile_buckets: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES,
  ):
    if batch_size < 1 or max_new_tokens < 1:
      raise ValueError(
        f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}"
      )
    if model.config.has_vision and image_config is None:
      raise ValueError("a model with a vision tower needs an image_config")
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.image_config = image_config
    self.tiled = isinstance(image_config, AnyresImageConfig)
    if self.tiled:
      self.tile_buckets = tuple(sorted(tile_buckets or (image_config.max_tiles_per_image(),)))
    self.template = conversation.get_template(template)
    # Fails here, not mid-run, when the tokenizer lacks the template's end token.
    self.stop_token_ids = conversation.answer_stop_ids(tokenizer, self.template)
    self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
    self.buckets = None if buckets is None else tuple(buckets)
    self.name = name
    self.mesh, self.rules = mesh, tuple(tuple(rule) for rule in rules)

  def complete(self, requests: Sequence[JudgeRequest]) -> list[JudgeReply]:
    """Greedy replies, one per request, in order."""
    replies: list[JudgeReply | None] = [None] * len(requests)
    prepared = []
    for i, request in enumerate(requests):
      try:
        prepared.append(self._prepare(i, request))
      except ValueError as e:
        where = f"request {request.request_id!r}: " if request.request_id else ""
        replies[i] = JudgeReply(None, error=f"{self.name}: {where}{e}")
    for start in range(0, len(prepared), self.batch_size):
      chunk = prepared[start : start + self.batch_size]
      for item, text in zip(chunk, self._generate(chunk)):
        replies[item.index] = JudgeReply(text)
    return replies  # every slot is filled: prepared or refused

  def _prepare(self, index: int, request: JudgeRequest) -> _Prepared:
    config = self.model.config
    template = self.template
    if request.system is not None:
      template = dataclasses.replace(template, system=request.system)
    pixels = size = None
    # A text-only model has no image tokens; the value is unused when nothing is expanded.
    image_tokens = max(config.num_image_tokens, 1)
    if request.image is not None:
      if not config.has_vision:
        raise ValueError("an image was given to a text-only model")
      if self.tiled:
        pixels, size = preprocess_anyres_image(load_image(request.image), self.image_config)
        if len(pixels) > self.tile_buckets[-1]:
          raise ValueError(f"the image takes {len(pixels)} tiles, tile_buckets {self.tile_buckets}")
        image_tokens = config.image_tokens(size)
      else:
        pixels = preprocess_image(load_image(request.image), self.image_config)
    encoded = conversation.encode_generation_prompt(
      request.prompt,
      self.tokenizer,
      template,
      image_tokens,
      config.image_token_id,
      with_image=pixels is not None,
      num_images=int(pixels is not None),
      record_id=request.request_id or None,
    )
    max_tokens = min(max(request.max_tokens, 1), self.max_new_tokens)
    return _Prepared(index, encoded.input_ids.tolist(), pixels, max_tokens, size)

  def _tiles(self, chunk: Sequence[_Prepared]) -> tuple[np.ndarray, np.ndarray]:
    """Anyres: (pixel_values float32[B, tiles, H, W, 3], zero tiles after each image's own;
    image_sizes int32[B, 2], (0, 0) for a row without an image)."""
    counts = [0 if item.pixels is None else len(item.pixels) for item in chunk]
    side = self.image_config.tile_size
    tiles = choose_tile_bucket(counts, self.tile_buckets)
    pixels = np.zeros((len(chunk), tiles, side, side, 3), np.float32)
    sizes = np.zeros((len(chunk), 2), np.int32)
    for row, item in enumerate(chunk):
      if item.pixels is not None:
        pixels[row, : counts[row]], sizes[row] = item.pixels, item.image_size
    return pixels, sizes

  def _pixel_slots(self, chunk: Sequence[_Prepared]) -> np.ndarray | None:
    """float32[B, 1, H, W, 3]: each row's image in its slot, zeros where it has none."""
    if not self.model.config.has_vision:
      return None
    height, width = self.image_config.crop_size
    slots = np.zeros((len(chunk), 1, height, width, 3), np.float32)
    for row, item in enumerate(chunk):
      if item.pixels is not None:
        slots[row, 0] = item.pixels
    return slots

  def _generate(self, chunk: Sequence[_Prepared]) -> list[str]:
    """Replies to up to batch_size prepared requests (padded to batch_size rows)."""
    rows = list(chunk) + [chunk[-1]] * (self.batch_size - len(chunk))
    settings = sampling.SamplingSettings(
      temperature=0.0,
      max_new_tokens=self.max_new_tokens,
      stop_token_ids=self.stop_token_ids,
    )
    pixels, sizes = self._tiles(rows) if self.tiled else (self._pixel_slots(rows), None)
    run = lambda: sampling.generate(
      self.model,
      self.params,
      [item.input_ids for item in rows],
      pixels,
      image_sizes=sizes,
      settings=settings,
      rng=None,
      pad_id=self.tokenizer.pad_token_id,
      buckets=self.buckets,
      row_max_new_tokens=[item.max_tokens for item in rows],
      mesh=self.mesh,
    )
    if self.mesh is None:
      out = run()
    else:
      with sharding.activation_sharding(self.mesh, self.rules):
        out = run()
    tokens = out.token_lists(strip_stop=True)[: len(chunk)]
    return [self.tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]
