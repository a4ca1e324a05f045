"""Tower pretraining: a vision tower for the shapes world, the stand-in for LLaVA's CLIP.

  lmm-align train --config=configs/shapes/tower.py --workdir=/tmp/tower      # ~1.5 min on CPU
  lmm-align train --config=configs/shapes/sft.py:tower=/tmp/tower --workdir=/tmp/shapes_sft
  lmm-align train --config=configs/shapes/tower.py:variant=shapes-judge --workdir=/tmp/judge_tower

LLaVA never trains its vision tower from nothing: stage 1 starts from CLIP, pretrained on
image-text pairs. A shapes-world SFT that must learn to see through the language loss alone
learns mostly the language prior (CHAIR_i 0.60 after 1500 steps), and no preference method
can then ground it. The trainer registered here as "shapes_tower" pretrains the tower the SFT
config builds on, on that config's own scenes and preprocessing, with one supervised task per
image cell: which shape (or none), which colour, which size, read from the features LLaVA
takes from the tower (the `vision_feature_layer`, patch tokens). The 3x3 scene grid matches
the 3x3 patch grid of the shapes variant (48-pixel images, 16-pixel patches), so patch p is
cell p.

The workdir becomes a transformers `CLIPVisionModel` folder (what `model.vision_init` reads,
as it would read openai/clip-vit-large-patch14-336), with `tower_metrics.json` (also the run's
summary.json): per-attribute accuracy on scenes the training never saw, and which shapes it
misreads as which. Measured on 512 held-out scenes after 5000 steps: the shapes tower reads
98.2% of shapes (18 errors: star / triangle, cross / circle, star / diamond), the
shapes-judge tower (twice as wide and deep, 3 minutes) 99.8%.
"""

from __future__ import annotations

import json
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lmm_align.data.images import preprocess_images
from lmm_align.models.clip_vit import ClipVisionTower
from lmm_align.models.config import ModelConfig
from lmm_align.shapes import world as shapes
from lmm_align.trainers import registry

# Per cell: 0 = empty, else 1 + the index in the world's vocabulary.
ATTRIBUTES = ("shape", "colour", "size")
TRAIN_SEED_TAG, EVAL_SEED_TAG = 11, 12  # the SFT data uses the world seed, its tokenizer 7


class CellTower(nn.Module):
  """The LLaVA vision tower plus one linear head per attribute on the selected patch features."""

  config: ModelConfig
  num_classes: tuple[int, ...]

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, ...]:
    c = self.config
    hidden_states = ClipVisionTower(c.vision, c.runtime, name="vision_tower")(pixel_values)
    features = jnp.concatenate([hidden_states[i][:, 1:] for i in c.vision_feature_layers], -1)
    return tuple(
      nn.Dense(n, name=f"{attribute}_head")(features)
      for attribute, n in zip(ATTRIBUTES, self.num_classes, strict=True)
    )


def cell_labels(scene: shapes.Scene, world: shapes.ShapesWorldConfig) -> np.ndarray:
  """int32[3, 9]: per attribute, per cell (row-major), 0 for an empty cell else 1 + index."""
  vocab = (world.shapes, world.colours, shapes.SIZES)
  labels = np.zeros((len(ATTRIBUTES), 9), np.int32)
  for obj in scene.objects:
    cell = obj.row * 3 + obj.col
    for a, (attribute, values) in enumerate(zip(ATTRIBUTES, vocab, strict=True)):
      labels[a, cell] = 1 + values.index(getattr(obj, attribute))
  return labels


def shape_confusions(predicted: np.ndarray, labels: np.ndarray, world) -> dict[str, int]:
  """{"true->predicted": count} over the occupied cells whose shape is misread ("empty" when
  the object is missed), most frequent first: which shapes a policy on this tower cannot tell
  apart. `predicted` int[N, 9] shape classes, `labels` int[N, 3, 9] from `cell_labels`."""
  names = ("empty", *world.shapes)
  counts: dict[str, int] = {}
  for true, guess in zip(labels[:, 0].ravel(), predicted.ravel(), strict=True):
    if true and true != guess:
      key = f"{names[true]}->{names[guess]}"
      counts[key] = counts.get(key, 0) + 1
  return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def make_batch(scenes, world, image_config) -> tuple[np.ndarray, np.ndarray]:
  pixels = preprocess_images([shapes.render(s, world.image_size) for s in scenes], image_config)
  return pixels, np.stack([cell_labels(s, world) for s in scenes])


def pretrain(config, out: pathlib.Path, steps: int, batch_size: int, lr: float, eval_scenes: int):
  """Trains the tower of `config` (an SFT config) and writes it to `out`; returns metrics."""
  from lmm_align import hf
  from lmm_align.data import sources
  from lmm_align.shapes import data as shapes_data

  model_config = _vision_model_config(config)
  if model_config.vision.image_size // model_config.vision.patch_size != 3:
    raise ValueError(
      f"model.image_size {model_config.vision.image_size} with {model_config.vision.patch_size}-"
      "pixel patches: the cell heads need the scene's 3x3 grid as the patch grid "
      "(image_size = 3 * patch_size)"
    )
  world = shapes_data.world_config(config.data)
  image_config = sources.image_config_for(config, model_config)
  num_classes = (len(world.shapes) + 1, len(world.colours) + 1, len(shapes.SIZES) + 1)
  model = CellTower(model_config, num_classes)
  params = model.init(jax.random.key(config.seed), jnp.zeros((1, *image_config.crop_size, 3)))
  params = nn.unbox(params)["params"]
  warmup = min(50, steps // 10)
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1))
  optimizer = optax.adamw(schedule, weight_decay=0.0)
  opt_state = optimizer.init(params)

  def loss_fn(params, pixels, labels):
    logits = model.apply({"params": params}, pixels)
    losses = [
      optax.softmax_cross_entropy_with_integer_labels(lg, labels[:, a]).mean()
      for a, lg in enumerate(logits)
    ]
    return sum(losses), jnp.stack([(lg.argmax(-1) == labels[:, a]) for a, lg in enumerate(logits)])

  @jax.jit
  def train_step(params, opt_state, pixels, labels):
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, pixels, labels)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def predict(params, pixels):
    return jnp.stack([lg.argmax(-1) for lg in model.apply({"params": params}, pixels)])

  seed = config.data.shapes.seed
  start = time.time()
  for step in range(steps):
    scene_seed = [seed, TRAIN_SEED_TAG, step]
    scenes = shapes.make_scenes(batch_size, world, seed=scene_seed)
    pixels, labels = make_batch(scenes, world, image_config)
    params, opt_state, loss = train_step(params, opt_state, pixels, labels)
    if step % 100 == 0 or step == steps - 1:
      print(f"step {step:5d}  loss {float(loss):.4f}  ({time.time() - start:.0f}s)", flush=True)

  pixels, labels = make_batch(
    shapes.make_scenes(eval_scenes, world, seed=[seed, EVAL_SEED_TAG]), world, image_config
  )
  predicted = np.asarray(predict(params, pixels))  # [3, N, 9]
  correct = predicted == labels.transpose(1, 0, 2)
  occupied = labels[:, 0] > 0  # [N, 9]
  metrics = {
    **{f"{a}_accuracy": float(correct[i][occupied].mean()) for i, a in enumerate(ATTRIBUTES)},
    "empty_cell_accuracy": float(correct[0][~occupied].mean()),
    "shape_confusions": shape_confusions(predicted[0], labels, world),
    "eval_scenes": eval_scenes,
    "steps": steps,
    "final_train_loss": float(loss),
  }
  hf.save_vision_tower(model_config, params["vision_tower"], out)
  (out / "tower_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
  return metrics


DEFAULT_STEPS, QUICK_STEPS = 5000, 20


def ensure_tower(sft_config, out: pathlib.Path, quick: bool = False) -> dict:
  """The tower `sft_config` builds on, pretrained into `out` unless `out` already holds one
  (the shapes experiments' `tower` stage); returns its metrics."""
  metrics = out / "tower_metrics.json"
  if not metrics.exists():
    print(f"=== tower -> {out}")
    pretrain(
      sft_config, out, steps=QUICK_STEPS if quick else DEFAULT_STEPS, batch_size=64, lr=1e-3,
      eval_scenes=64 if quick else 512,
    )  # fmt: skip
  return json.loads(metrics.read_text())


def _vision_model_config(config) -> ModelConfig:
  """The SFT model's config without its tokenizer: only the vision side is used here."""
  from lmm_align import run_config

  config = config.copy_and_resolve_references()
  config.model.vocab_from_tokenizer = False
  return run_config.model_config_for(config, None)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The "shapes_tower" trainer: `config` is the SFT config whose tower to pretrain, plus
  `config.tower` (steps, batch_size, lr, eval_scenes); writes the tower into `workdir`."""
  t = config.tower
  metrics = pretrain(config, pathlib.Path(workdir), t.steps, t.batch_size, t.lr, t.eval_scenes)
  (pathlib.Path(workdir) / "summary.json").write_text(json.dumps(metrics, indent=2) + "\n")
  return metrics


registry.register(registry.Trainer("shapes_tower", train))
