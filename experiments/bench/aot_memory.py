"""Per-device memory of the real SFT step, compiled ahead of time for a mesh of fake devices.

  python experiments/bench/aot_memory.py --config=configs/llava_sft_7b.py --mesh=1,32,1 \
      [--devices=32] [--batch=128] [--seq=2048] [--remat=full] [--grad_accum=1]

Nothing is materialised: the params' shapes come from `jax.eval_shape` of the model's init,
their shardings from the config's logical rules on a mesh of `--devices` fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count, set before JAX is imported), the optimizer
state's from `eval_shape` + `opt_state_shardings`, and the batch is `ShapeDtypeStruct`s with
the batch sharding. The step is `sft.sft_train_step` jitted by `state.jit_train_step`, exactly
as the trainer runs it (state donated), then `.lower(...).compile()`.

Printed per device: `memory_analysis()`'s argument, output, alias, temp and generated-code
sizes; the params' and optimizer state's bytes computed by hand from shapes and shardings (a
cross-check of `argument`); and the peak estimate argument + output - alias + temp (XLA:CPU's
`peak_memory_in_bytes` is printed too, but on CPU it comes out below `temp`, so it is not
used). The last line is `per_device_peak_gib: X.XX`.

Caveats: this is XLA:CPU's buffer assignment, not the TPU compiler's. The shardings, the
params, the optimizer state and the remat schedule are the same, but fusion and scheduling
differ (XLA:CPU also computes some bf16 ops in f32), so treat the peak as an estimate with a
margin, not a promise. The model comes from `config.init_from`'s config.json when that folder
exists, else from `config.model.variant`; the batch holds one image per row, its placeholders
at the start.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
GIB = 1024**3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", required=True, help="configs/X.py[:arg]")
  p.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor sizes (one may be -1)")
  p.add_argument("--devices", type=int, default=0, help="fake devices (default: the mesh's)")
  p.add_argument("--batch", type=int, default=0, help="global batch (default: config's)")
  p.add_argument("--seq", type=int, default=0, help="sequence length (default: max_length)")
  p.add_argument("--remat", default="", help="remat policy override (none/full/dots/...)")
  p.add_argument("--grad_accum", type=int, default=0, help="grad accumulation override")
  p.add_argument("--max_rss_gib", type=float, default=12.0, help="abort above this host RSS")
  args = p.parse_args(argv)
  args.mesh = tuple(int(s) for s in args.mesh.split(","))
  if not args.devices:
    if -1 in args.mesh:
      raise SystemExit("--mesh has a -1: give --devices")
    args.devices = 1
    for s in args.mesh:
      args.devices *= s
  return args


if __name__ == "__main__":
  _ARGS = parse_args()
  _flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
  _flags.append(f"--xla_force_host_platform_device_count={_ARGS.devices}")
  os.environ["XLA_FLAGS"] = " ".join(_flags)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402

from lmm_align import config_files, optim, sharding  # noqa: E402
from lmm_align.models.config import ModelConfig, from_hf_config, get_variant  # noqa: E402
from lmm_align.models.llava import Llava, dummy_inputs  # noqa: E402
from lmm_align.trainers import modelling, sft  # noqa: E402
from lmm_align.trainers import state as state_lib  # noqa: E402

# --------------------------------------------------------------------------------------------
# Config and model, without weights.
# --------------------------------------------------------------------------------------------


def load_config(spec: str) -> ml_collections.ConfigDict:
  """configs/X.py[:arg] -> get_config(arg), importable from any directory."""
  return config_files.load_config(spec, str(REPO))


def model_config_for(config: ml_collections.ConfigDict) -> tuple[ModelConfig, str]:
  """(model config, where it came from): init_from's config.json if present, else the variant.

  `model.vocab_from_tokenizer` is ignored (no tokenizer is built): the variant's vocab is used.
  """
  runtime = modelling.runtime_for(config)
  init_json = pathlib.Path(config.init_from or "/nonexistent") / "config.json"
  if init_json.exists():
    from lmm_align import hf

    return from_hf_config(hf.read_config(config.init_from), runtime), str(init_json)
  model = get_variant(config.model.variant).replace(runtime=runtime)
  if config.model.image_size and model.vision is not None:
    import dataclasses

    model = model.replace(
      vision=dataclasses.replace(model.vision, image_size=config.model.image_size)
    )
  return model, f"variant {config.model.variant}"


def with_sharding(abstract, shardings):
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )


def abstract_train_state(
  config: ml_collections.ConfigDict, model: Llava, mesh: Mesh
) -> tuple[state_lib.TrainState, state_lib.TrainState, object]:
  """(abstract state with shardings, the state's shardings, tx). Call under activation_sharding."""
  rules = tuple(tuple(r) for r in config.mesh.rules)
  boxed = jax.eval_shape(model.init, jax.random.key(0), *dummy_inputs(model.config))["params"]
  param_shards = sharding.logical_shardings(boxed, mesh, rules)
  # .value, not nn.unbox: unboxing applies a sharding constraint, which needs a traced value.
  unboxed = jax.tree.map(lambda x: x.value, boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  params = with_sharding(unboxed, param_shards)
  tx = state_lib.make_optimizer(config, params)
  trainable, _ = optim.split_trainable(params, tuple(config.trainable))
  trainable_shards, _ = optim.split_trainable(param_shards, tuple(config.trainable))
  opt_shards = state_lib.opt_state_shardings(
    tx, trainable, trainable_shards, mesh, config.optim.state_dtype
  )
  opt_state = jax.eval_shape(
    lambda p: optim.init_optimizer_state(tx, p, config.optim.state_dtype), trainable
  )
  rep = sharding.replicated(mesh)
  shards = state_lib.TrainState(step=rep, params=param_shards, opt_state=opt_shards, rng=rep)
  key_data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
  state = state_lib.TrainState(
    step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
    params=params,
    opt_state=with_sharding(opt_state, opt_shards),
    rng=jax.ShapeDtypeStruct(key_data.shape, key_data.dtype, sharding=rep),
  )
  return state, shards, tx


def abstract_batch(model_config: ModelConfig, mesh: Mesh, batch: int, seq: int) -> dict:
  """input_ids / labels / attention_mask int32[B, T], pixel_values float32[B, 1, H, W, 3]."""
  out = {
    key: jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=sharding.batch_sharding(mesh, 2))
    for key in ("input_ids", "labels", "attention_mask")
  }
  if model_config.vision is not None:
    v = model_config.vision
    shape = (batch, 1, v.image_size, v.image_size, v.num_channels)
    out["pixel_values"] = jax.ShapeDtypeStruct(
      shape, jnp.float32, sharding=sharding.batch_sharding(mesh, 5)
    )
  return out


# --------------------------------------------------------------------------------------------
# Bytes by hand.
# --------------------------------------------------------------------------------------------


def shard_bytes(x: jax.ShapeDtypeStruct) -> int:
  """Bytes of the largest shard of x (XLA pads uneven shards to ceil(dim / shards))."""
  s = x.sharding
  shape = list(x.shape)
  if isinstance(s, NamedSharding):
    for i, axes in enumerate(s.spec):
      if axes is None:
        continue
      n = int(np.prod([s.mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,))]))
      shape[i] = -(-shape[i] // n)
  return int(np.prod(shape, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize


def tree_bytes_per_device(tree) -> int:
  return sum(shard_bytes(x) for x in jax.tree.leaves(tree))


def num_params(tree) -> int:
  return sum(int(np.prod(x.shape, dtype=np.int64)) for x in jax.tree.leaves(tree))


# --------------------------------------------------------------------------------------------
# Compile and report.
# --------------------------------------------------------------------------------------------


def _watch_rss(limit_gib: float) -> None:
  """Kills this process if its resident memory passes the limit (compiling a big model on a
  small shared machine must not take it down)."""

  def watch():
    while True:
      with open("/proc/self/status") as f:
        rss_kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
      if rss_kib * 1024 > limit_gib * GIB:
        print(f"aborting: RSS {rss_kib / 1024**2:.2f} GiB > {limit_gib} GiB", flush=True)
        os._exit(3)
      time.sleep(0.5)

  threading.Thread(target=watch, daemon=True).start()


def format_gib(num_bytes: int) -> str:
  """Two decimals, or enough digits that a tiny model's peak does not print as 0.00."""
  gib = num_bytes / GIB
  return f"{gib:.2f}" if gib >= 0.1 else f"{gib:.6f}"


def max_rss_gib() -> float:
  import resource

  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def compile_step(config, model_config, mesh, batch: int, seq: int):
  """(compiled step, abstract state) for the real jitted SFT step on abstract inputs."""
  rules = tuple(tuple(r) for r in config.mesh.rules)
  model = Llava(model_config)
  with sharding.activation_sharding(mesh, rules):
    state, shards, tx = abstract_train_state(config, model, mesh)
    step_fn = jax.tree_util.Partial(
      sft.sft_train_step,
      model=model,
      tx=tx,
      trainable=tuple(config.trainable),
      grad_accum_steps=config.optim.grad_accum_steps,
      state_dtype=config.optim.state_dtype,
    )
    jitted = state_lib.jit_train_step(lambda s, b, f: step_fn(s, b, f), shards, mesh)
    t0 = time.perf_counter()
    lowered = jitted.lower(state, abstract_batch(model_config, mesh, batch, seq), None)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
  print(f"lower {t1 - t0:.1f} s, compile {t2 - t1:.1f} s")
  return compiled, state


def main(args: argparse.Namespace) -> float:
  _watch_rss(args.max_rss_gib)
  config = load_config(args.config)
  if args.remat:
    config.model.remat_policy = args.remat
  if args.grad_accum:
    config.optim.grad_accum_steps = args.grad_accum
  model_config, source = model_config_for(config)
  devices = jax.devices()[: args.devices]
  mesh = sharding.make_mesh(args.mesh, devices)
  batch = args.batch or config.batch_size
  seq = args.seq or config.data.max_length
  accum = config.optim.grad_accum_steps
  dp = sharding.data_parallel_size(mesh)
  if batch % (dp * accum):
    raise SystemExit(f"batch {batch} must divide by data x fsdp ({dp}) x grad_accum ({accum})")
  r = model_config.runtime
  print(
    f"model: {source}; dtype {r.dtype}, params {r.param_dtype}, optimizer state "
    f"{config.optim.state_dtype}, remat {r.remat_policy}, scan {r.scan_layers}"
  )
  print(
    f"mesh (data, fsdp, tensor) = {tuple(mesh.shape.values())} on {len(devices)} devices; "
    f"global batch {batch} x {seq} tokens ({model_config.num_image_tokens} image tokens per "
    f"row), {batch // dp} rows per device, grad_accum {accum}"
  )

  compiled, state = compile_step(config, model_config, mesh, batch, seq)
  stats = compiled.memory_analysis()
  trainable, _ = optim.split_trainable(state.params, tuple(config.trainable))
  param_bytes = tree_bytes_per_device(state.params)
  opt_bytes = tree_bytes_per_device(state.opt_state)
  print(f"params: {num_params(state.params):,} ({num_params(trainable):,} trainable)")
  rows = [
    ("argument", stats.argument_size_in_bytes),
    ("output", stats.output_size_in_bytes),
    ("alias", stats.alias_size_in_bytes),
    ("temp", stats.temp_size_in_bytes),
    ("generated code", stats.generated_code_size_in_bytes),
    ("peak_memory_in_bytes (XLA:CPU, not used)", getattr(stats, "peak_memory_in_bytes", 0)),
    ("params by hand", param_bytes),
    ("optimizer state by hand", opt_bytes),
  ]
  print("per device:")
  for name, value in rows:
    print(f"  {name:42s} {value / GIB:9.3f} GiB {value:16d} bytes")
  peak = (
    stats.argument_size_in_bytes
    + stats.output_size_in_bytes
    - stats.alias_size_in_bytes
    + stats.temp_size_in_bytes
  )
  print(f"  {'peak = argument + output - alias + temp':42s} {peak / GIB:9.3f} GiB {peak:16d} bytes")
  print(f"host max RSS {max_rss_gib():.2f} GiB")
  print(f"per_device_peak_gib: {format_gib(peak)}")
  return peak / GIB


if __name__ == "__main__":
  main(_ARGS)
