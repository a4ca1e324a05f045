"""Trainers by name: what `lmm-align train` runs for config.trainer and what `lmm-align
export` writes of its workdir.

A trainer module registers itself at import (`register(Trainer(...))`); the built-in ones are
imported the first time their name is asked for, so a command imports only the trainer it
runs. A new algorithm is one module and one registration; nothing else changes.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import ml_collections

from lmm_align import plugins

# Built-in trainers: imported on first use (see `get`).
BUILTIN = {
  "sft": "lmm_align.trainers.sft",
  "dpo": "lmm_align.trainers.dpo",
  "reward": "lmm_align.trainers.reward",
  "ppo": "lmm_align.trainers.ppo",
  "iterative": "lmm_align.trainers.iterative",
}

TrainFn = Callable[[ml_collections.ConfigDict, str], dict[str, Any]]
# (config, workdir, model) -> (trained params, frozen LoRA base or None, step) of the policy
# the run's latest checkpoint holds, on one device.
RestorePolicyFn = Callable[[ml_collections.ConfigDict, str, Any], tuple[Any, Any, int]]
# (workdir, out, peft) -> out: writes the export itself (a model that is not a policy).
ExportFn = Callable[[str, str, bool], str]


@dataclasses.dataclass(frozen=True)
class Trainer:
  """A trainer: `train(config, workdir) -> summary`, and what its export writes.

  restore_policy: the policy an export writes as an HF LLaVA folder (LoRA merged, or as a
    PEFT adapter), or None;
  export: a trainer whose export is not a policy writes it itself (the reward model: backbone
    plus head), or None. A trainer with neither cannot be exported.
  """

  name: str
  train: TrainFn
  restore_policy: RestorePolicyFn | None = None
  export: ExportFn | None = None


_TRAINERS: dict[str, Trainer] = {}


def register(trainer: Trainer) -> Trainer:
  if trainer.name in _TRAINERS and _TRAINERS[trainer.name] != trainer:
    raise ValueError(f"a trainer named {trainer.name!r} is already registered")
  _TRAINERS[trainer.name] = trainer
  return trainer


def get(name: str) -> Trainer:
  """The trainer registered as `name` (config.trainer)."""
  if name not in _TRAINERS and name in BUILTIN:
    importlib.import_module(BUILTIN[name])
  if name not in _TRAINERS:
    plugins.load()
  if name not in _TRAINERS:
    known = sorted(set(BUILTIN) | set(_TRAINERS))
    raise ValueError(f"config.trainer={name!r} is not a registered trainer: {', '.join(known)}")
  return _TRAINERS[name]
