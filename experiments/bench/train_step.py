"""SFT train-step throughput and model FLOPs utilisation on CPU, against this CPU's own peak.

  python experiments/bench/train_step.py [--config=configs/llava15/sft.py:runlocal]
      [--variant=small] [--batch=8] [--seq=256] [--steps=10]

The step is the trainer's own: `sft.sft_train_step`, jitted by `state.jit_train_step` with the
state donated, on one CPU device, with the config's dtypes, remat policy, trainable regexes
and optimizer. The batch is synthetic and has no padding: every row is one image (its
placeholders first) and `seq - image tokens` random text tokens, all labelled, so every
position is computed and counted. After one warm-up step (compilation) `--steps` steps are
timed to `block_until_ready`.

Peak: the best of a few float32 `jnp.dot`s of two [n, n] matrices (2 n^3 FLOPs each), in the
same process and dtype, just before the steps are timed.

Model FLOPs of one step (remat recomputation is not counted: this is MFU, not HFU):

  6 * (N_text + N_projector) * B * T           trainable: forward 2, backward 4 per param-token
  + 12 * L * B * T^2 * N_heads * H_head        decoder attention, 3 x (QK^T + AV) = 3 x 4 T^2 NH
  + 2 * N_vision * B * P'                      frozen CLIP tower: forward only (nothing before
  + 4 * L_v * B * P'^2 * D_v                   it trains, so no backward), its attention too

N_text counts the decoder's params without the embedding table (a lookup, not a matmul) but
with lm_head; N_vision the tower's without its position and class embeddings; P' = patches
+ 1 (CLS); all L_v tower layers count (LLaVA reads the second to last, but under scan the
last is computed too). A vision tower that is trainable counts 6 and 12 like the decoder. Attention is
counted over the full T x T matrix, as it is computed (no causal saving).

The last line is `mfu: X.XX% tokens_per_second: Y` (Y counts every position of the batch).
On a small shared CPU both numbers move with the machine's load; compare runs, not absolutes.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lmm_align import config_files, run_config, sharding  # noqa: E402
from lmm_align.models.config import ModelConfig  # noqa: E402
from lmm_align.models.llava import Llava  # noqa: E402
from lmm_align.models.variants import get_variant  # noqa: E402
from lmm_align.trainers import sft  # noqa: E402
from lmm_align.trainers import state as state_lib  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]


def load_config(spec: str):
  """configs/X.py[:arg] -> get_config(arg), importable from any directory."""
  return config_files.load_config(spec, str(REPO))


# --------------------------------------------------------------------------------------------
# Peak and FLOPs.
# --------------------------------------------------------------------------------------------


def matmul_peak_flops(n: int = 2048, repeats: int = 5, dtype=jnp.float32) -> float:
  """FLOP/s of the best of `repeats` [n, n] x [n, n] jnp.dot calls (after a warm-up)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    dot(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best


def _count(params: dict, prefix: str, exclude: tuple[str, ...] = ()) -> int:
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  return sum(
    int(np.prod(v.shape))
    for k, v in flat.items()
    if k.startswith(prefix) and not any(re.search(e, k) for e in exclude)
  )


def step_flops(
  model_config: ModelConfig, params: dict, trainable: tuple[str, ...], batch: int, seq: int
) -> dict[str, float]:
  """Model FLOPs of one step by part (see the module docstring), and their total."""
  t = model_config.text
  n_text = _count(params, "language_model/", ("embed_tokens",))
  out = {
    "text": 6.0 * n_text * batch * seq,
    "text_attention": 12.0 * t.num_layers * batch * seq**2 * t.num_heads * t.head_dim,
  }
  if model_config.vision is not None:
    v = model_config.vision
    n_proj = _count(params, "multi_modal_projector/")
    n_vision = _count(params, "vision_tower/", ("position_embedding", "class_embedding"))
    patches = v.num_patches + (1 if v.has_class_token else 0)  # SigLIP has none
    vision_trains = any(re.fullmatch(p, "vision_tower/x") for p in trainable)
    factor = 3.0 if vision_trains else 1.0
    out["projector"] = 6.0 * n_proj * batch * model_config.num_image_tokens
    out["vision"] = factor * 2.0 * n_vision * batch * patches
    out["vision_attention"] = factor * 4.0 * v.num_layers * batch * patches**2 * v.hidden_size
  out["total"] = sum(out.values())
  return out


# --------------------------------------------------------------------------------------------
# The step.
# --------------------------------------------------------------------------------------------


def synthetic_batch(model_config: ModelConfig, batch: int, seq: int, seed: int = 0) -> dict:
  """One image per row (placeholders first), random text after; no padding, all labelled."""
  rng = np.random.default_rng(seed)
  num_image = model_config.num_image_tokens
  if seq <= num_image:
    raise ValueError(f"seq {seq} must exceed the {num_image} image tokens")
  low = max(model_config.image_token_id, 3) + 1
  ids = rng.integers(low, model_config.text.vocab_size, (batch, seq), dtype=np.int32)
  ids[:, :num_image] = model_config.image_token_id
  labels = ids.copy()
  labels[:, :num_image] = -100
  out = {"input_ids": ids, "labels": labels, "attention_mask": np.ones_like(ids)}
  if model_config.vision is not None:
    v = model_config.vision
    out["pixel_values"] = rng.standard_normal(
      (batch, 1, v.image_size, v.image_size, v.num_channels), np.float32
    )
  return out


def build_step(config, model_config: ModelConfig, mesh):
  """(jitted step, initial state): as sft.train builds them, from random params."""
  rules = tuple(tuple(r) for r in config.mesh.rules)
  model = Llava(model_config)
  with sharding.activation_sharding(mesh, rules):
    shards = state_lib.param_shardings(model, mesh, rules)
    params = state_lib.init_params_sharded(model, jax.random.key(config.seed), shards)
    tx = state_lib.make_optimizer(config, params)
    state, state_shards = state_lib.create_train_state(
      params, shards, tx, tuple(config.trainable), config.seed, mesh, config.optim.state_dtype
    )
    step_fn = jax.tree_util.Partial(
      sft.sft_train_step,
      model=model,
      tx=tx,
      trainable=tuple(config.trainable),
      grad_accum_steps=config.optim.grad_accum_steps,
      state_dtype=config.optim.state_dtype,
    )
    jitted = state_lib.jit_train_step(lambda s, b, f: step_fn(s, b, f), state_shards, mesh)
  return jitted, state


def main(argv: list[str] | None = None) -> dict[str, float]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="configs/llava15/sft.py:runlocal")
  p.add_argument("--variant", default="small", help="model variant ('' = the config's)")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--remat", default="", help="remat policy override")
  p.add_argument("--matmul_n", type=int, default=2048)
  args = p.parse_args(argv)

  config = load_config(args.config)
  if args.remat:
    config.model.remat_policy = args.remat
  model_config = get_variant(args.variant or config.model.variant).replace(
    runtime=run_config.runtime_for(config)
  )
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  r = model_config.runtime
  print(
    f"variant {args.variant or config.model.variant}: dtype {r.dtype}, remat {r.remat_policy}, "
    f"scan {r.scan_layers}; batch {args.batch} x {args.seq} tokens "
    f"({model_config.num_image_tokens} image tokens per row); trainable {tuple(config.trainable)}"
  )

  jitted, state = build_step(config, model_config, mesh)
  flops = step_flops(model_config, state.params, tuple(config.trainable), args.batch, args.seq)
  batch = sharding.global_batch_from_local(
    synthetic_batch(model_config, args.batch, args.seq), mesh
  )

  t0 = time.perf_counter()
  state, metrics = jitted(state, batch, None)
  jax.block_until_ready(metrics)
  print(f"warm-up step (compile + run) {time.perf_counter() - t0:.1f} s")

  peak = matmul_peak_flops(args.matmul_n)
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = jitted(state, batch, None)
  jax.block_until_ready((state, metrics))
  seconds = (time.perf_counter() - t0) / args.steps

  tokens_per_second = args.batch * args.seq / seconds
  achieved = flops["total"] / seconds
  mfu = achieved / peak
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  print(f"params {n_params / 1e6:.2f} M; loss after {args.steps + 1} steps "
        f"{float(metrics['loss_sum']) / float(metrics['tokens']):.3f}")  # fmt: skip
  print("model FLOPs per step: " + ", ".join(f"{k} {v / 1e9:.2f} G" for k, v in flops.items()))
  print(f"CPU matmul peak (float32 {args.matmul_n}^2 dot, best of 5): {peak / 1e9:.1f} GFLOP/s")
  print(f"step {seconds * 1e3:.1f} ms: {achieved / 1e9:.2f} GFLOP/s of model FLOPs")
  print(f"mfu: {100 * mfu:.2f}% tokens_per_second: {tokens_per_second:.0f}")
  return {"mfu": mfu, "tokens_per_second": tokens_per_second, "step_seconds": seconds}


if __name__ == "__main__":
  main()
