"""What the iterative loop's rounds draw on, by name: feedback kinds and round prompt writers.

  feedback kind   config.feedback.kind: scores each candidate of a round into labelled.jsonl
                  (`label(config, policy, candidates, prompts_dir, out_path)`), and names the
                  pairing method its scores suit (`pair_method`: "rlaifv", "best_worst",
                  "correction"). The loop registers its built-in kinds (rlaifv, self, critic:
                  `trainers.iterative`); plugins add theirs (the shapes world: ground_truth,
                  correction, which score against each prompt's scene).
  round prompts   config.prompts.source, when a plugin writes a round's prompts itself
                  (`write(config, round_index, out) -> records`; the shapes world: "shapes",
                  new scenes each round, with their ground truth) and may annotate the round's
                  pairs from it (`annotate_pairs(pairs, prompts_dir) -> diagnostic`). Any other
                  source is a "prompts" source of `data.registry`, drawn per round by the loop.

A lookup loads the plugins first (`lmm_align.plugins`).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from lmm_align import plugins

PAIR_METHODS = ("rlaifv", "best_worst", "correction")

# (config, policy loader, candidates, prompts_dir, out_path) -> None: writes out_path, one
# record per candidate with at least {"id", "prompt_id", "question", "image", "response",
# "score" (None: unscored), "status"}; for pair method "rlaifv" also "num_claims" and
# "num_judged", for "correction" "hallucinated" and "correction" (`trainers.iterative`).
LabelFn = Callable[
  [ml_collections.ConfigDict, Callable[[], Any], Sequence[dict[str, Any]], pathlib.Path,
   pathlib.Path],
  None,
]  # fmt: skip
# (config, round_index, out) -> the round's prompt records {"id", "question", "image" (relative
# to out, or an absolute path), ...}, images written under out.
WriteFn = Callable[[ml_collections.ConfigDict, int, pathlib.Path], list[dict[str, Any]]]
# (pairs, prompts_dir) -> a diagnostic of the pairs against the prompts' ground truth (or None);
# may add fields to the pairs (e.g. the facts a fact-augmented reward model reads).
AnnotateFn = Callable[[list[dict[str, Any]], pathlib.Path], Any]


@dataclasses.dataclass(frozen=True)
class FeedbackKind:
  """label: the scores; pair_method: the pairing `pairs.method=auto` picks for them;
  prompt_sources: the round prompt sources it can score (empty: any), e.g. ("shapes",) for a
  kind that reads each prompt's scene."""

  name: str
  label: LabelFn
  pair_method: str
  prompt_sources: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class RoundPrompts:
  name: str
  write: WriteFn
  annotate_pairs: AnnotateFn | None = None


_KINDS: dict[str, FeedbackKind] = {}
_PROMPTS: dict[str, RoundPrompts] = {}


def register_kind(
  name: str, *, pair_method: str, prompt_sources: Sequence[str] = ()
) -> Callable[[LabelFn], LabelFn]:
  """Decorator: registers `label` as feedback kind `name`."""
  if pair_method not in PAIR_METHODS:
    raise ValueError(
      f"feedback kind {name!r}: pair_method {pair_method!r} is not in {PAIR_METHODS}"
    )

  def decorate(label: LabelFn) -> LabelFn:
    kind = FeedbackKind(name, label, pair_method, tuple(prompt_sources))
    if name in _KINDS and _KINDS[name] != kind:
      raise ValueError(f"a feedback kind named {name!r} is already registered")
    _KINDS[name] = kind
    return label

  return decorate


def kind_names() -> tuple[str, ...]:
  """The registered feedback kinds (plugins' included), sorted."""
  plugins.load()
  return tuple(sorted(_KINDS))


def get_kind(name: str) -> FeedbackKind:
  if name not in _KINDS:
    plugins.load()
  if name not in _KINDS:
    raise ValueError(f"feedback.kind {name!r}: use one of {list(kind_names())}")
  return _KINDS[name]


def register_prompts(
  name: str, *, annotate_pairs: AnnotateFn | None = None
) -> Callable[[WriteFn], WriteFn]:
  """Decorator: registers `write` as round prompt source `name`."""

  def decorate(write: WriteFn) -> WriteFn:
    entry = RoundPrompts(name, write, annotate_pairs)
    if name in _PROMPTS and _PROMPTS[name] != entry:
      raise ValueError(f"a round prompt source named {name!r} is already registered")
    _PROMPTS[name] = entry
    return write

  return decorate


def round_prompts(name: str) -> RoundPrompts | None:
  """The round prompt writer registered as `name`, or None (a `data.registry` source)."""
  if name not in _PROMPTS:
    plugins.load()
  return _PROMPTS.get(name)


def round_prompt_names() -> tuple[str, ...]:
  plugins.load()
  return tuple(sorted(_PROMPTS))
