"""Checkpoint atomicity and restore precedence."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from lmm_align import checkpoint


def _state(value: float):
  return {"w": jnp.full((4,), value), "step": jnp.asarray(int(value), jnp.int32)}


def test_half_written_checkpoint_is_never_restored(tmp_path):
  ckpt = checkpoint.Checkpointer.for_workdir(tmp_path, async_save=False)
  ckpt.save(3, _state(3.0), {"step": 3})
  ckpt.wait()
  # What a kill -9 during the save of step 5 leaves behind: orbax's uncommitted temp folder.
  (tmp_path / "checkpoints" / "5.orbax-checkpoint-tmp-1234" / "state").mkdir(parents=True)
  assert ckpt.latest_step() == 3
  fresh = checkpoint.Checkpointer.for_workdir(tmp_path, async_save=False)
  assert fresh.latest_step() == 3
  restored, data = fresh.restore(3, _state(0.0))
  np.testing.assert_array_equal(restored["w"], np.full(4, 3.0))
  assert data == {"step": 3}


def test_restore_precedence(tmp_path):
  other = tmp_path / "other"
  ckpt = checkpoint.Checkpointer.for_workdir(other, async_save=False)
  for step in (2, 4):
    ckpt.save(step, _state(float(step)), {"step": step})
  ckpt.wait()
  mine = checkpoint.Checkpointer.for_workdir(tmp_path / "mine", async_save=False)
  assert checkpoint.restore_precedence("w", "", "", mine) == ("scratch", None)
  assert checkpoint.restore_precedence("w", "", "/hf", mine) == ("init_from", "/hf")
  source, (directory, step) = checkpoint.restore_precedence("w", str(other), "/hf", mine)
  assert source == "resume" and step == 4 and directory.endswith("checkpoints")
  assert checkpoint.restore_precedence("w", f"{other}@2", "", mine)[1][1] == 2
  with pytest.raises(FileNotFoundError, match="step 3 not in"):
    checkpoint.restore_precedence("w", f"{other}@3", "", mine)
  mine.save(1, _state(1.0), {"step": 1})
  mine.wait()
  assert checkpoint.restore_precedence("w", str(other), "/hf", mine) == ("workdir", 1)


def test_a_relative_workdir_saves_and_restores(tmp_path, monkeypatch):
  # The README's commands pass relative workdirs; orbax itself refuses relative paths.
  monkeypatch.chdir(tmp_path)
  ckpt = checkpoint.Checkpointer.for_workdir("workdirs/run", async_save=False)
  assert ckpt.directory == str(tmp_path / "workdirs" / "run" / "checkpoints")
  ckpt.save(2, _state(2.0), {"step": 2})
  ckpt.wait()
  restored, _ = checkpoint.Checkpointer.for_workdir("workdirs/run", async_save=False).restore(
    2, _state(0.0)
  )
  np.testing.assert_array_equal(restored["w"], np.full(4, 2.0))
