"""`lmm-align plan` on anyres models: the LLaVA-Critic loop (configs/llava_critic/iterative_dpo.py)
with a tiny OneVision policy and critic on 8 fake CPU devices, and the anyres DPO batch
against what `preference.PreferenceData` serves.

The loop's programs compile: the candidate sampler and the critic's greedy verdicts with every
tile an image can take and the pack plan, the critic on the loop's own mesh (config.mesh
(1, 4, 2), not the DPO mesh (2, 2, 2)) with generate's model-sharded placement (rows over
data x fsdp), and the DPO step on each pair's tiles. Their KV caches and batches add up by
hand. The DPO program's batch has the same fields, shapes and dtypes as the trainer's batch of
tiny OneVision pairs, so the plan and the trainer cannot drift apart.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from lmm_align import aot, config_files, main, sampling, sharding
from lmm_align.aot import programs as programs_lib
from lmm_align.aot import rl_programs
from lmm_align.data import pipeline, preference, sources
from lmm_align.models import get_variant

REPO = pathlib.Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "configs" / "llava_critic" / "iterative_dpo.py") + ":runlocal"
TINY = "tiny-llava-onevision"
OVERRIDES = (
  f"--config.train.model.variant={TINY}", f"--config.feedback.critic_variant={TINY}",
  "--config.mesh.sizes=1,4,2", "--config.mesh.num_devices=0",
)  # fmt: skip
PROGRAMS = [
  "candidates_sampler", "candidates_decode_step", "critic_sampler", "critic_decode_step",
  "dpo_reference_logps", "dpo_train_step",
]  # fmt: skip


def _config():
  config = config_files.load_config(RECIPE)
  return main.apply_overrides(config, {
    "train.model.variant": TINY, "feedback.critic_variant": TINY, "mesh.sizes": (1, 4, 2),
    "mesh.num_devices": 0,
  })  # fmt: skip


@pytest.fixture(scope="module")
def plan(tmp_path_factory) -> dict:
  save = tmp_path_factory.mktemp("critic_loop") / "plan.json"
  argv = [f"--config={RECIPE}", "--topology=cpu-8", "--mesh=2,2,2", "--cost=none", *OVERRIDES]
  assert aot.main([*argv, f"--save={save}"]) == 0
  return json.loads(save.read_text())


def _program(table: dict, name: str) -> dict:
  return next(p for p in table["programs"] if p["name"] == name)


def _batch_bytes(fields: dict, chips: int) -> int:
  return sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in fields.values()) // chips


def test_critic_loop_programs_compile_with_tiles_on_the_loop_mesh(plan):
  assert [p["name"] for p in plan["programs"]] == PROGRAMS
  assert plan["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}  # the DPO mesh, --mesh
  config, c = _config(), get_variant(TINY)
  f, s, t = config.feedback, config.sampling, c.text
  # The critic's longest request: the largest grid's placeholders, two candidate answers and
  # the judging prompt, bucketed; critic_max_tokens of reply.
  most = max(c.image_tokens(tuple(p)) for p in c.packing.image_grid_pinpoints)
  prompt = sampling.bucket_length(most + 2 * s.max_new_tokens + 256)
  assert prompt == rl_programs.critic_prompt_length(c, s.max_new_tokens)
  # On the loop mesh (1, 4, 2): feedback.batch_size requests over data x fsdp = 4, kv heads
  # over tensor = 2, keys and values of every layer (float32).
  critic = _program(plan, "critic_decode_step")
  rows, heads = f.batch_size // 4, -(-t.num_kv_heads // 2)
  cache = t.num_layers * 2 * rows * heads * t.head_dim * (prompt + f.critic_max_tokens) * 4
  assert critic["by_hand"]["KV cache"] == cache
  assert critic["alias"] >= cache  # donated, updated in place
  # The candidates: K samples of one prompt (the largest image's placeholders + its text),
  # topped up to whole data x fsdp groups (5 -> 8 rows: 2 a chip).
  candidates = _program(plan, "candidates_decode_step")
  prompt = sampling.bucket_length(most + rl_programs.PROMPT_TEXT_TOKENS)
  rows, slots = -(-s.num_samples // 4), prompt + s.max_new_tokens
  assert (s.num_samples, rows) == (5, 2)
  cache = t.num_layers * 2 * rows * heads * t.head_dim * slots * 4
  assert candidates["by_hand"]["KV cache"] == cache
  # The critic sampler's arguments: its params (jit drops the SigLIP tower's unused
  # post-layernorm, 2 x [32] float32) and this chip's quarter of the rows: ids, masks, tiles,
  # pack plan, row keys, stop ids (padded to 4), limits; and pad_id (greedy: the temperature
  # and top-p scalars are unused).
  sampler = _program(plan, "critic_sampler")
  rows = f.batch_size // 4
  tiles = pipeline.anyres_batch_shapes(
    f.batch_size, sampling.bucket_length(most), c.packing.max_tiles_per_image, 32
  )
  used = {k: v for k, v in tiles.items() if k not in ("image_sizes", "pack_plan.num_tokens")}
  inputs = 2 * rows * rl_programs.critic_prompt_length(c, s.max_new_tokens) * 4
  inputs += _batch_bytes(used, 4)
  inputs += rows * (8 + 4 * 4 + 4) + 4
  assert sampler["argument"] == sampler["by_hand"]["params"] - 2 * 32 * 4 + inputs


def test_anyres_dpo_step_in_the_loop_takes_each_pairs_tiles(plan):
  """The DPO step's arguments: the state and the batch of `pipeline.anyres_batch_shapes` per
  pair (L rows) over data x fsdp = 4 chips, with the reference log-probs."""
  config, c = _config(), get_variant(TINY)
  train = config.train
  pairs, seq, tiles = train.batch_size, train.data.max_length, c.packing.max_tiles_per_image
  fields = pipeline.anyres_batch_shapes(pairs, seq, tiles, 32)
  used = {k: v for k, v in fields.items() if k not in ("image_sizes", "pack_plan.num_tokens")}
  batch = 3 * pairs * 2 * seq * 4 // 4 + _batch_bytes(used, 4) + pairs * 2 * 4 // 4
  step = _program(plan, "dpo_train_step")
  state = step["by_hand"]["params"] + step["by_hand"]["optimizer state"]
  assert step["argument"] == state + batch + 4 + 8  # + step (int32) and the rng key


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
  pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), np.uint8)
  return Image.fromarray(pixels)


def test_anyres_dpo_program_batch_is_the_trainers_batch():
  """PreferenceData's batch of tiny OneVision pairs (a wide and a tall image, a text-only pair)
  and the plan's DPO and reward-model batches: the same fields, shapes and dtypes (the trainer
  drops pair_index before the step), with the largest of data.tile_buckets."""
  config = config_files.load_config(RECIPE).train
  config = main.apply_overrides(config, {"model.variant": TINY, "data.max_length": 128})
  with config.unlocked():
    config.data.tile_buckets = (3, 5)
  c = get_variant(TINY)
  image_config, tiling = sources.image_batching(config, c)
  assert image_config is None and tiling.tile_buckets == (3, 5)
  pairs = []
  for i, size in enumerate(((20, 64), (60, 44), None)):
    image = None if size is None else _image(i, size)
    placeholders = [c.image_token_id] * (c.num_image_tokens if size else 0)
    prompt = np.asarray([1, 7, *placeholders, 8], np.int32)
    sides = [np.concatenate([prompt, np.asarray(a, np.int32)]) for a in ([9, 10], [11, 12, 13])]
    labels = [np.where(np.arange(len(x)) < len(prompt), -100, x) for x in sides]
    pairs.append(
      preference.PreferencePair(f"p{i}", sides[0], labels[0], sides[1], labels[1], image=image)
    )  # fmt: skip
  data = preference.PreferenceData(
    pairs, None, max_length=128, buckets=(64, 128), pad_id=0, seed=0, tiling=tiling,
    image_token_id=c.image_token_id,
  )  # fmt: skip
  served = data.rows(np.arange(3), length=128)
  assert served["pixel_values"].shape[1] == 5  # the tall image needs 5 tiles
  served.pop("pair_index")  # dropped by the DPO trainer before the step (drop_keys)
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  planned = programs_lib.pair_batch(config, c, mesh, 3, 128)
  assert {k: (v.shape, jnp.dtype(v.dtype)) for k, v in planned.items()} == {
    k: (v.shape, jnp.dtype(v.dtype)) for k, v in served.items()
  }
  # The DPO and reward-model programs take exactly that batch.
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    config = main.apply_overrides(config, {"batch_size": 3, "mesh.sizes": (1, 1, 1)})
    rules = tuple(tuple(r) for r in config.mesh.rules)
    dpo = programs_lib.dpo_programs(config, c, mesh, rules)[-1]
    rm = config_files.load_config(str(REPO / "configs" / "llava_rlhf" / "rm.py") + ":runlocal")
    rm = main.apply_overrides(rm, {
      "model.variant": TINY, "batch_size": 3, "mesh.sizes": (1, 1, 1), "data.max_length": 128,
    })  # fmt: skip
    with rm.unlocked():
      rm.data.tile_buckets = (3, 5)
    reward = programs_lib.reward_programs(rm, c, mesh, rules)[0]
  for program in (dpo, reward):
    batch = program.args[1]
    assert {k: batch[k].shape for k in served} == {k: v.shape for k, v in served.items()}
