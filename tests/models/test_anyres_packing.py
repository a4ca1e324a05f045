"""Anyres packing against transformers' LLaVA-NeXT / LLaVA-OneVision `pack_image_features`."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import transformers

from lmm_align.models import anyres

TILE, PATCH = 32, 8  # s = 4 features per tile side, P = 16
NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
# OneVision's grid of 1..4 tiles per side: large enough that anyres_max_2 downsamples.
OV_PINPOINTS = [[TILE * i, TILE * j] for i in range(1, 5) for j in range(1, 5)]
# (height, width): wide, tall, tiny, square, larger than every pinpoint, extreme ratios.
SIZES = [(37, 53), (90, 30), (3, 5), (64, 64), (500, 420), (1, 100), (100, 1), (41, 129), (200, 70)]
HIDDEN = 24


def _llava_next():
  config = transformers.LlavaNextConfig(
    text_config=transformers.LlamaConfig(
      vocab_size=64, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=1,
      num_attention_heads=2, num_key_value_heads=1,
    ),
    vision_config=transformers.CLIPVisionConfig(
      image_size=TILE, patch_size=PATCH, hidden_size=16, intermediate_size=32,
      num_hidden_layers=2, num_attention_heads=2,
    ),
    image_grid_pinpoints=NEXT_PINPOINTS,
    image_token_index=63,
  )  # fmt: skip
  torch.manual_seed(0)
  return transformers.LlavaNextForConditionalGeneration(config).eval()


def _llava_onevision(aspect: str):
  config = transformers.LlavaOnevisionConfig(
    text_config=transformers.Qwen2Config(
      vocab_size=64, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=1,
      num_attention_heads=2, num_key_value_heads=1,
    ),
    vision_config=transformers.SiglipVisionConfig(
      image_size=TILE, patch_size=PATCH, hidden_size=16, intermediate_size=32,
      num_hidden_layers=2, num_attention_heads=2,
    ),
    image_grid_pinpoints=OV_PINPOINTS,
    vision_aspect_ratio=aspect,
    image_token_index=63,
  )  # fmt: skip
  torch.manual_seed(0)
  return transformers.LlavaOnevisionForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def next_model():
  return _llava_next()


@pytest.fixture(scope="module", params=["anyres_max_2", "anyres_max_9"])
def ov_model(request):
  return _llava_onevision(request.param)


def _random_features(config: anyres.AnyresPackingConfig, sizes, seed=0):
  rng = np.random.default_rng(seed)
  return [
    rng.normal(size=(anyres.num_tiles(s, config), config.features_per_tile, HIDDEN)).astype(
      np.float32
    )
    for s in sizes
  ]


def _hf_pack(model, features, sizes, newline, **kw):
  with torch.no_grad():
    packed, lens = model.model.pack_image_features(
      [torch.from_numpy(f) for f in features],
      torch.tensor(sizes),
      image_newline=torch.from_numpy(newline),
      **kw,
    )
  return [p.numpy() for p in packed], lens.tolist()


def _check_against_hf(config, model, sizes, hf_kw):
  features = _random_features(config, sizes)
  newline = np.random.default_rng(1).normal(size=HIDDEN).astype(np.float32)
  expected, lens = _hf_pack(model, features, sizes, newline, **hf_kw)
  assert lens == [anyres.num_image_tokens(s, config) for s in sizes]
  # One jitted call for the batch: features padded to the largest tile count.
  tiles = max(f.shape[0] for f in features)
  padded = np.stack([np.pad(f, ((0, tiles - len(f)), (0, 0), (0, 0))) for f in features])
  plan = anyres.pack_plan(sizes, config, max_tokens=max(lens) + 7)
  packed = np.asarray(jax.jit(anyres.apply_pack_plan)(padded, newline, plan.as_arrays()))
  for i, (want, n) in enumerate(zip(expected, lens)):
    np.testing.assert_allclose(packed[i, :n], want, atol=1e-5, err_msg=f"image {sizes[i]}")
    np.testing.assert_array_equal(packed[i, n:], 0)
  # The one-image entry point gives the same.
  single = anyres.pack_image_features(features[0], sizes[0], config, newline)
  np.testing.assert_allclose(np.asarray(single), expected[0], atol=1e-5)


def test_llava_next_packing_equals_transformers(next_model):
  config = anyres.AnyresPackingConfig.from_hf_config(next_model.config.to_dict())
  assert config.max_num_tiles is None and config.features_per_tile == 16
  _check_against_hf(config, next_model, SIZES, dict(vision_feature_select_strategy="default"))


def test_llava_onevision_packing_equals_transformers(ov_model):
  config = anyres.AnyresPackingConfig.from_hf_config(ov_model.config.to_dict())
  aspect = ov_model.config.vision_aspect_ratio
  assert config.max_num_tiles == int(aspect.rsplit("_", 1)[1])
  downsampled = [
    s for s in SIZES if anyres.packed_grid_shape(s, config)[1] != _unpadded_shape(s, config)
  ]
  # Both paths run: anyres_max_2 downsamples most sizes, anyres_max_9 only the 4 x 4 grid.
  assert (4 if aspect == "anyres_max_2" else 1) <= len(downsampled) < len(SIZES)
  _check_against_hf(config, ov_model, SIZES, dict(vision_aspect_ratio=aspect))


def _unpadded_shape(size, config):
  (ys, xs), _ = anyres.packed_grid_shape(size, config)
  return (ys.stop - ys.start, xs.stop - xs.start)


def _model_packed_lengths(model, sizes, config, **kw):
  """Token counts from the model's own forward path: tower -> projector -> pack."""
  tiles = max(anyres.num_tiles(s, config) for s in sizes)
  pixels = torch.randn(len(sizes), tiles, 3, TILE, TILE)
  with torch.no_grad():
    out = model.model.get_image_features(pixel_values=pixels, image_sizes=torch.tensor(sizes), **kw)
  return [len(f) for f in out.pooler_output]


def test_token_counts_equal_the_models_packed_lengths(next_model, ov_model):
  next_config = anyres.AnyresPackingConfig.from_hf_config(next_model.config.to_dict())
  ov_config = anyres.AnyresPackingConfig.from_hf_config(ov_model.config.to_dict())
  sizes = [(37, 53), (90, 30), (500, 420), (1, 100)]
  assert _model_packed_lengths(next_model, sizes, next_config) == [
    anyres.num_image_tokens(s, next_config) for s in sizes
  ]
  assert _model_packed_lengths(ov_model, sizes, ov_config) == [
    anyres.num_image_tokens(s, ov_config) for s in sizes
  ]
  # OneVision multi-image: two images in one sample are single tiles, P + 1 tokens each.
  pixels = torch.randn(2, 1, 3, TILE, TILE)
  with torch.no_grad():
    out = ov_model.model.get_image_features(
      pixel_values=pixels, image_sizes=torch.tensor(sizes[:2]), batch_num_images=torch.tensor([2])
    )
  assert [len(f) for f in out.pooler_output] == [
    anyres.num_image_tokens(s, ov_config, anyres=False) for s in sizes[:2]
  ]


def test_single_tile_images_pack_like_transformers(ov_model):
  config = anyres.AnyresPackingConfig.from_hf_config(ov_model.config.to_dict())
  rng = np.random.default_rng(2)
  features = [rng.normal(size=(1, 16, HIDDEN)).astype(np.float32) for _ in range(2)]
  newline = rng.normal(size=HIDDEN).astype(np.float32)
  expected, lens = _hf_pack(ov_model, features, [(30, 40), (50, 20)], newline)
  plan = anyres.pack_plan([(30, 40), (50, 20), None], config, anyres=[False, False, False])
  padded = np.concatenate([np.stack(features), np.zeros((1, 1, 16, HIDDEN), np.float32)])
  packed = np.asarray(anyres.apply_pack_plan(padded, newline, plan))
  assert plan.num_tokens.tolist() == [*lens, 0]
  for i in range(2):
    np.testing.assert_allclose(packed[i], expected[i], atol=1e-6)
  np.testing.assert_array_equal(packed[2], 0)


def test_bilinear_taps_equal_torch_interpolate():
  rng = np.random.default_rng(3)
  for in_hw, out_hw in [((12, 9), (5, 4)), ((7, 16), (3, 11)), ((10, 10), (10, 3))]:
    x = rng.normal(size=in_hw).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(x)[None, None], out_hw, mode="bilinear")
    y0, y1, wy = anyres._bilinear_taps(in_hw[0], out_hw[0])
    x0, x1, wx = anyres._bilinear_taps(in_hw[1], out_hw[1])
    rows = [x[y][:, x0] * wx[:, 0] + x[y][:, x1] * wx[:, 1] for y in (y0, y1)]
    got = rows[0] * wy[:, :1] + rows[1] * wy[:, 1:]
    np.testing.assert_allclose(got, want[0, 0].numpy(), atol=1e-6)


def test_one_compiled_packing_serves_every_image_size():
  config = anyres.AnyresPackingConfig(OV_PINPOINTS, TILE, PATCH, max_num_tiles=2)
  traces = []

  @jax.jit
  def pack(features, newline, plan):
    traces.append(1)
    return anyres.apply_pack_plan(features, newline, plan)

  features = np.ones((2, config.max_tiles_per_image, 16, 4), np.float32)
  newline = np.zeros(4, np.float32)
  for sizes in [[(37, 53), (90, 30)], [(500, 420), (3, 5)], [(1, 100), None]]:
    out = pack(features, newline, anyres.pack_plan(sizes, config, max_tokens=200).as_arrays())
    counts = [0 if s is None else anyres.num_image_tokens(s, config) for s in sizes]
    # Ones in, so a packed token is 1 (bilinear weights sum to 1), a newline 0, padding 0.
    np.testing.assert_allclose(np.asarray(out).sum(axis=(1, 2)) / 4, [
      c - (0 if s is None else anyres.packed_grid_shape(s, config)[1][0])
      for c, s in zip(counts, sizes)
    ], rtol=1e-6)  # fmt: skip
  assert len(traces) == 1


def test_select_best_resolution_equals_transformers():
  from transformers.image_processing_utils import select_best_resolution

  pins = [tuple(p) for p in OV_PINPOINTS] + [(336, 672), (672, 336), (1008, 336)]
  for size in [*SIZES, (336, 672), (1000, 1000), (7, 3000)]:
    assert anyres.select_best_resolution(size, pins) == tuple(select_best_resolution(size, pins))


def test_bad_input_names_the_field():
  with pytest.raises(ValueError, match=r"image_grid_pinpoints entry \[32, 48\]"):
    anyres.AnyresPackingConfig([[32, 48]], TILE, PATCH)
  with pytest.raises(ValueError, match="image_grid_pinpoints is empty"):
    anyres.AnyresPackingConfig([], TILE, PATCH)
  with pytest.raises(ValueError, match="at least patch_size 33"):
    anyres.AnyresPackingConfig(NEXT_PINPOINTS, TILE, 33)
  assert anyres.AnyresPackingConfig(NEXT_PINPOINTS, TILE, 7).features_per_tile == 16  # floored
  with pytest.raises(ValueError, match="vision_aspect_ratio 'anyres'"):
    anyres.AnyresPackingConfig.from_hf_config(
      {"model_type": "llava_onevision", "vision_aspect_ratio": "anyres"}
    )
  with pytest.raises(ValueError, match="model_type 'llava'"):
    anyres.AnyresPackingConfig.from_hf_config({"model_type": "llava"})
  config = anyres.AnyresPackingConfig(NEXT_PINPOINTS, TILE, PATCH)
  with pytest.raises(ValueError, match="max_tokens=20 is too small: image 1 of size"):
    anyres.pack_plan([(3, 5), (90, 30)], config, max_tokens=20)
  newline = np.zeros(4, np.float32)
  with pytest.raises(ValueError, match="features have 17 per tile"):
    anyres.pack_image_features(np.zeros((5, 17, 4), np.float32), (30, 40), config, newline)
  with pytest.raises(ValueError, match=r"plan reads feature 63 but features hold 3 tiles x 16"):
    plan = anyres.pack_plan([(90, 30)], config)
    anyres.apply_pack_plan(np.zeros((1, 3, 16, 4), np.float32), newline, plan)
  with pytest.raises(ValueError, match=r"needs 4 tiles, features have 2"):
    anyres.pack_image_features(np.zeros((2, 16, 4), np.float32), (90, 30), config, newline)


@pytest.mark.parametrize("family", ["next", "onevision"])
def test_bucketed_batch_through_the_tower_packs_like_get_image_features(next_model, family):
  """The composition's route: preprocess to a tile bucket, run the tower on every tile (padding
  included), pack by the plan; equal to transformers' get_image_features on the same pixels."""
  from lmm_align.data import anyres as data_anyres

  model = next_model if family == "next" else _llava_onevision("anyres_max_2")
  config = anyres.AnyresPackingConfig.from_hf_config(model.config.to_dict())
  image_config = data_anyres.AnyresImageConfig(
    model.config.image_grid_pinpoints,
    size=TILE if family == "next" else (TILE, TILE),
    crop_size=(TILE, TILE) if family == "next" else None,
    do_center_crop=family == "next",
    processor_type="LlavaNextImageProcessor"
    if family == "next"
    else "LlavaOnevisionImageProcessor",
  )
  rng = np.random.default_rng(4)
  images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(37, 53), (120, 40)]]
  batch = data_anyres.preprocess_anyres_batch(
    images, image_config, tile_buckets=(config.max_tiles_per_image,)
  )
  b, t = batch.pixel_values.shape[:2]
  assert batch.num_tiles.min() < t  # some tiles are padding, run through the tower too
  pixels = torch.from_numpy(batch.pixel_values.transpose(0, 1, 4, 2, 3).copy())
  sizes = torch.from_numpy(batch.image_sizes)
  with torch.no_grad():
    want = model.model.get_image_features(pixel_values=pixels, image_sizes=sizes).pooler_output
    hidden = model.model.vision_tower(pixels.flatten(0, 1), output_hidden_states=True)
    selected = hidden.hidden_states[model.config.vision_feature_layer]
    if model.config.vision_feature_select_strategy == "default":
      selected = selected[:, 1:]
    features = model.model.multi_modal_projector(selected).numpy().reshape(b, t, -1, HIDDEN)
  plan = anyres.pack_plan([tuple(s) for s in batch.image_sizes.tolist()], config)
  packed = np.asarray(
    anyres.apply_pack_plan(features, model.model.image_newline.detach().numpy(), plan)
  )
  for i in range(b):
    n = plan.num_tokens[i]
    assert n == len(want[i]) == anyres.num_image_tokens(tuple(batch.image_sizes[i]), config)
    np.testing.assert_allclose(packed[i, :n], want[i].numpy(), atol=1e-5)
