"""Preference pairs (a prompt with an image, a chosen and a rejected answer) -> batches.

A batch keeps each pair's two sequences side by side, [L, 2, T] (index 0 chosen, 1
rejected), so a pair never straddles devices. Reference log-probs, when precomputed (the
RLAIF-V way: one pass of the frozen reference before training, halving the memory of every
step), ride along as `ref_logps` [L, 2]. Order and bucketing follow `SupervisedData`: the pairs
of step s are a pure function of (seed, s).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from lmm_align.data import conversation
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
  ):
    self.stats: Counter = Counter(skipped or {})
    kept = []
    for pair in pairs:
      if max(len(pair.chosen_ids), len(pair.rejected_ids)) > max_length:
        self.stats["dropped_too_long"] += 1
      else:
        kept.append(pair)
        self.stats["kept"] += 1
    if not kept:
      raise ValueError(f"no preference pair left after the length limit: {dict(self.stats)}")
    self.pairs = kept
    self.image_config = image_config
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

  def rows(self, indices: np.ndarray, length: int | None = None) -> dict[str, np.ndarray]:
    """The batch arrays for the given pairs, padded on the right to `length` (default: bucket)."""
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
    return batch

  def local_batch(
    self, step: int, global_batch: int, process_index: int = 0, process_count: int = 1
  ) -> dict[str, np.ndarray]:
    indices = self.global_indices(step, global_batch)
    length = bucket_for(int(self.lengths[indices].max()), self.buckets)
    local = global_batch // process_count
    return self.rows(indices[process_index * local : (process_index + 1) * local], length)

  iterate = SupervisedData.iterate
