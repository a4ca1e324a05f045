"""Encoded examples -> deterministic, bucketed, per-process batches for supervised training.

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

from lmm_align.data.conversation import IGNORE_INDEX
from lmm_align.data.images import ImageProcessorConfig, preprocess_image

ImageSource = Image.Image | Callable[[], Image.Image] | None


@dataclasses.dataclass
class Example:
  """One encoded training example. `image` is a PIL image, a loader, or None (text only)."""

  record_id: str
  input_ids: np.ndarray
  labels: np.ndarray
  image: ImageSource = None


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
  ):
    self.image_config = image_config
    self.buckets = bucket_lengths(buckets, max_length)
    self.pad_id = pad_id
    self.seed = seed
    self.stats: Counter = Counter(skipped or {})
    kept = []
    for example in examples:
      example, outcome = apply_length_policy(example, max_length, length_policy, image_token_id)
      self.stats[outcome] += 1
      if example is not None:
        kept.append(example)
    if not kept:
      raise ValueError(f"no training example left after the length policy: {dict(self.stats)}")
    self.examples = kept
    self.lengths = np.array([len(e.input_ids) for e in kept])

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
    (zeros for text-only rows; their placeholders are absent).
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
        image = example.image() if callable(example.image) else example.image
        batch["pixel_values"][row, 0] = preprocess_image(image, self.image_config)
    return batch

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
