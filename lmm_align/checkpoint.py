"""Orbax checkpoints of the training state, and the restore precedence every trainer follows.

A checkpoint holds the train state pytree (params or only the trainable subset, optimizer
state, step, RNG) and, as JSON, the data iterator position. Orbax writes each step to a
temporary directory and renames it on commit, so a half-written checkpoint (a kill -9 during
the save) is never listed, never restored.

Restore precedence (automatic, `restore_precedence`):
  1. the workdir's own latest checkpoint (a restarted or preempted run continues);
  2. `config.resume`: another run's checkpoint directory (optionally `DIR@STEP`);
  3. `config.init_from`: weights only, e.g. an HF folder (the trainer loads it);
  4. scratch.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


class Checkpointer:
  """Periodic, keep-N, optionally async orbax checkpoints in `<workdir>/checkpoints`."""

  def __init__(self, directory: str | os.PathLike, keep: int = 2, async_save: bool = True):
    directory = str(directory)
    # Orbax refuses relative paths; a cloud path (gs://...) is already absolute.
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save, save_interval_steps=1
    )
    self._manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=("state", "data")
    )

  @classmethod
  def for_workdir(cls, workdir: str | os.PathLike, **kwargs: Any) -> Checkpointer:
    return cls(os.path.join(str(workdir), CHECKPOINT_DIR), **kwargs)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict, force: bool = False) -> bool:
    """Starts a save of step (async); returns whether one was started."""
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
    )
    return self._manager.save(step, args=args, force=force)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """The state at step, placed as `abstract_state` (ShapeDtypeStructs with shardings) says."""
    args = ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
    )
    restored = self._manager.restore(step, args=args)
    return restored["state"], dict(restored["data"])

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def parse_resume(resume: str) -> tuple[str, int | None]:
  """'DIR' or 'DIR@STEP' -> (checkpoint directory, step or None for latest). DIR may be a
  workdir (its checkpoints/ subfolder is used) or a checkpoints directory."""
  path, _, step = resume.partition("@")
  if (pathlib.Path(path) / CHECKPOINT_DIR).is_dir():
    path = str(pathlib.Path(path) / CHECKPOINT_DIR)
  return path, int(step) if step else None


def restore_precedence(
  workdir: str, resume: str, init_from: str, checkpointer: Checkpointer
) -> tuple[str, Any]:
  """Which source a run starts from: ('workdir', step), ('resume', (dir, step)),
  ('init_from', path) or ('scratch', None)."""
  step = checkpointer.latest_step()
  if step is not None:
    return "workdir", step
  if resume:
    directory, resume_step = parse_resume(resume)
    other = Checkpointer(directory, async_save=False)
    steps = other.all_steps()
    if not steps:
      raise FileNotFoundError(f"config.resume={resume!r}: no committed checkpoint in {directory}")
    if resume_step is not None and resume_step not in steps:
      raise FileNotFoundError(f"config.resume={resume!r}: step {resume_step} not in {steps}")
    return "resume", (directory, resume_step if resume_step is not None else max(steps))
  if init_from:
    return "init_from", init_from
  return "scratch", None


def restore_from(
  source: str, where: Any, checkpointer: Checkpointer, abstract_state: Any
) -> tuple[Any, dict]:
  """Restores for the 'workdir' or 'resume' sources of `restore_precedence`."""
  if source == "workdir":
    return checkpointer.restore(where, abstract_state)
  directory, step = where
  other = Checkpointer(directory, async_save=False)
  try:
    return other.restore(step, abstract_state)
  finally:
    other.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying shardings, the restore target orbax places arrays by."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )
