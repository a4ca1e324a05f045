"""DPO and the reward model on anyres (LLaVA-NeXT / LLaVA-OneVision) preference pairs.

Tiny random folders: a OneVision (headless SigLIP + Qwen2, anyres_max_1 so that grids are
downsampled, a BPE tokenizer with ChatML markup, its image processor saved beside it) and a NeXT
(CLIP + LLaMA) on the same tokenizer. Pairs whose images have two aspect ratios (3 and 5 tiles)
and a text-only pair make one batch.

Checks: each pair's placeholders are transformers' processor count for its image, on both
sides; tiles are transformers' preprocessing, image_sizes and the pack plan per pair; labels
cover the answers only. The DPO step's per-sequence log-probs (each image encoded once for its
two sequences) equal log-probs summed by hand from transformers' logits, for OneVision and
NeXT, and so does the precomputed reference pass (a short last batch padded). One DPO step and
one reward-model step train on the anyres batch; the iterative loop's DPO stage (the
LLaVA-Critic recipe's OneVision policy) trains and exports; `reward.train` runs on a NeXT.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import pathlib
import types

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tiny_hf
import torch
import transformers
from PIL import Image

from lmm_align import config_files, hf, main, optim, sharding
from lmm_align.data import preference, sources
from lmm_align.data.conversation import IGNORE_INDEX
from lmm_align.models import anyres
from lmm_align.models.heads import ScalarHead
from lmm_align.trainers import dpo, iterative, reward
from lmm_align.trainers import state as state_lib

# (height, width): a wide 1 x 2 grid (3 tiles, its 2 x 8 map kept) and a tall 2 x 2 grid (5
# tiles, its 8 x 6 map downsampled by anyres_max_1 to 4 x 3); None: a text-only pair.
SIZES = ((20, 64), (60, 44), None)
QUESTION = "Describe the image."
ANSWERS = (
  ("A red square on the left.", "A blue circle."),
  ("Two green stars.", "A yellow triangle at the top."),
  ("The sky is blue.", "It is raining."),
)
REPO = pathlib.Path(__file__).resolve().parents[2]
LOOP_CONFIG = "configs/llava_critic/iterative_dpo.py"


def _image(i: int, size) -> Image.Image:
  pixels = np.random.default_rng(i).integers(0, 256, (*size, 3), np.uint8)
  return Image.fromarray(pixels)


def _records() -> list[dict]:
  return [
    {"id": f"p{i}", "image": None if size is None else _image(i, size), "question": QUESTION,
     "chosen": chosen, "rejected": rejected}
    for i, (size, (chosen, rejected)) in enumerate(zip(SIZES, ANSWERS))
  ]  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
  """Tiny OneVision and NeXT folders sharing one BPE tokenizer (ChatML tokens added)."""
  root = tmp_path_factory.mktemp("dpo_anyres")
  texts = [QUESTION, *[a for pair in ANSWERS for a in pair], "You are a helpful assistant."]
  tokenizer = tiny_hf.chatml_tokenizer(texts)
  torch.manual_seed(0)
  out = {
    "root": root,
    "tokenizer": tokenizer,
    "onevision": root / "onevision",
    "next": root / "next",
  }
  tiny_hf.save_onevision_for(tokenizer, out["onevision"])
  tiny_hf.save_next_for(tokenizer, out["next"])
  return out


def _config(folder, tile_buckets: tuple[int, ...] | None = None, **overrides):
  """The LLaVA-Critic recipe's DPO block (its OneVision policy), tiny and on CPU; without
  tile_buckets (the recipe sets none) one bucket of the most tiles an image can take."""
  config = config_files.load_config(LOOP_CONFIG, str(REPO)).train
  if tile_buckets is not None:
    with config.unlocked():
      config.data.tile_buckets = tile_buckets
  return main.apply_overrides(config, {
    "init_from": str(folder), "model.dtype": "float32", "model.param_dtype": "float32",
    "model.remat_policy": "none", "mesh.sizes": (-1, 1, 1), "mesh.num_devices": 2,
    "data.max_length": 256, "data.buckets": (128, 256), "batch_size": 2, "total_steps": 2,
    "optim.warmup_ratio": 0.0, "optim.lr": 1e-3, "log_every": 1, **overrides,
  })  # fmt: skip


def _data(folders, name: str, **config_args) -> tuple[preference.PreferenceData, object]:
  """The three pairs batched for the `name` model as the DPO trainer batches them."""
  config = _config(folders[name], **config_args)
  tokenizer = folders["tokenizer"]
  model_config = hf.load_pretrained(folders[name])[0].config
  pairs = [
    preference.encode_pair(
      r, tokenizer, "qwen_1_5", model_config.num_image_tokens, model_config.image_token_id
    )
    for r in _records()
  ]
  image_config, tiling = sources.image_batching(config, model_config)
  data = preference.PreferenceData(
    pairs, image_config, max_length=config.data.max_length, buckets=config.data.buckets,
    pad_id=tokenizer.pad_token_id, seed=0, tiling=tiling,
    image_token_id=model_config.image_token_id,
  )  # fmt: skip
  return data, model_config


def test_anyres_pair_batch_counts_placeholders_tiles_and_labels(folders):
  data, config = _data(folders, "onevision")
  assert image_config_is_none(data) and data.tiling.tile_buckets == (5,) and len(data) == 3
  counts = [anyres.num_image_tokens(s, config.packing) for s in SIZES[:2]]
  assert counts == [16 + 2 * 9, 16 + 4 * 4]  # base tile + the map's rows with their newlines
  tokenizer = folders["tokenizer"]
  image_processor = transformers.LlavaOnevisionImageProcessorPil.from_pretrained(
    folders["onevision"]
  )
  batch = data.rows(np.arange(3))
  assert batch["input_ids"].shape == (3, 2, 128) and batch["pixel_values"].shape == (
    3, 5, 32, 32, 3)  # fmt: skip
  assert batch["pack_plan.taps"].shape == (3, 128, 2, 2)
  assert batch["image_sizes"].tolist() == [[20, 64], [60, 44], [0, 0]]
  assert batch["pack_plan.num_tokens"].tolist() == [*counts, 0]
  for i, size in enumerate(SIZES):
    per_side = (batch["input_ids"][i] == config.image_token_id).sum(-1).tolist()
    if size is None:
      assert per_side == [0, 0] and not batch["pixel_values"][i].any()
      assert not batch["pack_plan.valid"][i].any()
      continue
    hf_count = _onevision_processor_count(size)
    assert per_side == [counts[i], counts[i]] == [hf_count, hf_count]
    tiles = anyres.num_tiles(size, config.packing)
    hf_pixels = image_processor(images=_image(i, size), return_tensors="np")["pixel_values"]
    assert hf_pixels.shape[1] == tiles
    np.testing.assert_allclose(
      batch["pixel_values"][i, :tiles],
      hf_pixels[0].transpose(0, 2, 3, 1),
      atol=1e-6,
    )
    assert not batch["pixel_values"][i, tiles:].any()
  # Labels: exactly each side's answer (and the end of its turn), never a placeholder.
  for i, answers in enumerate(ANSWERS):
    for side, answer in enumerate(answers):
      labels = batch["labels"][i, side]
      ids = batch["input_ids"][i, side]
      kept = labels != IGNORE_INDEX
      assert np.array_equal(labels[kept], ids[kept])
      assert not np.any(kept & (ids == config.image_token_id))
      assert tokenizer.decode(labels[kept], skip_special_tokens=True).strip() == answer


def _onevision_processor_count(size: tuple[int, int]) -> int:
  """`LlavaOnevisionProcessor._get_number_of_features` for this folder, run unbound (the
  processor itself needs torchvision for its video processor; the arithmetic reads these)."""
  cls = transformers.LlavaOnevisionProcessor
  ns = types.SimpleNamespace(
    image_processor=types.SimpleNamespace(image_grid_pinpoints=tiny_hf.ONEVISION_PINPOINTS),
    patch_size=8, num_additional_image_tokens=0, num_image_tokens=16,
    vision_aspect_ratio="anyres_max_1",
  )  # fmt: skip
  ns._get_unpadded_features = functools.partial(cls._get_unpadded_features, ns)
  return cls._get_number_of_features(ns, *size, 32, 32)


def image_config_is_none(data: preference.PreferenceData) -> bool:
  return data.image_config is None and data.tiling is not None


def test_tile_buckets_drop_pairs_and_give_static_shapes(folders):
  dropped, _ = _data(folders, "onevision", tile_buckets=(3,))
  assert dropped.stats["dropped_too_many_tiles"] == 1 and len(dropped) == 2
  assert dropped.rows(np.arange(2))["pixel_values"].shape[1] == 3
  data, _ = _data(folders, "onevision", tile_buckets=(3, 5))
  shapes = lambda b: {k: v.shape for k, v in b.items() if k != "pair_index"}
  wide_and_text = data.rows(np.array([0, 2]))
  assert wide_and_text["pixel_values"].shape[1] == 3  # the smallest bucket holding them
  assert shapes(data.rows(np.array([1, 2])))["pixel_values"][1] == 5
  # local_batch picks the bucket of the global batch, so every step of one bucket compiles once.
  assert shapes(data.local_batch(0, 2, 0, 2)) == shapes(data.local_batch(0, 2, 1, 2))


def _hand_logps(ref, batch, data, pixels_from_batch=True) -> np.ndarray:
  """[L, 2] summed answer log-probs from transformers' logits, each sequence alone."""
  out = np.zeros(batch["input_ids"].shape[:2])
  for i in range(out.shape[0]):
    size = tuple(int(x) for x in batch["image_sizes"][i])
    extra = {}
    if size[0]:
      tiles = anyres.num_tiles(size, data.tiling.packing)
      pixels = batch["pixel_values"][i : i + 1, :tiles].transpose(0, 1, 4, 2, 3)
      extra = {"pixel_values": torch.from_numpy(np.ascontiguousarray(pixels)),
               "image_sizes": torch.tensor([size])}  # fmt: skip
    for side in range(2):
      n = int(batch["attention_mask"][i, side].sum())
      ids = torch.from_numpy(batch["input_ids"][i, side, :n].astype(np.int64))[None]
      with torch.no_grad():
        logits = ref(input_ids=ids, **extra).logits[0].double()
      logp = torch.log_softmax(logits[:-1], -1).numpy()
      targets = batch["labels"][i, side, 1:n]
      kept = targets != IGNORE_INDEX
      out[i, side] = logp[np.flatnonzero(kept), targets[kept]].sum()
  return out


@pytest.mark.parametrize("name", ["onevision", "next"])
def test_dpo_sequence_logps_equal_transformers(folders, name):
  data, _ = _data(folders, name)
  batch = data.rows(np.arange(3))
  model, params = hf.load_pretrained(folders[name])
  logps = jax.jit(lambda p, b: dpo.pair_logps(model, {"params": p}, b, average=False))(
    params, {k: v for k, v in batch.items() if k != "pair_index"}
  )
  cls = {
    "onevision": transformers.LlavaOnevisionForConditionalGeneration,
    "next": transformers.LlavaNextForConditionalGeneration,
  }[name]
  expected = _hand_logps(cls.from_pretrained(folders[name]).eval(), batch, data)
  np.testing.assert_allclose(np.asarray(logps), expected, atol=1e-4, rtol=0)
  assert abs(expected[0, 0] - expected[0, 1]) > 1e-3  # two answers, two numbers

  # The precomputed reference pass: batches of 2 (the last padded with a repeat).
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  with jax.set_mesh(mesh):
    cached = dpo.precompute_reference_logps(model, {"params": params}, data, 2, False, mesh)
  np.testing.assert_allclose(cached, expected, atol=1e-4, rtol=0)


def _state(params, tx):
  return state_lib.TrainState(
    step=jnp.zeros((), jnp.int32), params=params,
    opt_state=optim.init_optimizer_state(tx, params, "float32"),
    rng=jax.random.key_data(jax.random.key(0)),
  )  # fmt: skip


def test_one_dpo_step_and_one_reward_step_train_on_an_anyres_batch(folders):
  data, config = _data(folders, "onevision")
  batch = {k: v for k, v in data.rows(np.arange(3)).items() if k != "pair_index"}
  model, params = hf.load_pretrained(folders["onevision"])
  tx = optax.adam(1e-3)
  dpo_config = _config(folders["onevision"]).dpo
  step = jax.jit(lambda s, b, f: dpo.dpo_train_step(
    s, b, f, model=model, reference_model=model, tx=tx, trainable=(".*",), dpo=dpo_config,
    state_dtype="float32",
  ))  # fmt: skip
  frozen = {"base": None, "reference": params}
  state, metrics = step(_state(params, tx), batch, frozen)
  assert float(metrics["loss"]) == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state.params, params)
  assert moved["vision_tower"]["patch_embedding"]["kernel"] > 0
  assert moved["image_newline"] > 0 and moved["multi_modal_projector"]["linear_1"]["kernel"] > 0
  _, metrics = step(state, batch, frozen)
  assert float(metrics["rewards/margin"]) > 0  # one step already prefers the chosen answers

  head = ScalarHead()
  head_params = flax.linen.unbox(
    head.init(jax.random.key(1), jnp.zeros((1, 1, config.text.hidden_size)))
  )["params"]
  rm_params = {"backbone": params, "head": head_params}
  rm_step = jax.jit(lambda s, b: reward.reward_train_step(
    s, b, None, model=model, head=head, tx=tx, trainable=(".*",), centering_coef=1e-3,
    centering="abs_mean", state_dtype="float32",
  ))  # fmt: skip
  rm_state, rm_metrics = rm_step(_state(rm_params, tx), batch)
  assert np.isfinite(float(rm_metrics["loss"]))
  rewards = np.asarray(reward.pair_rewards(model, head, {"params": params}, head_params, batch))
  margins = rewards[:, 0] - rewards[:, 1]
  assert float(rm_metrics["bt_loss"]) == pytest.approx(np.mean(np.logaddexp(0, -margins)), abs=1e-5)
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), rm_state.params, rm_params)
  assert moved["backbone"]["vision_tower"]["patch_embedding"]["kernel"] > 0
  assert moved["head"]["kernel"] > 0


def _pairs_jsonl(tmp_path) -> tuple[pathlib.Path, pathlib.Path]:
  """(image folder, folder of pairs.jsonl): the three pairs twice, images as PNG files."""
  prompts, pairs_dir = tmp_path / "prompts", tmp_path / "pairs"
  prompts.mkdir(), pairs_dir.mkdir()
  rows = []
  for record, size in zip(_records() * 2, SIZES * 2):
    row = dict(record, id=f"{record['id']}_{len(rows)}")
    if size is not None:
      record["image"].save(prompts / f"{row['id']}.png")
      row["image"] = f"{row['id']}.png"
    rows.append(row)
  (pairs_dir / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return prompts, pairs_dir


def test_iterative_dpo_stage_trains_and_exports_a_onevision_policy(folders, tmp_path):
  """The LLaVA-Critic loop's DPO stage on a OneVision policy: `iterative.dpo_config` on the
  round's pairs.jsonl, `dpo.train` (reference log-probs precomputed), `export_policy`."""
  loop_config = config_files.load_config(LOOP_CONFIG, str(REPO))
  loop_config.train = _config(folders["onevision"])
  loop_config.epochs_per_round = 0.0
  prompts, pairs_dir = _pairs_jsonl(tmp_path)
  train_config = iterative.dpo_config(loop_config, 0, str(folders["onevision"]), pairs_dir, prompts)
  train_config = copy.deepcopy(train_config)
  dpo.train(train_config, str(tmp_path / "dpo"))
  metrics = [json.loads(x) for x in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
  assert len(metrics) == 2 and metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
  assert all(np.isfinite(m["loss"]) for m in metrics)
  iterative.export_policy(tmp_path / "dpo", str(folders["onevision"]), tmp_path / "export")
  trained = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "export")
  start = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(folders["onevision"])
  delta = max(
    float((a - b).abs().max())
    for a, b in zip(trained.state_dict().values(), start.state_dict().values())
  )
  assert delta > 0


def test_reward_model_trains_on_a_next_policy_and_its_anyres_pairs(folders, tmp_path):
  """`reward.train` (the vanilla RM recipe) from a LLaVA-NeXT folder (the vicuna_v1 template of
  LLaVA-NeXT-Vicuna: the reward prompt needs a USER/ASSISTANT chat) on pairs with images: the
  pairs are tiled, the steps train, the held-out pair is scored."""
  prompts, pairs_dir = _pairs_jsonl(tmp_path)
  config = config_files.load_config("configs/shapes/reward.py:runlocal,vanilla", str(REPO))
  config = main.apply_overrides(config, {
    "init_from": str(folders["next"]), "data.source": "pairs_jsonl",
    "data.path": str(pairs_dir / "pairs.jsonl"), "data.image_folder": str(prompts),
    "data.template": "vicuna_v1", "data.max_length": 512, "data.buckets": (256, 512),
    "batch_size": 2, "total_steps": 2, "mesh.num_devices": 2, "mesh.sizes": (-1, 1, 1),
    "reward.eval_pairs": 1, "optim.warmup_steps": 0,
  })  # fmt: skip
  summary = reward.train(config, str(tmp_path / "rm"))
  metrics = [json.loads(x) for x in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
  assert len(metrics) == 2 and all(np.isfinite(m["loss"]) for m in metrics)
  assert summary["data"]["kept"] == 5 and summary["eval_pairs"] == 1
  train_data, _ = reward.reward_data(
    config, folders["tokenizer"], hf.load_pretrained(folders["next"])[0].config
  )
  batch = train_data.rows(np.arange(len(train_data)))
  assert batch["pixel_values"].shape[:2] == (5, 5) and "pack_plan.taps" in batch
