"""Device meshes, logical axis rules and the helpers that turn them into shardings.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with params sharded, ZeRO-3
style) and `tensor` (Megatron-style model parallel over heads / mlp / vocab). Params carry
logical names (models/layers.py); a config's rules map each name to mesh axes. A logical name
that no rule covers is an error, so a new parameter is never silently replicated.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axes). Weights: fsdp shards the model dimension, tensor shards heads,
# mlp and vocab. Activations: batch over data x fsdp.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
  ("activation_batch", ("data", "fsdp")),
  ("activation_length", None),
  ("activation_embed", None),
  ("activation_mlp", "tensor"),
  ("activation_heads", "tensor"),
  ("activation_kv_heads", "tensor"),
  ("activation_vocab", "tensor"),
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("kv", None),
  ("vocab", "tensor"),
  ("norm", None),
  ("layers", None),
  ("lora_rank", None),
)


def initialize_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> None:
  """The one guarded wrapper of `jax.distributed.initialize`.

  On Cloud TPU all arguments are discovered from the environment; on CPU/GPU clusters pass them
  (or set LMM_ALIGN_COORDINATOR / LMM_ALIGN_NUM_PROCESSES / LMM_ALIGN_PROCESS_ID). A single
  process with no coordinator does nothing, so local runs need no setup.
  """
  coordinator_address = coordinator_address or os.environ.get("LMM_ALIGN_COORDINATOR")
  if num_processes is None and "LMM_ALIGN_NUM_PROCESSES" in os.environ:
    num_processes = int(os.environ["LMM_ALIGN_NUM_PROCESSES"])
  if process_id is None and "LMM_ALIGN_PROCESS_ID" in os.environ:
    process_id = int(os.environ["LMM_ALIGN_PROCESS_ID"])
  on_tpu_pod = "TPU_WORKER_HOSTNAMES" in os.environ or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ
  if coordinator_address is None and not on_tpu_pod:
    return
  if jax.distributed.is_initialized():
    return
  jax.distributed.initialize(
    coordinator_address=coordinator_address,
    num_processes=num_processes,
    process_id=process_id,
    initialization_timeout=300,
  )


def mesh_shape(sizes: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Fills in the one -1 among the axis sizes and checks the product."""
  sizes = list(sizes)
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh sizes {sizes}: at most one axis may be -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh sizes {sizes} do not divide {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(
      f"mesh sizes {sizes} use {int(np.prod(sizes))} devices, but there are {num_devices}"
    )
  return tuple(sizes)


def make_mesh(
  sizes: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """A (data, fsdp, tensor) mesh with Auto axis types (GSPMD-style propagation)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(sizes, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def mesh_from_config(mesh_config) -> Mesh:
  """The mesh of a config's `mesh` block (sizes, num_devices)."""
  devices = jax.devices()
  if mesh_config.num_devices:
    if jax.process_count() > 1:
      raise ValueError("mesh.num_devices must be 0 (all devices) in a multi-process run")
    devices = devices[: mesh_config.num_devices]
  return make_mesh(tuple(mesh_config.sizes), devices)


def check_rules_cover(boxed_tree: Any, rules: Sequence[tuple[str, Any]]) -> None:
  """Raises if any logical axis name in a boxed param tree has no rule."""
  known = {name for name, _ in rules}
  flat = flax.traverse_util.flatten_dict(nn.get_partition_spec(boxed_tree))
  missing = {}
  for path, spec in flat.items():
    for name in spec or ():
      for n in name if isinstance(name, tuple) else (name,):
        if n is not None and n not in known:
          missing.setdefault(n, "/".join(map(str, path)))
  if missing:
    raise ValueError(f"logical axis names without a sharding rule (name: first param): {missing}")


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
  """NamedShardings for a tree of nn.Partitioned values (e.g. the eval_shape of init)."""
  check_rules_cover(boxed_tree, rules)
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, list(rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading axis over (data, fsdp); the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def from_host(value: np.ndarray, placement: jax.sharding.Sharding) -> jax.Array:
  """A host array that every process holds whole as one global array with `placement`: each
  process copies only its own devices' slices, so the mesh may span several hosts
  (`device_put` of a host value onto devices of other processes would first all-gather the
  whole value to check that every process holds the same)."""
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, placement, lambda index: value[index])


def global_batch_from_local(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Each process's rows -> one global array per field, batch-sharded over (data, fsdp).

  The global batch is the concatenation of the processes' local batches in process order.
  """
  out = {}
  for key, value in local.items():
    sharding = batch_sharding(mesh, value.ndim)
    if jax.process_count() == 1:
      out[key] = jax.device_put(value, sharding)
    else:
      global_shape = (value.shape[0] * jax.process_count(), *value.shape[1:])
      out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
  return out


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]]):
  """The context in which a step is traced, so that `nn.with_logical_constraint` on activations
  resolves through the rules to this mesh."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
    yield
