"""Mesh construction and logical rules."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from lmm_align import sharding
from lmm_align.models import Llava, get_variant
from lmm_align.models.config import LoraConfig
from lmm_align.models.llava import dummy_inputs


def test_mesh_shape_fills_one_axis():
  assert sharding.mesh_shape((-1, 2, 1), 8) == (4, 2, 1)
  assert sharding.mesh_shape((2, 2, 2), 8) == (2, 2, 2)
  with pytest.raises(ValueError, match="at most one"):
    sharding.mesh_shape((-1, -1, 2), 8)
  with pytest.raises(ValueError, match="do not divide"):
    sharding.mesh_shape((-1, 3, 1), 8)
  with pytest.raises(ValueError, match="use 4 devices"):
    sharding.mesh_shape((2, 2, 1), 8)


def test_make_mesh_axes():
  mesh = sharding.make_mesh((2, 2, 2))
  assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.devices.shape == (2, 2, 2)
  assert sharding.data_parallel_size(mesh) == 4


def test_a_logical_name_without_rule_is_an_error():
  config = get_variant("tiny", lora=LoraConfig(rank=2))
  boxed = jax.eval_shape(Llava(config).init, jax.random.key(0), *dummy_inputs(config))
  rules = [r for r in sharding.DEFAULT_RULES if r[0] != "mlp"]
  with pytest.raises(ValueError, match="'mlp'"):
    sharding.logical_shardings(boxed["params"], sharding.make_mesh((2, 2, 2)), rules)
  lora_shardings = sharding.logical_shardings(
    boxed["lora"], sharding.make_mesh((2, 2, 2)), sharding.DEFAULT_RULES
  )
  a = lora_shardings["language_model"]["layers"]["q_proj"]["a"]
  assert a.spec == jax.sharding.PartitionSpec(None, "fsdp", None)


def test_global_batch_from_local_is_batch_sharded():
  mesh = sharding.make_mesh((2, 2, 2))
  batch = sharding.global_batch_from_local({"x": np.arange(16).reshape(8, 2)}, mesh)
  assert batch["x"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
  np.testing.assert_array_equal(np.asarray(batch["x"]), np.arange(16).reshape(8, 2))
