"""Reward-model filtering of SFT data: score every record, keep the best-scored fraction.

LLaVA-RLHF (§3.7) asks whether its reward model is better used to *filter* the SFT data than
to drive RL: score each instruction-following record with the RM, keep the top x%, fine-tune
on those. This module does the filtering step:

  scorer = RewardModelRecordScorer(load_reward_model(RM_DIR), tokenizer, image_config)
  result = filter_llava_json("mix.json", "images/", "kept.json", scorer, keep_fraction=0.5,
                             captions_path="image_to_caption.json")

It writes `kept.json` (the kept records exactly as read, in file order: their image paths stay
relative to the same image folder) and `kept.scores.jsonl` beside it (one line per scored
record: index, id, score, kept), and returns the counts (records, scored, kept,
skipped_<reason>). `filter_records` does the same for in-memory records (a world's generated
SFT records, PIL images in memory), writing them with `llava_json.save_llava_dataset`.

What is scored (`rounds`):
  "first"  the first human turn and the answer after it, alone: the RM reads
           `question + answer + evaluation request`, as it reads a single-turn PPO rollout.
           The default: every record is judged on the same kind of input, and one round is
           what the RM was trained on for most preference data.
  "whole"  the whole conversation: earlier rounds as history, then the last question and the
           last answer, which the RM judges (the way it reads multi-turn preference records).

Facts (for a fact-augmented RM): a record's own "facts" field (a list of strings), else, for
a file, LLaVA-RLHF's `image_to_caption.json` under the record's image path as written, and for
in-memory records what `facts_from(record)` gives (a world's facts of the record's scene, such
as the shapes world's `record_facts`). A record's facts are shuffled by
`default_rng([fact_seed, index])`, so its score does not depend on the other records.

Selection: k = floor(keep_fraction * scored + 1/2) records (round half up) with the highest
scores; ties at the cut keep the earlier record. Records that cannot be scored (the checks of
`llava_json.validate_record`, a missing or unreadable image, no facts where the RM needs them)
raise a `DataError` naming the file, the record (position and id) and the field, or with
on_error="skip" are dropped and counted as skipped_<reason>; the fraction is then of the
records scored. Scorers are plain functions of a block of `ScoredTurns`, so tests (and other
judges) can stand in for the reward model.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import math
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from lmm_align.data import reward_data
from lmm_align.data.conversation import GPT, HUMAN
from lmm_align.data.images import ImageProcessorConfig, preprocess_image
from lmm_align.data.llava_json import (
  ProblemLog,
  RecordProblem,
  check_image_file,
  check_image_mode,
  read_json_records,
  save_llava_dataset,
  validate_record,
)
from lmm_align.data.preference_sources import ImageFile, RecordIssue, load_captions

if TYPE_CHECKING:
  from lmm_align.hf.reward import RewardModel

logger = logging.getLogger(__name__)

ROUNDS = ("first", "whole")
DEFAULT_BLOCK_SIZE = 1024
MEMORY_SOURCE = "in-memory records"


@dataclasses.dataclass(frozen=True)
class ScoredTurns:
  """What a scorer reads of one record.

  index: the record's position in its source (names it in errors, seeds its fact order).
  history: earlier (human, gpt) turns ([] for rounds="first").
  question, answer: the human turn and the answer being judged.
  image: a PIL image, a zero-argument loader of one, or None.
  facts: captions of the image, or None when not needed or not known.
  """

  index: int
  record_id: str
  history: list[dict[str, str]]
  question: str
  answer: str
  image: Any
  facts: list[str] | None


# One score per item of a block; higher is better.
RecordScorer = Callable[[Sequence[ScoredTurns]], np.ndarray]


@dataclasses.dataclass(frozen=True)
class FilterResult:
  """scored: source positions of the scored records; scores: their scores (same order);
  kept: positions of the kept records, ascending; counts: records, scored, kept,
  skipped_<reason>; json_path, scores_path: what was written."""

  scored: np.ndarray
  scores: np.ndarray
  kept: np.ndarray
  counts: dict[str, int]
  json_path: pathlib.Path
  scores_path: pathlib.Path


# --------------------------------------------------------------------------------------------
# Selection.
# --------------------------------------------------------------------------------------------


def keep_count(num_records: int, keep_fraction: float) -> int:
  """floor(keep_fraction * num_records + 1/2): the fraction rounded half up."""
  if not 0.0 < keep_fraction <= 1.0:
    raise ValueError(f"keep_fraction={keep_fraction} must be in (0, 1]")
  return min(num_records, math.floor(keep_fraction * num_records + 0.5))


def top_fraction(scores: np.ndarray, keep_fraction: float) -> np.ndarray:
  """Positions (ascending) of the `keep_count` highest scores; ties keep the earlier one."""
  scores = np.asarray(scores, np.float64)
  if np.isnan(scores).any():
    raise ValueError(f"NaN scores at positions {np.flatnonzero(np.isnan(scores)).tolist()}")
  order = np.argsort(-scores, kind="stable")
  return np.sort(order[: keep_count(len(scores), keep_fraction)])


# --------------------------------------------------------------------------------------------
# Records -> what the scorer reads.
# --------------------------------------------------------------------------------------------


def scoring_turns(
  conversations: Sequence[Mapping[str, Any]], rounds: str
) -> tuple[list[dict[str, str]], str, str]:
  """(history, question, answer) of a LLaVA conversation under `rounds` (ROUNDS).

  A leading non-human turn is ignored, as LLaVA's training code ignores it. Raises RecordIssue
  (field 'conversations') when the judged round is not a human turn followed by an answer.
  """
  if rounds not in ROUNDS:
    raise ValueError(f"rounds={rounds!r}: use one of {ROUNDS}")
  humans = [i for i, t in enumerate(conversations) if t.get("from") == HUMAN]
  if not humans:
    raise RecordIssue("conversations", "bad_conversations", "no human turn")
  start = humans[0]
  asked = start if rounds == "first" else humans[-1]
  if asked + 1 >= len(conversations) or conversations[asked + 1].get("from") != GPT:
    raise RecordIssue(
      "conversations", "bad_conversations", f"turn {asked} (human) is not followed by an answer"
    )
  history = [dict(t) for t in conversations[start:asked]]
  return history, conversations[asked]["value"], conversations[asked + 1]["value"]


def _checked_facts(value: Any, where: str) -> list[str]:
  if not isinstance(value, list) or not value:
    raise RecordIssue("facts", "bad_facts", f"{where}: expected a non-empty list of strings")
  if any(not isinstance(f, str) or not f.strip() for f in value):
    raise RecordIssue("facts", "bad_facts", f"{where}: an empty or non-string fact")
  return list(value)


def _json_facts(
  raw: Mapping[str, Any], captions: Mapping[str, Any] | None, captions_source: str
) -> list[str]:
  """The record's "facts", else captions[image as written]; RecordIssue when there are none."""
  if "facts" in raw:
    return _checked_facts(raw["facts"], "the record's facts")
  image = raw.get("image")
  key = image[0] if isinstance(image, list) and len(image) == 1 else image
  if captions is None or not isinstance(key, str):
    raise RecordIssue(
      "facts", "missing_facts",
      "no facts (no 'facts' field, and no captions file or no image to look up) but the reward "
      "model is fact-augmented",
    )  # fmt: skip
  if key not in captions:
    raise RecordIssue("image", "missing_facts", f"no captions under {key!r} in {captions_source}")
  return _checked_facts(captions[key], f"{captions_source}[{key!r}]")


def _json_item(
  raw: Any, index: int, image_folder: Any, rounds: str, facts_from: Callable | None, mode: str
) -> ScoredTurns:
  record = validate_record(raw, image_folder, check_turns=True)
  history, question, answer = scoring_turns(record.conversations, rounds)
  facts = None if facts_from is None else facts_from(raw)
  if record.image is not None and (problem := check_image_file(record.image, mode)):
    raise problem
  image = None if record.image is None else ImageFile(record.image)
  return ScoredTurns(index, record.record_id, history, question, answer, image, facts)


def _memory_item(
  record: Mapping[str, Any],
  index: int,
  rounds: str,
  need_facts: bool,
  facts_from: Callable[[Mapping[str, Any]], list[str]] | None,
) -> ScoredTurns:
  history, question, answer = scoring_turns(record["conversations"], rounds)
  facts = None
  if need_facts:
    if "facts" in record:
      facts = _checked_facts(record["facts"], "the record's facts")
    elif facts_from is not None:  # may raise a RecordIssue naming what the record lacks
      facts = _checked_facts(facts_from(record), "the facts of the record")
    else:
      raise RecordIssue(
        "facts", "missing_facts",
        "no facts (no 'facts' field and no facts_from) but the reward model is fact-augmented",
      )  # fmt: skip
  image = record.get("image")
  return ScoredTurns(index, str(record["id"]), history, question, answer, image, facts)


# --------------------------------------------------------------------------------------------
# Scoring.
# --------------------------------------------------------------------------------------------


def _pixels(image: Any, config: ImageProcessorConfig) -> np.ndarray:
  return preprocess_image(image() if callable(image) else image, config)


class RewardModelRecordScorer:
  """A `RecordScorer` that runs an exported reward model on each record's judged round.

  rm: the reward model; tokenizer: its tokenizer; image_config: its image preprocessing
  (`inference.image_config_from_folder(RM_DIR)`); template: the conversation template the RM
  was trained with; fact_seed: seeds each record's fact order with its index; batch_size,
  buckets: the fixed-shape chunks of `best_of_n.score_rows_in_chunks`.
  """

  def __init__(
    self,
    rm: RewardModel,
    tokenizer: Any,
    image_config: ImageProcessorConfig | None,
    *,
    template: str = "vicuna_v1",
    fact_seed: int = 0,
    batch_size: int = 8,
    buckets: Sequence[int] | None = None,
    lead_in: str | None = None,
  ):
    self.rm, self.tokenizer, self.image_config = rm, tokenizer, image_config
    self.template = reward_data.chat_template(template)
    self.fact_seed, self.batch_size, self.buckets, self.lead_in = (
      fact_seed, batch_size, buckets, rm.fact_lead_in if lead_in is None else lead_in,
    )  # fmt: skip
    self.fact_augmented = rm.fact_augmented

  def encode(self, item: ScoredTurns) -> list[int]:
    """Token ids of conversation + answer + evaluation request; errors name the record."""
    config = self.rm.model.config
    try:
      question, suffix = reward_data.reward_texts(
        item.question, self.rm.prompt, item.facts,
        np.random.default_rng([self.fact_seed, item.index]),
        fact_augmented=self.rm.fact_augmented, facts_position=self.rm.facts_position,
        lead_in=self.lead_in,
      )  # fmt: skip
      ids = reward_data.encode_reward_sequence(
        question, item.answer, self.tokenizer, self.template, config.num_image_tokens,
        config.image_token_id, suffix, item.image is not None, history=item.history,
      )  # fmt: skip
    except ValueError as e:
      raise ValueError(f"record {item.index} (id {item.record_id!r}): {e}") from e
    return ids.tolist()

  def __call__(self, items: Sequence[ScoredTurns]) -> np.ndarray:
    # Imported here: it brings in the trainers (jitted RM forward), which reading, checking and
    # selecting records do not need.
    from lmm_align.rl.best_of_n import reward_model_scores

    rows = [self.encode(item) for item in items]
    if any(item.image is not None for item in items) and self.image_config is None:
      raise ValueError("records with images need the reward model's image_config")
    pixels = [
      None if item.image is None else functools.partial(_pixels, item.image, self.image_config)
      for item in items
    ]
    return reward_model_scores(
      self.rm, rows, pixels, pad_id=self.tokenizer.pad_token_id, batch_size=self.batch_size,
      buckets=self.buckets,
    )  # fmt: skip


def score_items(
  items: Sequence[ScoredTurns], scorer: RecordScorer, block_size: int = DEFAULT_BLOCK_SIZE
) -> np.ndarray:
  """scorer over blocks of `block_size` items (bounded memory): float64 [len(items)]."""
  out = np.zeros(len(items), np.float64)
  for start in range(0, len(items), block_size):
    block = items[start : start + block_size]
    scores = np.asarray(scorer(block), np.float64)
    if scores.shape != (len(block),):
      raise ValueError(f"the scorer returned shape {scores.shape} for {len(block)} records")
    for item, score in zip(block, scores):
      if np.isnan(score):
        raise ValueError(f"record {item.index} (id {item.record_id!r}): the score is NaN")
    out[start : start + len(block)] = scores
  return out


# --------------------------------------------------------------------------------------------
# Filtering and writing.
# --------------------------------------------------------------------------------------------


def _collect(make_item, sources: Sequence[Any], problems: ProblemLog) -> list[ScoredTurns]:
  """make_item(source, index) for each source; problems raised or counted by `problems`."""
  items = []
  for index, source in enumerate(sources):
    try:
      items.append(make_item(source, index))
    except (RecordIssue, RecordProblem) as problem:
      if problem.record_id is None and isinstance(source, Mapping) and "id" in source:
        problem.record_id = str(source["id"])
      problems.report(problem, index)
  return items


def _select_and_write_scores(
  items: list[ScoredTurns],
  scorer: RecordScorer,
  keep_fraction: float,
  block_size: int,
  scores_path: pathlib.Path,
  total: int,
  skipped: collections.Counter,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
  keep_count(len(items), keep_fraction)  # a bad fraction fails before any scoring
  scores = score_items(items, scorer, block_size)
  chosen = top_fraction(scores, keep_fraction)
  positions = np.array([item.index for item in items], np.int64)
  kept_set = set(chosen.tolist())
  scores_path.parent.mkdir(parents=True, exist_ok=True)
  with open(scores_path, "w", encoding="utf-8") as f:
    for i, item in enumerate(items):
      line = {"index": item.index, "id": item.record_id, "score": float(scores[i]),
              "kept": i in kept_set}  # fmt: skip
      f.write(json.dumps(line) + "\n")
  counts = {"records": total, "scored": len(items), "kept": len(chosen), **skipped}
  logger.info("reward filter: %s -> %s", counts, scores_path)
  return positions, scores, positions[chosen], counts


def scores_path_for(out_path: str | os.PathLike) -> pathlib.Path:
  """kept.json -> kept.scores.jsonl, beside it."""
  out = pathlib.Path(out_path)
  return out.with_name(out.stem + ".scores.jsonl")


def filter_llava_json(
  json_path: str | os.PathLike,
  image_folder: str | os.PathLike | None,
  out_path: str | os.PathLike,
  scorer: RecordScorer,
  *,
  keep_fraction: float,
  rounds: str = "first",
  captions_path: str | os.PathLike | None = None,
  require_facts: bool | None = None,
  on_error: str = "raise",
  check_images: bool | str = "verify",
  block_size: int = DEFAULT_BLOCK_SIZE,
) -> FilterResult:
  """Scores a LLaVA instruction file and writes its top `keep_fraction` as a new JSON array.

  Args:
    json_path, image_folder: as `llava_json.read_llava_json` takes.
    out_path: the kept records' JSON; the scores go to `scores_path_for(out_path)`.
    scorer: scores blocks of `ScoredTurns` (e.g. `RewardModelRecordScorer`).
    keep_fraction: in (0, 1]; see the module docstring for the rounding.
    rounds: "first" or "whole" (module docstring).
    captions_path: LLaVA-RLHF's image_to_caption.json, for records without a "facts" field.
    require_facts: records need facts (default: the scorer's `fact_augmented`, else False).
    on_error: "raise" the first bad record as a DataError, or "skip" and count it.
    check_images: as read_llava_json ("verify" by default: the RM opens every image anyway).
    block_size: records per scorer call.
  """
  if require_facts is None:
    require_facts = bool(getattr(scorer, "fact_augmented", False))
  source = os.fspath(json_path)
  mode = check_image_mode(check_images)
  facts_from = None
  if require_facts:
    captions = None if captions_path is None else load_captions(captions_path)
    captions_source = "" if captions_path is None else os.fspath(captions_path)
    facts_from = functools.partial(_json_facts, captions=captions, captions_source=captions_source)
  raw_records = read_json_records(json_path)
  problems = ProblemLog(source, on_error)
  items = _collect(
    lambda raw, i: _json_item(raw, i, image_folder, rounds, facts_from, mode), raw_records,
    problems,
  )  # fmt: skip
  problems.log_summary(len(raw_records))
  out = pathlib.Path(out_path)
  scored, scores, kept, counts = _select_and_write_scores(
    items, scorer, keep_fraction, block_size, scores_path_for(out), len(raw_records),
    problems.skipped,
  )  # fmt: skip
  out.write_text(json.dumps([raw_records[i] for i in kept], indent=1, ensure_ascii=False))
  return FilterResult(scored, scores, kept, counts, out, scores_path_for(out))


def filter_records(
  records: Sequence[Mapping[str, Any]],
  out_dir: str | os.PathLike,
  scorer: RecordScorer,
  *,
  keep_fraction: float,
  rounds: str = "first",
  facts_from: Callable[[Mapping[str, Any]], list[str]] | None = None,
  require_facts: bool | None = None,
  on_error: str = "raise",
  name: str = "data.json",
  block_size: int = DEFAULT_BLOCK_SIZE,
) -> FilterResult:
  """`filter_llava_json` for in-memory records: {"id", "image" (PIL or None), "conversations",
  ...}, as a world generates them.

  Facts (when required) are a record's "facts" field, else `facts_from(record)`, which may
  raise a RecordIssue naming the field it lacks. The kept records are written by
  `llava_json.save_llava_dataset(kept, out_dir, name)` (JSON + PNGs under out_dir/images),
  their scores to `scores_path_for(out_dir / name)`.
  """
  if require_facts is None:
    require_facts = bool(getattr(scorer, "fact_augmented", False))
  problems = ProblemLog(MEMORY_SOURCE, on_error)
  items = _collect(
    lambda record, i: _memory_item(record, i, rounds, require_facts, facts_from), records,
    problems,
  )  # fmt: skip
  problems.log_summary(len(records))
  out = pathlib.Path(out_dir) / name
  scored, scores, kept, counts = _select_and_write_scores(
    items, scorer, keep_fraction, block_size, scores_path_for(out), len(records),
    problems.skipped,
  )  # fmt: skip
  save_llava_dataset([dict(records[i]) for i in kept], out_dir, name)
  return FilterResult(scored, scores, kept, counts, out, scores_path_for(out))
