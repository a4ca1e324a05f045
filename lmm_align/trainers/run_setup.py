"""The setup every trainer runs first, written once, in one order:

  config -> workdir config.json -> mesh and logical rules -> tokenizer -> model config ->
  checkpointer and restore precedence -> initial params and the LoRA split -> (the trainer
  builds its state) -> restore -> data fingerprint check -> the jitted step.

A trainer calls `start_run`, builds its own state from `split_params` (the reward model adds a
head, PPO a value model), then `restore_state` and `jit_step`. Restore precedence is
`checkpoint.restore_precedence`'s: the workdir's own checkpoint, then config.resume, then
config.init_from, then the seed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from lmm_align import checkpoint, run_config, sharding
from lmm_align.data import sources
from lmm_align.models.config import ModelConfig
from lmm_align.models.llava import Llava
from lmm_align.trainers import loop, modelling
from lmm_align.trainers import state as state_lib


@dataclasses.dataclass
class RunSetup:
  """A run's config, mesh, tokenizer, model config, checkpointer and restore source.

  source / where: `checkpoint.restore_precedence`'s answer ('workdir', step), ('resume',
  (dir, step)), ('init_from', path) or ('scratch', None).
  """

  config: ml_collections.ConfigDict
  workdir: str
  mesh: Mesh
  rules: tuple[tuple[str, Any], ...]
  tokenizer: Any
  model_config: ModelConfig
  checkpointer: checkpoint.Checkpointer
  source: str
  where: Any

  @property
  def restores(self) -> bool:
    """Whether the run continues a checkpoint (its own, or config.resume's)."""
    return self.source in ("workdir", "resume")

  def activation_sharding(self):
    """The context every array of the run is created and traced in."""
    return sharding.activation_sharding(self.mesh, self.rules)


def start_run(config: ml_collections.ConfigDict, workdir: str) -> RunSetup:
  """Writes workdir/config.json and builds what every trainer needs before its state."""
  loop.write_config(config, workdir)
  mesh = sharding.mesh_from_config(config.mesh)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  tokenizer = sources.tokenizer_for(config, workdir)
  model_config = run_config.model_config_for(config, tokenizer)
  checkpointer = checkpoint.Checkpointer.for_workdir(workdir, keep=config.keep_checkpoints)
  source, where = checkpoint.restore_precedence(
    workdir, config.resume, config.init_from, checkpointer
  )
  return RunSetup(
    config, workdir, mesh, rules, tokenizer, model_config, checkpointer, source, where
  )


@dataclasses.dataclass
class SplitParams:
  """The starting params and the trainable / frozen split.

  initial: the model's params as loaded (init_from) or initialised (the seed);
  trained: what the optimizer updates (the params, or fresh LoRA adapters);
  base: the frozen LoRA base (`initial`), or None for a full fine-tune.
  """

  initial: Any
  trained: Any
  trained_shardings: Any
  base: Any
  base_shardings: Any


def split_params(run: RunSetup, model: Llava, source: str | None = None, seed_offset: int = 0):
  """`model`'s starting params for `source` (default: the run's) and their LoRA split; the
  adapters are drawn from config.seed + seed_offset."""
  config = run.config
  shardings = state_lib.param_shardings(model, run.mesh, run.rules)
  initial = modelling.initial_params(model, config, source or run.source, None, shardings)
  trained, trained_shardings, base, base_shardings = modelling.with_lora_split(
    model, initial, shardings, run.mesh, run.rules, jax.random.key(config.seed + seed_offset)
  )
  return SplitParams(initial, trained, trained_shardings, base, base_shardings)


def restore_state(
  run: RunSetup, state: Any, state_shardings: Any, fingerprint: dict[str, Any]
) -> tuple[Any, dict[str, Any]]:
  """(state, data state): the workdir's or config.resume's checkpoint restored into `state`'s
  shardings and checked against the data's fingerprint, or `state` as built (step 0)."""
  if not run.restores:
    return state, {"step": 0, **fingerprint}
  state, saved = checkpoint.restore_from(
    run.source, run.where, run.checkpointer, checkpoint.abstract_like(state, state_shardings)
  )
  modelling.check_data_fingerprint(saved, fingerprint, run.source)
  return state, saved


def jit_step(
  step_fn: Callable,
  state_shardings: Any,
  mesh: Mesh,
  frozen: Any = None,
  frozen_shardings: Any = None,
  drop_keys: Collection[str] = (),
) -> Callable[[Any, dict], tuple[Any, dict]]:
  """(state, batch) -> (state, metrics): `step_fn(state, batch, frozen)` jitted once
  (`state.jit_train_step`: explicit shardings, the state donated), the frozen params bound,
  and host-only batch fields (`drop_keys`, e.g. a pair's index) left out of the device call."""
  jitted = state_lib.jit_train_step(
    lambda s, b, f: step_fn(s, b, f), state_shardings, mesh, frozen_shardings
  )
  return lambda s, b: jitted(s, {k: v for k, v in b.items() if k not in drop_keys}, frozen)
