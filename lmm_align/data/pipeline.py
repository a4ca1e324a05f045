"""Encoded examples -> deterministic, bucketed, per-process batches for supervised training.

Anyres models (LLaVA-NeXT, LLaVA-OneVision; `AnyresTiling`): the readers write one image's
placeholders at the single-tile count; here each image's run becomes the count its tiles pack
into (`anyres.num_image_tokens` of its size, as transformers' processor counts), before the
length policy, so placeholders are never truncated. A batch carries the tiles
(pixel_values [B, tiles, H, W, 3], zero tiles after each image's own), image_sizes [B, 2] and
the pack plan (`pack_plan.*` fields, its token axis the batch's padded length T, since an image
never packs into more tokens than its row holds). Tile counts come from `tile_buckets` and
lengths from `buckets`, so a run compiles one step per (length, tiles) pair, never per image.

Determinism: the examples of step s are a pure function of (seed, s): epoch e = s // B_e
uses the permutation `default_rng([seed, e])`, so a restarted run resumes at the exact batch
from its step alone. Every process computes the same global batch and keeps its own slice
of rows (process p of n keeps rows [p*G/n, (p+1)*G/n)), and the bucket (padded length) is
chosen from the global batch, so all processes agree on shapes without talking.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

from lmm_align.data.anyres import AnyresImageConfig, choose_tile_bucket, preprocess_anyres_image
from lmm_align.data.conversation import IGNORE_INDEX
from lmm_align.data.images import ImageProcessorConfig, preprocess_image
from lmm_align.models import anyres

ImageSource = Image.Image | Callable[[], Image.Image] | None


@dataclasses.dataclass
class Example:
  """One encoded training example. `image` is a PIL image, a loader, or None (text only);
  `image_size` its (height, width) when the reader knows it without decoding (anyres token
  counts need it up front; otherwise the image is loaded once to read it)."""

  record_id: str
  input_ids: np.ndarray
  labels: np.ndarray
  image: ImageSource = None
  image_size: tuple[int, int] | None = None


PACK_PLAN_PREFIX = "pack_plan."


@dataclasses.dataclass(frozen=True)
class AnyresTiling:
  """What anyres batching needs of the model and the data config.

  image_config: the processor (tiles, normalisation); packing: the model's packing (token
  counts, plans); tile_buckets: allowed tile counts per row (an image needing more is dropped,
  `dropped_too_many_tiles`); written_tokens: the placeholders a reader wrote per image (the
  model's single-tile `num_image_tokens`).
  """

  image_config: AnyresImageConfig
  packing: anyres.AnyresPackingConfig
  tile_buckets: tuple[int, ...]
  written_tokens: int

  def __post_init__(self):
    buckets = tuple(sorted(int(b) for b in self.tile_buckets))
    if not buckets or buckets[0] < 1:
      raise ValueError(f"data.tile_buckets {self.tile_buckets}: give positive tile counts")
    object.__setattr__(self, "tile_buckets", buckets)
    if self.image_config.tile_size != self.packing.tile_size:
      raise ValueError(
        f"the image processor cuts {self.image_config.tile_size}-pixel tiles, the vision tower "
        f"reads {self.packing.tile_size}"
      )

  def placeholders(
    self, image: ImageSource, image_size: tuple[int, int] | None
  ) -> tuple[tuple[int, int], int | None]:
    """(the image's (height, width), the placeholders its tiles pack into:
    `anyres.num_image_tokens`); the count is None when it needs more tiles than the largest
    tile bucket. The image is loaded only when `image_size` is not given."""
    if image_size is None:
      loaded = load_image(image)
      image_size = (loaded.height, loaded.width)
    size = (int(image_size[0]), int(image_size[1]))
    if anyres.num_tiles(size, self.packing) > self.tile_buckets[-1]:
      return size, None
    return size, anyres.num_image_tokens(size, self.packing)

  def tile_counts(self, image_sizes: np.ndarray) -> np.ndarray:
    """int32 [N]: the tiles of each (height, width) of image_sizes [N, 2]; 0 for (0, 0)."""
    return np.array(
      [anyres.num_tiles(tuple(s), self.packing) if s[0] else 0 for s in image_sizes], np.int32
    )


def load_image(image: ImageSource) -> Image.Image | None:
  return image() if callable(image) else image


def expand_image_placeholders(
  example: Example, written: int, needed: int, image_token_id: int
) -> Example:
  """The example with its one image's run of `written` placeholders replaced by `needed`
  (labels there stay IGNORE_INDEX). Raises ValueError naming the record otherwise."""
  is_image = example.input_ids == image_token_id
  where = np.flatnonzero(is_image)
  if len(where) != written or (written and where[-1] - where[0] + 1 != written):
    raise ValueError(
      f"record {example.record_id!r}: expected one run of {written} image placeholders "
      f"(id {image_token_id}), found {len(where)} at {where[:3].tolist()}..."
    )
  start = int(where[0])
  pad = lambda x, fill: np.concatenate(
    [x[:start], np.full(needed, fill, x.dtype), x[start + written :]]
  )
  return dataclasses.replace(
    example,
    input_ids=pad(example.input_ids, image_token_id),
    labels=pad(example.labels, IGNORE_INDEX),
  )


def anyres_batch_shapes(
  rows: int, length: int, tiles: int, tile_size: int
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """The image fields of an anyres batch of `rows` x `length` with `tiles` tiles per row:
  name -> (shape, dtype). The one statement of them, for the pipeline and for `lmm-align plan`."""
  plan = {
    "taps": ((rows, length, 2, 2), np.int32),
    "row_weights": ((rows, length, 2), np.float32),
    "col_weights": ((rows, length, 2), np.float32),
    "is_newline": ((rows, length), np.bool_),
    "valid": ((rows, length), np.bool_),
    "num_tokens": ((rows,), np.int32),
  }
  return {
    "pixel_values": ((rows, tiles, tile_size, tile_size, 3), np.float32),
    "image_sizes": ((rows, 2), np.int32),
    **{PACK_PLAN_PREFIX + k: v for k, v in plan.items()},
  }


def tiled_fields(
  images: Sequence[tuple[str, ImageSource]],
  image_sizes: np.ndarray,
  tiling: AnyresTiling,
  length: int,
  tiles: int,
) -> dict[str, np.ndarray]:
  """The fields of `anyres_batch_shapes` for rows of (record id, image or None) whose images
  have image_sizes int[rows, 2] ((0, 0): none): each image's tiles padded to `tiles`, its pack
  plan to `length` tokens. Raises ValueError naming the record whose image decodes to another
  size than the one its placeholders were counted for."""
  config = tiling.image_config
  shapes = anyres_batch_shapes(len(images), length, tiles, config.tile_size)
  pixels = np.zeros(*shapes["pixel_values"])
  for row, (record_id, image) in enumerate(images):
    if image is None:
      continue
    row_tiles, size = preprocess_anyres_image(load_image(image), config)
    if tuple(size) != tuple(image_sizes[row]):
      raise ValueError(
        f"record {record_id!r}: its image decodes to (height, width) {size}, its "
        f"header said {tuple(image_sizes[row])}"
      )
    pixels[row, : len(row_tiles)] = row_tiles
  plan = anyres.pack_plan(
    [tuple(s) if s[0] else None for s in image_sizes], tiling.packing, max_tokens=length
  )
  fields = {"pixel_values": pixels, "image_sizes": np.asarray(image_sizes, np.int32)}
  for key, value in plan.as_arrays().items():
    fields[PACK_PLAN_PREFIX + key] = value.astype(shapes[PACK_PLAN_PREFIX + key][1])
  return fields


def image_inputs(batch: dict[str, Any]) -> dict[str, Any]:
  """The model's image keyword arguments from a batch: pixel_values, and for an anyres batch
  the pack plan (image_sizes stay in the batch: under jit the plan carries what they say)."""
  out = {"pixel_values": batch.get("pixel_values")}
  plan = {k[len(PACK_PLAN_PREFIX) :]: v for k, v in batch.items() if k.startswith(PACK_PLAN_PREFIX)}
  if plan:
    out["pack_plan"] = plan
  return out


def apply_length_policy(
  example: Example, max_length: int, policy: str, image_token_id: int
) -> tuple[Example | None, str]:
  """Keeps an example within max_length: ('kept' | 'truncated' | a reason it was dropped).

  policy 'drop' drops long examples; 'truncate' cuts the tail (the answer), but never cuts
  into image placeholders and never keeps an example with no labelled token left.
  """
  n = len(example.input_ids)
  if n <= max_length:
    return example, "kept"
  if policy == "drop":
    return None, "dropped_too_long"
  if policy != "truncate":
    raise ValueError(f"data.length_policy {policy!r}: use 'drop' or 'truncate'")
  if np.any(example.input_ids[max_length:] == image_token_id):
    return None, "dropped_image_cut"
  labels = example.labels[:max_length]
  if not np.any(labels[1:] != IGNORE_INDEX):
    return None, "dropped_no_answer_left"
  return dataclasses.replace(
    example, input_ids=example.input_ids[:max_length], labels=labels
  ), "truncated"


def bucket_lengths(buckets: Sequence[int], max_length: int) -> tuple[int, ...]:
  """The padded lengths a dataset uses: the configured buckets up to max_length, and
  max_length itself as the last one."""
  kept = tuple(sorted(b for b in buckets if b <= max_length))
  return kept if kept and kept[-1] == max_length else (*kept, max_length)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
  for b in sorted(buckets):
    if length <= b:
      return b
  raise ValueError(f"length {length} exceeds the largest bucket {max(buckets)}")


class SupervisedData:
  """A finite list of examples served as global batches by step."""

  def __init__(
    self,
    examples: Sequence[Example],
    image_config: ImageProcessorConfig | None,
    *,
    max_length: int,
    buckets: Sequence[int],
    length_policy: str,
    image_token_id: int,
    pad_id: int,
    seed: int,
    skipped: Counter | None = None,
    tiling: AnyresTiling | None = None,
  ):
    """image_config: a single-image processor, or None (text only, or anyres: `tiling`)."""
    self.image_config = image_config
    self.tiling = tiling
    self.buckets = bucket_lengths(buckets, max_length)
    self.pad_id = pad_id
    self.seed = seed
    self.stats: Counter = Counter(skipped or {})
    kept, sizes = [], []
    for example in examples:
      size = (0, 0)
      if tiling is not None and example.image is not None:
        example, size = self._tiled(example, image_token_id)
        if example is None:
          continue
      example, outcome = apply_length_policy(example, max_length, length_policy, image_token_id)
      self.stats[outcome] += 1
      if example is not None:
        kept.append(example)
        sizes.append(size)
    if not kept:
      raise ValueError(f"no training example left after the length policy: {dict(self.stats)}")
    self.examples = kept
    self.lengths = np.array([len(e.input_ids) for e in kept])
    self.image_sizes = np.asarray(sizes, np.int32).reshape(-1, 2)
    self.tile_counts = (
      tiling.tile_counts(self.image_sizes) if tiling is not None else np.zeros(len(kept), np.int32)
    )

  def _tiled(self, example: Example, image_token_id: int) -> tuple[Example | None, tuple]:
    """(example with its placeholders counted for its tiles, (height, width)); None when its
    image needs more tiles than the largest bucket (counted as dropped_too_many_tiles)."""
    tiling = self.tiling
    size, needed = tiling.placeholders(example.image, example.image_size)
    if needed is None:
      self.stats["dropped_too_many_tiles"] += 1
      return None, size
    expanded = expand_image_placeholders(example, tiling.written_tokens, needed, image_token_id)
    return dataclasses.replace(expanded, image_size=size), size

  def __len__(self) -> int:
    return len(self.examples)

  def fingerprint(self) -> dict[str, Any]:
    """What a resumed run checks, so a checkpoint is not continued on different data."""
    return {"num_examples": len(self), "seed": self.seed, "total_tokens": int(self.lengths.sum())}

  def global_indices(self, step: int, global_batch: int) -> np.ndarray:
    per_epoch = len(self) // global_batch
    if per_epoch == 0:
      raise ValueError(
        f"global batch {global_batch} is larger than the dataset ({len(self)} examples)"
      )
    epoch, position = divmod(step, per_epoch)
    order = np.random.default_rng([self.seed, epoch]).permutation(len(self))
    return order[position * global_batch : (position + 1) * global_batch]

  def local_batch(
    self, step: int, global_batch: int, process_index: int = 0, process_count: int = 1
  ) -> dict[str, np.ndarray]:
    """This process's rows of the global batch of `step`, padded on the right to a bucket.

    Returns input_ids int32[L, T], labels int32[L, T] (-100 = no loss), attention_mask
    int32[L, T] and, when an image config is set, pixel_values float32[L, 1, H, W, 3]
    (zeros for text-only rows; their placeholders are absent); with anyres tiling instead the
    fields of `anyres_batch_shapes` (tiles: the smallest tile bucket holding the global batch).
    """
    if global_batch % process_count:
      raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
    indices = self.global_indices(step, global_batch)
    length = bucket_for(int(self.lengths[indices].max()), self.buckets)
    local = global_batch // process_count
    rows = indices[process_index * local : (process_index + 1) * local]
    ids = np.full((local, length), self.pad_id, np.int32)
    labels = np.full((local, length), IGNORE_INDEX, np.int32)
    mask = np.zeros((local, length), np.int32)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if self.image_config is not None:
      h, w = self.image_config.crop_size
      batch["pixel_values"] = np.zeros((local, 1, h, w, 3), np.float32)
    for row, index in enumerate(rows):
      example = self.examples[index]
      n = len(example.input_ids)
      ids[row, :n] = example.input_ids
      labels[row, :n] = example.labels
      mask[row, :n] = 1
      if example.image is not None and self.image_config is not None:
        batch["pixel_values"][row, 0] = preprocess_image(
          load_image(example.image), self.image_config
        )
    if self.tiling is not None:
      tiles = choose_tile_bucket(self.tile_counts[indices], self.tiling.tile_buckets)
      batch.update(self._tiled_fields(rows, length, tiles))
    return batch

  def _tiled_fields(self, rows: np.ndarray, length: int, tiles: int) -> dict[str, np.ndarray]:
    """pixel_values, image_sizes and the pack plan of these rows, padded to `tiles` and to
    `length` plan tokens."""
    images = [(self.examples[i].record_id, self.examples[i].image) for i in rows]
    return tiled_fields(images, self.image_sizes[rows], self.tiling, length, tiles)

  def iterate(
    self,
    start_step: int,
    global_batch: int,
    process_index: int = 0,
    process_count: int = 1,
    prefetch: int = 2,
  ) -> Iterator[dict[str, np.ndarray]]:
    """Batches from start_step on, built by a background thread so the device never waits."""
    out: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def produce():
      step = start_step
      try:
        while not stop.is_set():
          out.put(self.local_batch(step, global_batch, process_index, process_count))
          step += 1
      except Exception as error:  # surfaced in the consumer, never lost in the thread
        out.put(error)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
      while True:
        item = out.get()
        if isinstance(item, Exception):
          raise item
        yield item
    finally:
      stop.set()
      while not out.empty():
        out.get_nowait()
