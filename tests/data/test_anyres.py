"""Anyres preprocessing against transformers' LLaVA-NeXT / LLaVA-OneVision PIL image processors."""

from __future__ import annotations

import dataclasses
import functools
import types

import numpy as np
import pytest
import transformers
from PIL import Image

from lmm_align.data import anyres
from lmm_align.models import anyres as packing

# Without torchvision transformers instantiates the PIL backends; they are the reference.
NEXT = transformers.LlavaNextImageProcessorPil
ONEVISION = transformers.LlavaOnevisionImageProcessorPil

NEXT_PINS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
OV_PINS = [[32 * i, 32 * j] for i in range(1, 4) for j in range(1, 4)]
SETTINGS = {
  "next": anyres.AnyresImageConfig(NEXT_PINS, size=32, crop_size=(32, 32)),
  # Tiles are resized up to 40 then centre-cropped back to 32; the base squashed to 40 first.
  "next_resize_crop": anyres.AnyresImageConfig(NEXT_PINS, size=40, crop_size=32),
  "onevision": anyres.AnyresImageConfig(
    OV_PINS,
    size=(32, 32),
    crop_size=None,
    do_center_crop=False,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    processor_type="LlavaOnevisionImageProcessor",
  ),
  "onevision_bilinear": anyres.AnyresImageConfig(
    [[32, 32], [32, 96], [96, 32], [64, 64], [64, 128]],
    size=(32, 32),
    crop_size=None,
    do_center_crop=False,
    resample=2,
    processor_type="LlavaOnevisionImageProcessor",
  ),
}
# (height, width): wide, tall, tiny, exactly a pinpoint, larger than every pinpoint, extreme.
SIZES = [(37, 53), (90, 30), (3, 5), (64, 64), (500, 420), (1, 100), (100, 1), (41, 129), (33, 97)]


def _image(height: int, width: int, seed: int = 0) -> Image.Image:
  rng = np.random.default_rng(seed + height * 1000 + width)
  return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _hf(config: anyres.AnyresImageConfig):
  cls = NEXT if config.processor_type == "LlavaNextImageProcessor" else ONEVISION
  return cls(**config.to_hf_dict())


@pytest.mark.parametrize("name", list(SETTINGS))
def test_tiles_equal_transformers(name):
  config = SETTINGS[name]
  hf = _hf(config)
  for size in SIZES:
    image = _image(*size)
    want = hf(image, return_tensors="np")
    got, got_size = anyres.preprocess_anyres_image(image, config)
    assert got_size == size == tuple(want["image_sizes"][0])
    assert got.shape == (config.num_tiles(size), 32, 32, 3)
    np.testing.assert_allclose(
      got, want["pixel_values"][0].transpose(0, 2, 3, 1), atol=1e-5, err_msg=f"{name} {size}"
    )


def test_batch_pads_to_a_tile_bucket_like_transformers_pads_to_the_longest():
  config = SETTINGS["onevision"]
  batch = [_image(37, 53), _image(500, 420), _image(3, 5)]
  want = _hf(config)(batch, return_tensors="np")
  got = anyres.preprocess_anyres_batch([*batch, None], config, tile_buckets=(4, 12, 10))
  assert got.pixel_values.shape == (4, 10, 32, 32, 3)  # 10 = 1 + 3 x 3, the smallest that fits
  assert got.num_tiles.tolist() == [5, 10, 2, 0]
  np.testing.assert_array_equal(got.image_sizes[:3], want["image_sizes"])
  np.testing.assert_array_equal(got.image_sizes[3], [0, 0])
  np.testing.assert_allclose(
    got.pixel_values[:3], want["pixel_values"].transpose(0, 1, 3, 4, 2), atol=1e-5
  )
  np.testing.assert_array_equal(got.pixel_values[3], 0)
  with pytest.raises(ValueError, match=r"needs 10 tiles, more than the largest of tile_buckets"):
    anyres.preprocess_anyres_batch(batch, config, tile_buckets=(5, 8))


def test_multi_image_mode_equals_transformers():
  config = SETTINGS["onevision"]
  batch = [_image(37, 53), _image(90, 30)]
  want = _hf(config)([batch], return_tensors="np")
  assert want["batch_num_images"].tolist() == [2]
  got = anyres.preprocess_anyres_batch(batch, config, tile_buckets=(1,), anyres=False)
  assert got.num_tiles.tolist() == [1, 1] and not got.anyres.any()
  np.testing.assert_allclose(
    got.pixel_values, want["pixel_values"].transpose(0, 1, 3, 4, 2), atol=1e-5
  )


def test_transparency_white_equals_transformers():
  config = SETTINGS["next"]
  rng = np.random.default_rng(5)
  rgba = Image.fromarray(rng.integers(0, 256, (40, 70, 4), dtype=np.uint8), "RGBA")
  want = _hf(config)(rgba, return_tensors="np")["pixel_values"][0].transpose(0, 2, 3, 1)
  got, _ = anyres.preprocess_anyres_image(rgba, config, alpha="white")
  np.testing.assert_allclose(got, want, atol=1e-5)


def _processor_count(family: str, size, pins, patch_size: int, aspect: str | None) -> int:
  """The processors' own placeholder arithmetic (`_get_number_of_features`), run unbound.

  LlavaNextProcessor / LlavaOnevisionProcessor need a tokenizer (and OneVision a video
  processor, which needs torchvision) to instantiate; the arithmetic reads only these fields.
  """
  cls = (
    transformers.LlavaNextProcessor if family == "next" else transformers.LlavaOnevisionProcessor
  )
  ns = types.SimpleNamespace(
    image_processor=types.SimpleNamespace(image_grid_pinpoints=pins),
    patch_size=patch_size,
    num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
    num_image_tokens=(32 // patch_size) ** 2,
    vision_aspect_ratio=aspect,
  )
  ns._get_unpadded_features = functools.partial(cls._get_unpadded_features, ns)
  count = cls._get_number_of_features(ns, *size, 32, 32)
  return count - 1 if family == "next" else count


@pytest.mark.parametrize(
  "family,setting,patch,aspect",
  [
    ("next", "next", 8, None),
    ("next", "next", 4, None),
    ("ov", "onevision", 8, "anyres_max_2"),
    ("ov", "onevision", 4, "anyres_max_9"),
    ("ov", "onevision_bilinear", 8, "anyres_max_1"),
  ],
)
def test_token_counts_equal_the_processors(family, setting, patch, aspect):
  config = SETTINGS[setting]
  pack = config.packing_config(patch, aspect)
  pins = [list(p) for p in config.image_grid_pinpoints]
  for size in [*SIZES, (200, 70), (70, 200), (64, 128)]:
    want = _processor_count(family, size, pins, patch, aspect)
    assert anyres.num_image_tokens(size, pack) == want, size
    assert packing.num_tiles(size, pack) == config.num_tiles(size)


def test_hf_dict_round_trip_and_released_configs():
  for config in SETTINGS.values():
    assert anyres.AnyresImageConfig.from_hf_dict(config.to_hf_dict()) == config
    # What transformers itself writes back reads the same.
    assert anyres.AnyresImageConfig.from_hf_dict(_hf(config).to_dict()) == config
  # The keys of llava-hf/llava-v1.6-mistral-7b-hf and llava-onevision-qwen2-7b-ov-hf.
  next_dict = {
    "image_processor_type": "LlavaNextImageProcessor",
    "crop_size": {"height": 336, "width": 336},
    "size": {"shortest_edge": 336},
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "do_center_crop": True,
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
  }
  assert anyres.AnyresImageConfig.from_hf_dict(next_dict) == anyres.LLAVA_NEXT_IMAGE_CONFIG
  ov_dict = {
    "processor_class": "LlavaOnevisionProcessor",
    "image_processor": {
      "image_processor_type": "LlavaOnevisionImageProcessor",
      "size": {"height": 384, "width": 384},
      "image_mean": [0.5, 0.5, 0.5],
      "image_std": [0.5, 0.5, 0.5],
    },
  }
  ov = anyres.AnyresImageConfig.from_hf_dict(ov_dict)
  assert ov == anyres.LLAVA_ONEVISION_IMAGE_CONFIG
  assert ov.tile_size == 384 and ov.max_tiles_per_image() == 37
  assert ov.packing_config(14, "anyres_max_9").features_per_tile == 729


def test_bad_configs_name_the_field():
  base = SETTINGS["next"]
  with pytest.raises(ValueError, match=r"image_grid_pinpoints entry \[32, 50\]"):
    dataclasses.replace(base, image_grid_pinpoints=[[32, 64], [32, 50]])
  with pytest.raises(ValueError, match="image_grid_pinpoints is empty"):
    dataclasses.replace(base, image_grid_pinpoints=[])
  with pytest.raises(ValueError, match="image_grid_pinpoints must be a list"):
    dataclasses.replace(base, image_grid_pinpoints=[32, 64])
  with pytest.raises(ValueError, match=r"turns a 32-pixel tile into \(40, 40\)"):
    dataclasses.replace(base, size=40, do_center_crop=False)
  hf = base.to_hf_dict()
  with pytest.raises(ValueError, match="do_resize=false"):
    anyres.AnyresImageConfig.from_hf_dict({**hf, "do_resize": False})
  with pytest.raises(ValueError, match="image_processor_type 'CLIPImageProcessor'"):
    anyres.AnyresImageConfig.from_hf_dict({**hf, "image_processor_type": "CLIPImageProcessor"})
  with pytest.raises(ValueError, match="size {'longest_edge': 32} is not supported"):
    anyres.AnyresImageConfig.from_hf_dict({**hf, "size": {"longest_edge": 32}})
  with pytest.raises(ValueError, match="image size must be positive"):
    anyres.select_best_resolution((0, 10), base.image_grid_pinpoints)
