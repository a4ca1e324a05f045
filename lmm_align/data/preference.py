"""Preference pairs (a prompt with an image, a chosen and a rejected answer) -> batches.

A batch keeps each pair's two sequences side by side, [L, 2, T] (index 0 chosen, 1
rejected), so a pair never straddles devices. Reference log-probs, when precomputed (the
RLAIF-V way: one pass of the frozen reference before training, halving the memory of every
step), ride along as `ref_logps` [L, 2]. Order and bucketing follow `SupervisedData`: the pairs
of step s are a pure function of (seed, s).

Anyres models (LLaVA-NeXT, LLaVA-OneVision; `pipeline.AnyresTiling`): both sequences of a pair
hold the same image, so its placeholder runs become the count its tiles pack into
(`anyres.num_image_tokens`) before the length limit, and the image is tiled once per pair: the
batch carries pixel_values [L, tiles, H, W, 3], image_sizes [L, 2] and the pack plan [L, T, ...]
per pair (`pipeline.anyres_batch_shapes` with L rows), not per sequence. `pair_image_inputs`
hands the model each image with `rows_per_image=2`, so the tower reads it once and its packed
features fill both sequences (half the tower's compute and activations of repeating it). Tile
counts come from `tile_buckets` (a pair needing more is dropped, `dropped_too_many_tiles`), so
a run compiles one step per (length, tiles) bucket.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from lmm_align.data import conversation, pipeline
from lmm_align.data.anyres import choose_tile_bucket
from lmm_align.data.conversation import IGNORE_INDEX
from lmm_align.data.images import ImageProcessorConfig, preprocess_image
from lmm_align.data.pipeline import ImageSource, SupervisedData, bucket_for, bucket_lengths


@dataclasses.dataclass
class PreferencePair:
  record_id: str
  chosen_ids: np.ndarray
  chosen_labels: np.ndarray
  rejected_ids: np.ndarray
  rejected_labels: np.ndarray
  image: ImageSource = None
  sft_weight: float = 1.0  # how much the DPO loss's SFT term imitates the chosen answer
  # Cached reference log-probs (chosen, rejected) from the data (RLAIF-V's `logps` column).
  ref_logps: tuple[float, float] | None = None
  # The image's (height, width) when the reader knows it without decoding (anyres counts).
  image_size: tuple[int, int] | None = None


class PreferenceError(ValueError):
  pass


def sft_weight_problem(value: Any) -> str | None:
  """What is wrong with a pair's "sft_weight" value (a number >= 0), or None."""
  if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
    return f"{value!r} is not a number >= 0"
  return None


def encode_pair(
  record: dict[str, Any], tokenizer: Any, template: str, num_image_tokens: int, image_token_id: int
) -> PreferencePair:
  """{"id", "image", "question", "chosen", "rejected"} -> a PreferencePair (loss masks on the
  answers only), with its optional "sft_weight" (a number >= 0, default 1), "history" (earlier
  turns, put before the question, as LLaVA-RLHF's multi-turn records have) and "ref_logps"
  ([chosen, rejected] cached reference log-probs). Refuses an empty answer, chosen ==
  rejected or a bad sft_weight, naming the record."""
  rid = record.get("id", "?")
  sft_weight = record.get("sft_weight", 1.0)
  if problem := sft_weight_problem(sft_weight):
    raise PreferenceError(f"preference record {rid!r}, field 'sft_weight': {problem}")
  for field in ("question", "chosen", "rejected"):
    if not isinstance(record.get(field), str) or not record[field].strip():
      raise PreferenceError(f"preference record {rid!r}, field {field!r}: empty or missing")
  if record["chosen"].strip() == record["rejected"].strip():
    raise PreferenceError(f"preference record {rid!r}: chosen and rejected are identical")
  tmpl = conversation.get_template(template)
  history = [dict(t) for t in record.get("history") or []]
  question = record["question"]
  placed = any(conversation.IMAGE_PLACEHOLDER in t.get("value", "") for t in history)
  placed = placed or conversation.IMAGE_PLACEHOLDER in question
  if record.get("image") is not None and not placed:
    if history:  # the image belongs to the dialogue's first question
      history[0]["value"] = conversation.IMAGE_PLACEHOLDER + "\n" + history[0]["value"]
    else:
      question = conversation.IMAGE_PLACEHOLDER + "\n" + question
  ref_logps = record.get("ref_logps")
  if ref_logps is not None:
    ref_logps = tuple(float(x) for x in ref_logps)
    if len(ref_logps) != 2 or not all(np.isfinite(ref_logps)):
      raise PreferenceError(
        f"preference record {rid!r}, field 'ref_logps': expected 2 finite numbers, got "
        f"{record['ref_logps']!r}"
      )
  encoded = []
  for field in ("chosen", "rejected"):
    turns = [
      *history,
      {"from": "human", "value": question},
      {"from": "gpt", "value": record[field]},
    ]
    encoded.append(
      conversation.encode_conversation(
        turns, tokenizer, tmpl, num_image_tokens, image_token_id, record_id=str(rid)
      )
    )
  pair = PreferencePair(
    str(rid),
    encoded[0].input_ids,
    encoded[0].labels,
    encoded[1].input_ids,
    encoded[1].labels,
    record.get("image"),
    float(sft_weight),
    ref_logps,
  )
  return compact_pair(pair)


def dense_token_weights(pair: PreferencePair, weight: float) -> tuple[np.ndarray, np.ndarray]:
  """RLHF-V's dense weights (DDPO, arXiv 2312.00849 eq. 5): answer tokens outside the longest
  common blocks of the two answers (the corrected / hallucinated segments) weigh `weight`
  (RLHF-V: 3.0), every other token 1. Aligned with each side's labels: float32 [T_c], [T_r]."""
  answers = []
  for ids, labels in (
    (pair.chosen_ids, pair.chosen_labels),
    (pair.rejected_ids, pair.rejected_labels),
  ):
    positions = np.nonzero(labels != IGNORE_INDEX)[0]
    answers.append((positions, ids[positions].tolist()))
  (pos_c, tok_c), (pos_r, tok_r) = answers
  weights = [np.ones(len(pair.chosen_ids), np.float32), np.ones(len(pair.rejected_ids), np.float32)]
  changed_c, changed_r = np.ones(len(tok_c), bool), np.ones(len(tok_r), bool)
  for block in difflib.SequenceMatcher(a=tok_c, b=tok_r, autojunk=False).get_matching_blocks():
    changed_c[block.a : block.a + block.size] = False
    changed_r[block.b : block.b + block.size] = False
  weights[0][pos_c[changed_c]] = weight
  weights[1][pos_r[changed_r]] = weight
  return weights[0], weights[1]


def compact_pair(pair: PreferencePair) -> PreferencePair:
  """The pair with its ids and labels as int16 when every value fits (LLaVA-1.5's 32k
  vocabulary does): half the host memory of int32, which matters because each sequence holds
  P image ids (576 for LLaVA-1.5: about 10 kB per pair in int32, 0.8 GB for RLAIF-V's 83k
  pairs). Batches are int32 whatever the pair holds. The encoders call it on each pair as
  they make it, so the int32 arrays are freed one pair at a time (the allocator reuses them)
  rather than all held at once beside their copies."""
  arrays = (pair.chosen_ids, pair.chosen_labels, pair.rejected_ids, pair.rejected_labels)
  if any(a.dtype == np.int16 for a in arrays):
    return pair
  info = np.iinfo(np.int16)
  if any(a.size and (a.min() < info.min or a.max() > info.max) for a in arrays):
    return pair
  ids_c, labels_c, ids_r, labels_r = (a.astype(np.int16) for a in arrays)
  return dataclasses.replace(
    pair, chosen_ids=ids_c, chosen_labels=labels_c, rejected_ids=ids_r, rejected_labels=labels_r
  )


def tile_pair(
  pair: PreferencePair, tiling: pipeline.AnyresTiling, image_token_id: int
) -> tuple[PreferencePair | None, tuple[int, int]]:
  """(the pair with both sequences' placeholder runs expanded to the count its image's tiles
  pack into, the image's (height, width)); the pair is None when the image needs more tiles
  than the largest of tile_buckets. Raises ValueError naming the record when a sequence does
  not hold one run of `tiling.written_tokens` placeholders."""
  size, needed = tiling.placeholders(pair.image, pair.image_size)
  if needed is None:
    return None, size
  sides = []
  for ids, labels in (
    (pair.chosen_ids, pair.chosen_labels),
    (pair.rejected_ids, pair.rejected_labels),
  ):
    example = pipeline.Example(pair.record_id, ids, labels)
    sides.append(
      pipeline.expand_image_placeholders(example, tiling.written_tokens, needed, image_token_id)
    )
  return dataclasses.replace(
    pair, chosen_ids=sides[0].input_ids, chosen_labels=sides[0].labels,
    rejected_ids=sides[1].input_ids, rejected_labels=sides[1].labels, image_size=size,
  ), size  # fmt: skip


def pair_image_inputs(batch: dict[str, Any]) -> dict[str, Any]:
  """The model's image keyword arguments for a pair batch's sequences flattened to [2L, T]
  (pair-major: rows 2i and 2i + 1 are pair i's chosen and rejected). Single-image batches:
  pixel_values [2L, 1, H, W, 3]; anyres batches: each pair's tiles [L, tiles, H, W, 3] and pack
  plan with rows_per_image=2 (encoded once for both sequences); text only: pixel_values None."""
  inputs = pipeline.image_inputs(batch)
  if "pack_plan" in inputs:
    return {**inputs, "rows_per_image": 2}
  pixels = inputs["pixel_values"]
  return {"pixel_values": None if pixels is None else pixels.reshape(-1, *pixels.shape[2:])}


class PreferenceData:
  """Encoded pairs served as global batches by step; optional cached reference log-probs."""

  def __init__(
    self,
    pairs: Sequence[PreferencePair],
    image_config: ImageProcessorConfig | None,
    *,
    max_length: int,
    buckets: Sequence[int],
    pad_id: int,
    seed: int,
    skipped: Counter | None = None,
    token_weight: float = 1.0,
    tiling: pipeline.AnyresTiling | None = None,
    image_token_id: int | None = None,
  ):
    """image_config: a single-image processor, or None (text only, or anyres: `tiling`, which
    needs the model's image_token_id to find the placeholders)."""
    if tiling is not None and (image_config is not None or image_token_id is None):
      raise ValueError("anyres pairs take tiling and image_token_id, and no image_config")
    self.stats: Counter = Counter(skipped or {})
    kept, sizes = [], []
    for pair in pairs:
      size = (0, 0)
      if tiling is not None and pair.image is not None:
        pair, size = tile_pair(pair, tiling, image_token_id)
        if pair is None:
          self.stats["dropped_too_many_tiles"] += 1
          continue
      if max(len(pair.chosen_ids), len(pair.rejected_ids)) > max_length:
        self.stats["dropped_too_long"] += 1
      else:
        kept.append(pair)
        sizes.append(size)
        self.stats["kept"] += 1
    if not kept:
      raise ValueError(f"no preference pair left after the length limit: {dict(self.stats)}")
    self.pairs = kept
    self.image_config = image_config
    self.tiling = tiling
    self.image_sizes = np.asarray(sizes, np.int32).reshape(-1, 2)
    self.tile_counts = (
      tiling.tile_counts(self.image_sizes) if tiling is not None else np.zeros(len(kept), np.int32)
    )
    self.buckets = bucket_lengths(buckets, max_length)
    self.pad_id = pad_id
    self.seed = seed
    self.lengths = np.array([max(len(p.chosen_ids), len(p.rejected_ids)) for p in kept])
    # [N, 2]: cached in the data when every pair has them, else once `set_reference_logps` ran.
    self.ref_logps: np.ndarray | None = None
    if all(p.ref_logps is not None for p in kept):
      self.ref_logps = np.asarray([p.ref_logps for p in kept], np.float32)
    # RLHF-V dense weights, only when they differ from 1 (the batch then has token_weights).
    self.token_weights = (
      [dense_token_weights(p, token_weight) for p in kept] if token_weight != 1.0 else None
    )
    # Per-pair SFT weights, only when some differ from 1 (the batch then has sft_weights).
    sft_weights = np.asarray([p.sft_weight for p in kept], np.float32)
    self.sft_weights = sft_weights if np.any(sft_weights != 1.0) else None

  def __len__(self) -> int:
    return len(self.pairs)

  def fingerprint(self) -> dict[str, Any]:
    return {"num_pairs": len(self), "seed": self.seed, "total_tokens": int(self.lengths.sum())}

  global_indices = SupervisedData.global_indices

  def set_reference_logps(self, ref_logps: np.ndarray) -> None:
    if ref_logps.shape != (len(self), 2):
      raise ValueError(f"reference log-probs {ref_logps.shape} do not match {len(self)} pairs")
    self.ref_logps = ref_logps

  def rows(
    self, indices: np.ndarray, length: int | None = None, tiles: int | None = None
  ) -> dict[str, np.ndarray]:
    """The batch arrays for the given pairs, padded on the right to `length` (default: bucket).

    input_ids, labels, attention_mask int32 [L, 2, T]; pair_index int32 [L]; pixel_values
    float32 [L, 2, 1, H, W, 3] with a single-image processor; with anyres tiling instead the
    per-pair fields of `pipeline.anyres_batch_shapes` (L rows, `tiles` tiles: default the
    smallest tile bucket holding these pairs); ref_logps [L, 2], sft_weights [L] and
    token_weights [L, 2, T] when the data has them.
    """
    if length is None:
      length = bucket_for(int(self.lengths[indices].max()), self.buckets)
    n = len(indices)
    ids = np.full((n, 2, length), self.pad_id, np.int32)
    labels = np.full((n, 2, length), IGNORE_INDEX, np.int32)
    mask = np.zeros((n, 2, length), np.int32)
    batch = {
      "input_ids": ids,
      "labels": labels,
      "attention_mask": mask,
      "pair_index": np.asarray(indices, np.int32),
    }
    if self.image_config is not None:
      h, w = self.image_config.crop_size
      batch["pixel_values"] = np.zeros((n, 2, 1, h, w, 3), np.float32)
    if self.ref_logps is not None:
      batch["ref_logps"] = self.ref_logps[indices].astype(np.float32)
    if self.sft_weights is not None:
      batch["sft_weights"] = self.sft_weights[indices]
    if self.token_weights is not None:
      batch["token_weights"] = np.ones((n, 2, length), np.float32)
      for row, index in enumerate(indices):
        for side, w in enumerate(self.token_weights[index]):
          batch["token_weights"][row, side, : len(w)] = w
    for row, index in enumerate(indices):
      pair = self.pairs[index]
      for side, (seq, lab) in enumerate(
        [(pair.chosen_ids, pair.chosen_labels), (pair.rejected_ids, pair.rejected_labels)]
      ):
        ids[row, side, : len(seq)] = seq
        labels[row, side, : len(seq)] = lab
        mask[row, side, : len(seq)] = 1
      if pair.image is not None and self.image_config is not None:
        image = pair.image() if callable(pair.image) else pair.image
        batch["pixel_values"][row, :, 0] = preprocess_image(image, self.image_config)
    if self.tiling is not None:
      if tiles is None:
        tiles = choose_tile_bucket(self.tile_counts[indices], self.tiling.tile_buckets)
      images = [(self.pairs[i].record_id, self.pairs[i].image) for i in indices]
      batch.update(
        pipeline.tiled_fields(images, self.image_sizes[indices], self.tiling, length, tiles)
      )
    return batch

  def local_batch(
    self, step: int, global_batch: int, process_index: int = 0, process_count: int = 1
  ) -> dict[str, np.ndarray]:
    indices = self.global_indices(step, global_batch)
    length = bucket_for(int(self.lengths[indices].max()), self.buckets)
    tiles = None  # the global batch's bucket, so that every process has the same shapes
    if self.tiling is not None:
      tiles = choose_tile_bucket(self.tile_counts[indices], self.tiling.tile_buckets)
    local = global_batch // process_count
    return self.rows(indices[process_index * local : (process_index + 1) * local], length, tiles)

  iterate = SupervisedData.iterate
