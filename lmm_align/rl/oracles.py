"""Oracle rewards by name: a reward read off the ground truth an RL prompt carries, to put in
the reward model's place (PPO's `ppo.reward_source=NAME`: an upper bound that tells a weak
reward model from a failing optimiser) or to log beside it (`monitor`).

  @oracles.register("scene", fields=("scene",), monitor=True)
  def scene_scores(prompts, texts, ppo_config) -> np.ndarray: ...

An oracle scores R decoded responses `texts` to `prompts` (one per response: objects with
`record_id`, `caption_type` and `truth`, the prompt record's fields that some oracle names in
its `fields`), reading its knobs from PPO's config section; it returns float32 [R]. Plugins
register theirs (the shapes world: "scene", against each prompt's scene); a lookup loads the
plugins first (`lmm_align.plugins`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import ml_collections
import numpy as np

from lmm_align import plugins


class OraclePrompt(Protocol):
  """What an oracle reads of an RL prompt (PPO's `Prompt` is one)."""

  record_id: str
  caption_type: int  # `rl.rewards` answer type: GENERAL, YES_IN_YESNO, ...
  truth: Mapping[str, Any]  # the record's fields the oracles name, e.g. {"scene": {...}}


# (prompts [R], texts [R], ppo config) -> float32 scores [R]
ScoreFn = Callable[[Sequence[OraclePrompt], Sequence[str], ml_collections.ConfigDict], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Oracle:
  """score: the reward; fields: the prompt record fields it reads (a prompt without one cannot
  be scored); monitor: whether PPO logs it beside a reward model when the prompts carry them."""

  name: str
  score: ScoreFn
  fields: tuple[str, ...] = ()
  monitor: bool = False


_ORACLES: dict[str, Oracle] = {}


def register(
  name: str, *, fields: Sequence[str] = (), monitor: bool = False
) -> Callable[[ScoreFn], ScoreFn]:
  """Decorator: registers `score` as oracle `name`."""

  def decorate(score: ScoreFn) -> ScoreFn:
    oracle = Oracle(name, score, tuple(fields), monitor)
    if name in _ORACLES and _ORACLES[name] != oracle:
      raise ValueError(f"an oracle named {name!r} is already registered")
    _ORACLES[name] = oracle
    return score

  return decorate


def names() -> tuple[str, ...]:
  """The registered oracles (plugins' included), sorted."""
  plugins.load()
  return tuple(sorted(_ORACLES))


def get(name: str) -> Oracle:
  if name not in _ORACLES:
    plugins.load()
  if name not in _ORACLES:
    raise ValueError(f"no oracle named {name!r}: use one of {list(names())}")
  return _ORACLES[name]


def all_oracles() -> list[Oracle]:
  """Every registered oracle, in registration order."""
  plugins.load()
  return list(_ORACLES.values())


def score(
  oracle: Oracle,
  prompts: Sequence[OraclePrompt],
  texts: Sequence[str],
  config: ml_collections.ConfigDict,
) -> np.ndarray:
  """oracle's scores of `texts` [R], float32 [R]; a prompt without one of its fields is an
  error naming the prompt and the field."""
  for p in prompts:
    for field in oracle.fields:
      if p.truth.get(field) is None:
        raise ValueError(f"RL prompt {p.record_id!r} has no {field} for oracle {oracle.name!r}")
  out = np.asarray(oracle.score(prompts, texts, config), np.float32)
  if out.shape != (len(texts),):
    raise ValueError(f"oracle {oracle.name!r} returned shape {out.shape} for {len(texts)} texts")
  return out


def monitor_for(prompts: Sequence[OraclePrompt]) -> Oracle | None:
  """The oracle PPO logs beside a reward model: the first registered monitor whose fields
  every prompt carries, or None."""
  for oracle in all_oracles():
    if oracle.monitor and all(p.truth.get(f) is not None for p in prompts for f in oracle.fields):
      return oracle
  return None


def monitor(
  oracle: Oracle,
  prompts: Sequence[OraclePrompt],
  texts: Sequence[str],
  rm_scores: np.ndarray,
  config: ml_collections.ConfigDict,
  group_size: int = 1,
) -> dict[str, float]:
  """The ground truth beside a reward model's scores [R]. Logged, never optimised (NAME is the
  oracle's):
    reward/NAME           its mean score; it falls while reward/rm rises when the RM is
                          exploited
    reward/rm_NAME_corr   Pearson's r of the two over the batch (0 when either is constant)
    reward/rm_pair_agreement  with several samples per prompt (consecutive rows of
                          `group_size`): of the same-prompt pairs the oracle orders, the share
                          the RM orders the same way, the ranking that PPO's update acts on
                          (ties in the RM count as disagreement)"""
  truth = score(oracle, prompts, texts, config)
  rm = np.asarray(rm_scores, np.float64)
  both_vary = truth.std() > 0 and rm.std() > 0
  corr = float(np.corrcoef(rm, truth)[0, 1]) if both_vary else 0.0
  out = {f"reward/{oracle.name}": float(truth.mean()), f"reward/rm_{oracle.name}_corr": corr}
  if group_size > 1:
    counts = [
      same_order_pairs(truth[start : start + group_size], rm[start : start + group_size])
      for start in range(0, len(truth), group_size)
    ]
    agree, ordered = sum(a for a, _ in counts), sum(o for _, o in counts)
    out["reward/rm_pair_agreement"] = agree / ordered if ordered else float("nan")
  return out


def same_order_pairs(truth: np.ndarray, rm: np.ndarray) -> tuple[int, int]:
  """(pairs the RM orders as the truth does, pairs the truth orders) among one prompt's
  samples; a tie in the RM counts as disagreement."""
  truth, rm = np.asarray(truth, np.float64), np.asarray(rm, np.float64)
  i, j = np.triu_indices(len(truth), 1)
  decided = truth[i] != truth[j]
  agree = ((rm[i] - rm[j]) * (truth[i] - truth[j]) > 0)[decided]
  return int(agree.sum()), int(decided.sum())
