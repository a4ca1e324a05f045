"""Abstract params, optimizer state and batches for `lmm-align plan`, and the model's own FLOPs.

Nothing here holds a value: params and state are `ShapeDtypeStruct`s carrying the shardings
a run gives them (`eval_shape` of the model's init, the config's logical rules), built under
the slice's abstract mesh. `Program` is one jitted function with such arguments.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding

from lmm_align import optim, run_config, sharding
from lmm_align.models.config import ModelConfig
from lmm_align.models.heads import ScalarHead
from lmm_align.models.llava import Llava, dummy_inputs
from lmm_align.trainers import state as state_lib

GIB = 1024**3

# --------------------------------------------------------------------------------------------
# Abstract params, state and batches.
# --------------------------------------------------------------------------------------------


def with_sharding(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings
  )


def _unboxed(boxed: Any) -> Any:
  # .value, not nn.unbox: unboxing applies a sharding constraint, which needs a traced value.
  return jax.tree.map(lambda x: x.value, boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def abstract_variables(model: Llava, mesh: Mesh, rules) -> dict[str, tuple[Any, Any]]:
  """{collection: (ShapeDtypeStructs with shardings, shardings)} of the model's init."""
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(model.config)))
  out = {}
  for collection, tree in boxed.items():
    shards = sharding.logical_shardings(tree, mesh, rules)
    out[collection] = (with_sharding(_unboxed(tree), shards), shards)
  return out


def abstract_head(head: ScalarHead, hidden: int, mesh: Mesh, rules) -> tuple[Any, Any]:
  boxed = jax.eval_shape(lambda: head.init(jax.random.key(0), jnp.zeros((1, 1, hidden))))["params"]
  shards = sharding.logical_shardings(boxed, mesh, rules)
  return with_sharding(_unboxed(boxed), shards), shards


def abstract_train_state(
  config: ml_collections.ConfigDict, params: Any, param_shards: Any, mesh: Mesh
) -> tuple[state_lib.TrainState, state_lib.TrainState, Any]:
  """(state, its shardings, tx) as `state.create_train_state` builds them, without values."""
  tx = state_lib.make_optimizer(config, params)
  trainable, _ = optim.split_trainable(params, tuple(config.trainable))
  trainable_shards, _ = optim.split_trainable(param_shards, tuple(config.trainable))
  dtype = config.optim.state_dtype
  opt_shards = state_lib.opt_state_shardings(tx, trainable, trainable_shards, mesh, dtype)
  opt_state = jax.eval_shape(lambda p: optim.init_optimizer_state(tx, p, dtype), trainable)
  rep = sharding.replicated(mesh)
  key_data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
  state = state_lib.TrainState(
    step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
    params=params,
    opt_state=with_sharding(opt_state, opt_shards),
    rng=jax.ShapeDtypeStruct(key_data.shape, key_data.dtype, sharding=rep),
  )
  shards = state_lib.TrainState(step=rep, params=param_shards, opt_state=opt_shards, rng=rep)
  return state, shards, tx


def rows(mesh: Mesh, shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
  """A batch field: leading axis over (data, fsdp), as `sharding.global_batch_from_local`."""
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))


def sequence_batch(model_config: ModelConfig, mesh: Mesh, lead: tuple[int, ...], seq: int) -> dict:
  """input_ids / labels / attention_mask int32[*lead, T]; pixel_values float32[*lead, 1, H, W, 3]
  (one image per sequence, as the data pipelines batch it)."""
  out = {k: rows(mesh, (*lead, seq), jnp.int32) for k in ("input_ids", "labels", "attention_mask")}
  if model_config.vision is not None:
    v = model_config.vision
    out["pixel_values"] = rows(
      mesh, (*lead, 1, v.image_size, v.image_size, v.num_channels), jnp.float32
    )
  return out


def bytes_per_chip(tree: Any) -> int:
  """Bytes of each leaf's largest shard (XLA pads uneven shards to ceil(dim / shards))."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = list(x.shape)
    s = x.sharding
    if isinstance(s, NamedSharding):
      for i, axes in enumerate(s.spec):
        if axes is not None:
          names = axes if isinstance(axes, tuple) else (axes,)
          shape[i] = -(-shape[i] // int(np.prod([s.mesh.shape[a] for a in names])))
    total += int(np.prod(shape, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize
  return total


def num_params(tree: Any) -> int:
  return sum(int(np.prod(x.shape, dtype=np.int64)) for x in jax.tree.leaves(tree))


def model_config_of(config: ml_collections.ConfigDict) -> tuple[ModelConfig, list[str]]:
  """The run's model, sized without weights or a tokenizer; notes say what was assumed."""
  config = config.copy_and_resolve_references()
  notes = []
  if config.init_from and not os.path.exists(os.path.join(config.init_from, "config.json")):
    notes.append(f"init_from {config.init_from} is not here: sized from the variant")
    config.init_from = ""
  if config.model.get("vocab_from_tokenizer"):
    notes.append("vocab_from_tokenizer: the variant's vocabulary, not the tokenizer's")
    config.model.vocab_from_tokenizer = False
  try:
    model_config = run_config.model_config_for(config, None)
  except KeyError as e:
    raise ValueError(f"config.model.variant={config.model.variant!r}: {e.args[0]}") from e
  return model_config, notes


# --------------------------------------------------------------------------------------------
# The model's own FLOPs.
# --------------------------------------------------------------------------------------------

_MODULES = ("vision_tower", "multi_modal_projector", "language_model")


def pass_factors(trained: set[str], lora: bool) -> dict[str, tuple[int, int]]:
  """{module: (matmul factor, attention factor)} in units of one forward pass.

  A forward is 1; gradients with respect to activations add 1 where any module at or before
  this one (tower -> projector -> LM) trains; gradients with respect to weights add 1 where
  the module's own weights train (not LoRA's frozen base). Attention has no weights: its
  backward is two forwards. So a trained LM is 6N per token, a frozen tower before it 2N.
  """
  out = {}
  for i, module in enumerate(_MODULES):
    activations = any(m in trained for m in _MODULES[: i + 1])
    weights = module in trained and not lora
    out[module] = (1 + activations + weights, 1 + 2 * activations)
  return out


def model_flops(
  c: ModelConfig, sequences: int, seq: int, factors: dict[str, tuple[int, int]], lm_head=True
) -> float:
  """2 x matmul params per token (+ attention 4 T N H per token and layer, the full T x T the
  kernels compute), over `sequences` rows of `seq` tokens with one image each, times the
  per-module factors of `pass_factors`."""
  t = c.text
  q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
  layer = 2 * t.hidden_size * (q + kv) + 3 * t.hidden_size * t.intermediate_size
  matmul = t.num_layers * layer + (t.hidden_size * t.vocab_size if lm_head else 0)
  lm = factors["language_model"]
  flops = sequences * seq * (lm[0] * 2 * matmul + lm[1] * 4 * seq * q * t.num_layers)
  if c.vision is not None:
    v = c.vision
    tokens = v.num_patches + (1 if v.has_class_token else 0)  # SigLIP has none
    tower = v.num_layers * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
    embed = v.patch_size**2 * v.num_channels * v.hidden_size
    f = factors["vision_tower"]
    flops += sequences * (
      f[0] * 2 * (tokens * tower + v.num_patches * embed)
      + f[1] * 4 * tokens**2 * v.hidden_size * v.num_layers
    )
    proj = v.hidden_size * t.hidden_size
    if c.projector_type == "mlp2x_gelu":
      proj += t.hidden_size**2
    flops += sequences * factors["multi_modal_projector"][0] * 2 * c.num_image_tokens * proj
  return float(flops)


def decode_step_flops(c: ModelConfig, rows: int, slots: int) -> float:
  """One decode step: `rows` new tokens through the decoder and the LM head (2 x matmul
  params each) attending over all `slots` cache slots (4 S N H per token and layer)."""
  t = c.text
  q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
  layer = 2 * t.hidden_size * (q + kv) + 3 * t.hidden_size * t.intermediate_size
  matmul = t.num_layers * layer + t.hidden_size * t.vocab_size
  return float(rows * (2 * matmul + 4 * slots * q * t.num_layers))


def trained_modules(trainable_params: Any) -> set[str]:
  """Top-level model modules with at least one trained leaf."""
  paths = [optim.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(trainable_params)[0]]
  return {m for m in _MODULES if any(f"{m}/" in f"/{p}/" or p.startswith(m) for p in paths)}


# --------------------------------------------------------------------------------------------
# The programs each trainer runs.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Program:
  """One jitted function and its abstract arguments; `model_flops` is its own FLOP count."""

  name: str
  jitted: Callable
  args: tuple
  model_flops: float
  by_hand: dict[str, Any]  # label -> abstract tree whose bytes per chip are reported
  # The run's other buffers alive while this program runs (label -> abstract tree), counted
  # on top of its peak: e.g. PPO's frozen bases and optimizer state during a rollout forward.
  resident: dict[str, Any] = dataclasses.field(default_factory=dict)
  # A decode step's least possible HBM traffic per chip (weights + KV cache read once), or 0.
  minimal_bytes: int = 0


def split_lora(variables: dict, lora: bool):
  """(trained, their shardings, base, base shardings) as `modelling.with_lora_split`."""
  params, shards = variables["params"]
  if not lora:
    return params, shards, None, None
  adapters, adapter_shards = variables["lora"]
  return adapters, adapter_shards, params, shards


def check_rows(config: ml_collections.ConfigDict, mesh: Mesh, accum: int = 1) -> int:
  dp = sharding.data_parallel_size(mesh)
  if config.batch_size % (dp * accum):
    raise ValueError(
      f"config.batch_size={config.batch_size} must divide by data x fsdp ({dp}) x "
      f"optim.grad_accum_steps ({accum})"
    )
  return config.batch_size
