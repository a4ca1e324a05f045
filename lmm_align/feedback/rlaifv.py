"""RLAIF-V divide-and-conquer feedback: candidates -> claims -> questions -> labels -> pairs.

The chain (Yu et al., RLAIF-V, arXiv 2405.17220; the published `pair_construction`,
`get_preference_pairs` and `get_pairs_filter_shorten` scripts):

1. `label_candidates`: each response is split into atomic claims, each claim becomes a yes/no
   question, and the labeler answers every question about the image (`claims.py`,
   `labeler.py`). Per response it writes the claims, questions, p_yes/p_no and

     score(response) = sum_c [p_yes(c) > p_no(c)] - n_claims = -(# claims with p_no >= p_yes)

   to JSONL, prompt by prompt, resumable like the candidate file.
2. `build_preference_pairs`: within one prompt (same image and question), every unordered
   pair of scored responses whose scores differ by at least `min_score_gap` (1) is a pair,
   the higher score chosen. Pairs are dropped when either response's judged-question count
   differs from its claim count (published: the judge dict is keyed by question text, so a
   repeated question or a question list of another length shows up as a mismatch), when
   either response is empty, or when the two texts are identical. At most
   `pairs_per_prompt` (2) pairs per prompt are kept, drawn with a generator seeded by (seed,
   prompt id). Responses with no claims are never paired: published RLAIF-V has no judge
   entry, hence no score, for them.
3. `length_balance_filter`, exactly as published: for r in np.arange(0, 1, 0.02), keep the
   pairs with (len_rej - len_ch) / len_rej <= r (word counts, `str.split`) whose texts
   differ after `strip`, and pick the r that minimises |mean len_ch - mean len_rej| / mean
   len_rej over the kept pairs (the first such r on ties, as pandas' idxmin). Without it
   DPO learns that shorter is better, since a shorter answer makes fewer claims to reject.
   A ratio that keeps no pair is skipped (the published script would divide by zero).

Output pair records: {"id", "image", "question", "chosen", "rejected", "chosen_score",
"rejected_score"}, the fields the DPO data path reads plus the two scores.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from lmm_align.data import images
from lmm_align.data.jsonl import append_jsonl, resume_jsonl
from lmm_align.feedback.claims import ClaimSplitter, QuestionMaker
from lmm_align.feedback.labeler import YesNoScores

LENGTH_RATIOS = np.arange(0, 1, 0.02)  # the published sweep, float values and all


class Labeler(Protocol):
  def score(self, questions: Sequence[str], images: Sequence[Any]) -> YesNoScores: ...


# --------------------------------------------------------------------------------------------
# Scores.
# --------------------------------------------------------------------------------------------


def claim_rejected(
  p_yes: Sequence[float], p_no: Sequence[float], margin: float = 0.0
) -> list[bool]:
  """Per claim: the labeler rejects it, log p_no - log p_yes >= margin. RLAIF-V's rule is
  margin 0 (p_no >= p_yes; a tie is a rejection); a margin > 0 rejects only claims the labeler
  doubts by that much, for a labeler that says "no" too readily."""
  scale = math.exp(margin)
  return [bool(n >= y * scale) for y, n in zip(p_yes, p_no, strict=True)]


def response_score(p_yes: Sequence[float], p_no: Sequence[float], margin: float = 0.0) -> int:
  """-(number of rejected claims): 0 for a response whose every claim is supported."""
  return -sum(claim_rejected(p_yes, p_no, margin))


# --------------------------------------------------------------------------------------------
# Labelling candidates.
# --------------------------------------------------------------------------------------------


def _group_by_prompt(candidates: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
  groups: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
  for c in candidates:
    groups[str(c["prompt_id"])].append(c)
  for pid, group in groups.items():
    if len({(c["question"], c.get("image")) for c in group}) != 1:
      raise ValueError(f"candidates of prompt {pid!r} disagree on the question or image")
    if len({c["id"] for c in group}) != len(group):
      raise ValueError(f"candidates of prompt {pid!r} repeat an id")
  return groups


def _labelled_record(
  candidate: dict[str, Any],
  claims: list[str] | None,
  questions: list[str] | None,
  scores: YesNoScores | None,
  reject_margin: float = 0.0,
) -> dict[str, Any]:
  """One response's feedback; `status` says why a response has no score."""
  status = "ok"
  if claims is None:
    status = "split_failed"
  elif not claims:
    status = "no_claims"
  elif questions is None:
    status = "questions_failed"
  labelled = status == "ok"
  p_yes = [float(x) for x in scores.p_yes] if labelled else []
  p_no = [float(x) for x in scores.p_no] if labelled else []
  rejected = claim_rejected(p_yes, p_no, reject_margin)
  return {
    "id": candidate["id"],
    "prompt_id": str(candidate["prompt_id"]),
    "question": candidate["question"],
    "image": candidate.get("image"),
    "response": candidate["response"],
    "claims": claims,
    "questions": questions,
    "p_yes": p_yes,
    "p_no": p_no,
    "claim_rejected": rejected,
    "num_claims": len(claims or []),
    "num_judged": len(set(questions)) if labelled else 0,
    "score": -sum(rejected) if labelled else None,  # response_score's rule
    "status": status,
  }


def _label_chunk(
  candidates: list[dict[str, Any]],
  splitter: ClaimSplitter,
  question_maker: QuestionMaker,
  labeler: Labeler,
  load_image: Callable[[str], Any],
  reject_margin: float = 0.0,
) -> list[dict[str, Any]]:
  """Feedback for a chunk of candidates: one batch per stage (splitter, questions, labeler)."""
  claims = splitter.split([(c["question"], c["response"]) for c in candidates])
  if len(claims) != len(candidates):
    raise ValueError(f"the splitter returned {len(claims)} claim lists for {len(candidates)}")
  questions = question_maker.questions([c or [] for c in claims])
  if len(questions) != len(candidates):
    raise ValueError(f"the question maker returned {len(questions)} lists for {len(candidates)}")
  loaded = {}
  flat_questions, flat_images, owners = [], [], []
  for i, (c, cl, qs) in enumerate(zip(candidates, claims, questions)):
    if not cl or qs is None:
      continue
    ref = c.get("image")
    if ref is not None and ref not in loaded:
      loaded[ref] = load_image(ref)  # once per image: the labeler preprocesses it once too
    flat_questions += qs
    flat_images += [None if ref is None else loaded[ref]] * len(qs)
    owners += [i] * len(qs)
  empty = YesNoScores(np.zeros((0,), np.float32), np.zeros((0,), np.float32))
  scores = labeler.score(flat_questions, flat_images) if flat_questions else empty
  owners = np.asarray(owners, np.int64)
  out = []
  for i, c in enumerate(candidates):
    mine = owners == i
    own = YesNoScores(scores.p_yes[mine], scores.p_no[mine])
    out.append(_labelled_record(c, claims[i], questions[i], own, reject_margin))
  return out


def label_candidates(
  candidates: Sequence[dict[str, Any]],
  splitter: ClaimSplitter,
  question_maker: QuestionMaker,
  labeler: Labeler,
  output_path: str | os.PathLike,
  *,
  load_image: Callable[[str], Any] = images.load_image,
  prompts_per_chunk: int = 8,
  reject_margin: float = 0.0,
) -> list[dict[str, Any]]:
  """Runs the divide-and-conquer chain over candidate records into `output_path` (JSONL).

  Candidates (see `candidates.py`) are grouped by prompt; `prompts_per_chunk` prompts go
  through each stage as one batch. Every prompt's records are written together, so a rerun
  skips the prompts already labelled (all their candidate ids present) and relabels the rest.
  Returns the labelled records of `candidates`, in their order. `reject_margin`: see
  `claim_rejected`.
  """
  if prompts_per_chunk < 1:
    raise ValueError(f"prompts_per_chunk={prompts_per_chunk} must be >= 1")
  groups = _group_by_prompt(candidates)

  def is_complete(pid: str, records: list[dict[str, Any]], where: str) -> bool:
    del where  # labelled records hold no run settings that could clash
    wanted = {c["id"] for c in groups.get(pid, [])}
    return not wanted or {r.get("id") for r in records} == wanted

  done = resume_jsonl(output_path, "prompt_id", is_complete)
  todo = [pid for pid in groups if pid not in done]
  with open(output_path, "a", encoding="utf-8") as f:
    for start in range(0, len(todo), prompts_per_chunk):
      chunk = todo[start : start + prompts_per_chunk]
      records = _label_chunk(
        [c for pid in chunk for c in groups[pid]], splitter, question_maker, labeler,
        load_image, reject_margin,
      )  # fmt: skip
      for pid in chunk:
        done[pid] = [r for r in records if r["prompt_id"] == pid]
        append_jsonl(f, done[pid])
  by_id = {r["id"]: r for pid in groups for r in done[pid]}
  return [by_id[c["id"]] for c in candidates]


# --------------------------------------------------------------------------------------------
# Pairs.
# --------------------------------------------------------------------------------------------


def _prompt_rng(seed: int, prompt_id: str) -> np.random.Generator:
  digest = hashlib.sha256(prompt_id.encode("utf-8")).digest()
  return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def _claim_count_mismatch(record: dict[str, Any]) -> bool:
  return record["num_judged"] != record["num_claims"]


def _prompt_pairs(
  group: list[dict[str, Any]], min_score_gap: int, stats: collections.Counter
) -> list[dict[str, Any]]:
  """Every admissible (chosen, rejected) pair among one prompt's scored responses."""
  scored = [r for r in group if r["status"] == "ok"]
  stats["responses_unscored"] += len(group) - len(scored)
  pairs = []
  for a, b in itertools.combinations(scored, 2):
    gap = a["score"] - b["score"]
    if abs(gap) < min_score_gap:
      stats["pairs_small_gap"] += 1
      continue
    chosen, rejected = (a, b) if gap > 0 else (b, a)
    if _claim_count_mismatch(chosen) or _claim_count_mismatch(rejected):
      stats["pairs_claim_count_mismatch"] += 1
    elif not chosen["response"].strip() or not rejected["response"].strip():
      stats["pairs_empty_response"] += 1
    elif chosen["response"].strip() == rejected["response"].strip():
      stats["pairs_identical"] += 1
    else:
      pairs.append(
        {
          "id": f"{chosen['id']}|{rejected['id']}",
          "image": chosen["image"],
          "question": chosen["question"],
          "chosen": chosen["response"],
          "rejected": rejected["response"],
          "chosen_score": chosen["score"],
          "rejected_score": rejected["score"],
        }
      )
  return pairs


def length_balance_filter(
  pairs: Sequence[dict[str, Any]], ratios: Sequence[float] = LENGTH_RATIOS
) -> tuple[list[dict[str, Any]], float | None]:
  """Published RLAIF-V length balancing: (kept pairs, the chosen ratio r; None if none kept).

  For each r, a pair is kept iff (len_rej - len_ch) / len_rej <= r and its texts differ
  after strip; r minimises |mean len_ch - mean len_rej| / mean len_rej over the kept pairs.
  Lengths are whitespace word counts. A rejected response must have at least one word.
  """
  if not pairs:
    return [], None
  chosen_len = np.asarray([len(p["chosen"].split()) for p in pairs], np.float64)
  rejected_len = np.asarray([len(p["rejected"].split()) for p in pairs], np.float64)
  if np.any(rejected_len == 0):
    bad = pairs[int(np.argmax(rejected_len == 0))]
    raise ValueError(f"pair {bad.get('id')!r}: field 'rejected' has no words")
  shortening = (rejected_len - chosen_len) / rejected_len
  distinct = np.asarray([p["chosen"].strip() != p["rejected"].strip() for p in pairs])
  best_ratio, best_keep, best_gap = None, None, np.inf
  for ratio in ratios:
    keep = distinct & (shortening <= ratio)
    if not keep.any():
      continue
    mean_chosen = chosen_len[keep].sum() / keep.sum()
    mean_rejected = rejected_len[keep].sum() / keep.sum()
    gap = abs(mean_chosen - mean_rejected) / mean_rejected
    if gap < best_gap:
      best_ratio, best_keep, best_gap = float(ratio), keep, gap
  if best_keep is None:
    return [], None
  return [p for p, k in zip(pairs, best_keep) if k], best_ratio


def build_preference_pairs(
  labelled: Sequence[dict[str, Any]],
  *,
  min_score_gap: int = 1,
  pairs_per_prompt: int | None = 2,
  seed: int = 0,
  balance_lengths: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Preference pairs from labelled responses: (pairs, stats with every drop counted).

  pairs_per_prompt: at most this many pairs per prompt (None: all), drawn without
  replacement by a generator seeded with (seed, prompt id), kept in their pairing order.
  stats["length_ratio"] is the ratio the length filter picked (None when off or no pair).
  """
  if min_score_gap < 1:
    raise ValueError(f"min_score_gap={min_score_gap} must be >= 1 (pairs need a preference)")
  groups: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
  for r in labelled:
    groups[str(r["prompt_id"])].append(r)
  stats: collections.Counter = collections.Counter()
  pairs = []
  for pid, group in groups.items():
    found = _prompt_pairs(group, min_score_gap, stats)
    if pairs_per_prompt is not None and len(found) > pairs_per_prompt:
      picked = np.sort(_prompt_rng(seed, pid).choice(len(found), pairs_per_prompt, replace=False))
      stats["pairs_over_cap"] += len(found) - pairs_per_prompt
      found = [found[i] for i in picked]
    pairs += found
  ratio = None
  if balance_lengths:
    before = len(pairs)
    pairs, ratio = length_balance_filter(pairs)
    stats["pairs_length_filtered"] += before - len(pairs)
  return pairs, {**stats, "pairs": len(pairs), "prompts": len(groups), "length_ratio": ratio}


def write_preference_pairs(path: str | os.PathLike, pairs: Sequence[dict[str, Any]]) -> None:
  """Pairs as JSONL, one record per line."""
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(p) + "\n" for p in pairs)
