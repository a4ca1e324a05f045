"""Image preprocessing against transformers' CLIP image processor and LLaVA's expand2square."""

import json

import numpy as np
import pytest
import transformers
from PIL import Image

from lmm_align.data import images

# LLaVA ran the PIL-based CLIPImageProcessor; transformers 5 keeps that path as
# CLIPImageProcessorPil (what CLIPImageProcessor falls back to without torchvision). The
# torchvision backend resizes tensors and differs by ~1e-2, so compare with the PIL one.
HFProcessor = transformers.CLIPImageProcessorPil

SHAPES = [(37, 53), (64, 31), (1, 100), (100, 1), (33, 33), (17, 40), (2, 3)]
SETTINGS = [
  dict(size=32, crop_size=32),
  dict(size=24, crop_size=(20, 27)),  # odd crop, smaller than the resized image
  dict(size=16, crop_size=(25, 40)),  # crop larger than the image: HF zero-pads
  dict(size=33, crop_size=31),
]


def _random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _hf_pixels(image: Image.Image, config: images.ImageProcessorConfig) -> np.ndarray:
  """HF's output for one image, moved to NHWC [H, W, 3]."""
  hf = HFProcessor(**config.to_hf_dict())
  return hf(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)


def _hand_expand2square(array: np.ndarray, fill: tuple[int, int, int]) -> np.ndarray:
  """LLaVA's expand2square written in numpy, independent of the module's PIL paste."""
  height, width, _ = array.shape
  side = max(height, width)
  canvas = np.empty((side, side, 3), np.uint8)
  canvas[:] = fill
  if width > height:
    top = (width - height) // 2
    canvas[top : top + height] = array
  else:
    left = (height - width) // 2
    canvas[:, left : left + width] = array
  return canvas


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: f"s{s['size']}c{s['crop_size']}")
def test_crop_mode_equals_hf(shape, setting):
  config = images.ImageProcessorConfig(**setting)
  array = _random_image(*shape)
  ours = images.preprocess_image(array, config)
  expected = _hf_pixels(Image.fromarray(array), config)
  assert ours.dtype == np.float32
  assert ours.shape == (*config.crop_size, 3) == expected.shape
  np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("setting", SETTINGS[:2], ids=lambda s: f"s{s['size']}")
def test_pad_mode_equals_expand2square_then_hf(shape, setting):
  config = images.ImageProcessorConfig(**setting, aspect_mode="pad")
  array = _random_image(*shape, seed=1)
  fill = tuple(int(x * 255) for x in config.mean)
  expected = _hf_pixels(Image.fromarray(_hand_expand2square(array, fill)), config)
  np.testing.assert_allclose(images.preprocess_image(array, config), expected, atol=1e-5, rtol=0)


def test_pad_color_is_llava_truncated_mean():
  assert images.CLIP_VIT_L14_336.pad_color == (122, 116, 104)


def test_pad_fills_the_border_with_the_mean_colour():
  # A wide black strip: after padding, the top and bottom rows are the mean colour, which
  # normalises to (int(m * 255) / 255 - m) / s, i.e. almost exactly zero.
  config = images.ImageProcessorConfig(size=16, crop_size=16, aspect_mode="pad")
  pixels = images.preprocess_image(np.zeros((4, 16, 3), np.uint8), config)
  mean, std = np.array(config.mean), np.array(config.std)
  border = (np.array(config.pad_color) / 255 - mean) / std
  np.testing.assert_allclose(pixels[0, 8], border, atol=1e-5)
  np.testing.assert_allclose(pixels[-1, 8], border, atol=1e-5)
  np.testing.assert_allclose(pixels[8, 8], -mean / std, atol=1e-5)  # the black strip


def test_clip_l14_336_preset_equals_hf_defaults():
  config = images.CLIP_VIT_L14_336
  hf = HFProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
  assert (config.size, config.crop_size) == (336, (336, 336))
  assert config.mean == tuple(hf.image_mean) and config.std == tuple(hf.image_std)
  assert config.resample == hf.resample == 3
  assert config.rescale_factor == hf.rescale_factor
  assert images.LLAVA_1_5_IMAGE_CONFIG.aspect_mode == "pad"
  array = _random_image(300, 451)
  np.testing.assert_allclose(
    images.preprocess_image(array, config),
    _hf_pixels(Image.fromarray(array), config),
    atol=1e-5,
    rtol=0,
  )


@pytest.mark.parametrize("mode", ["L", "P", "LA", "RGBA", "CMYK"])
def test_modes_convert_to_rgb_like_llava(mode):
  config = images.ImageProcessorConfig(size=12, crop_size=11)
  rgb = Image.fromarray(_random_image(13, 19, seed=2))
  image = rgb.convert(mode)
  # LLaVA's loader: Image.open(path).convert("RGB"), then the processor.
  expected = _hf_pixels(image.convert("RGB"), config)
  np.testing.assert_allclose(images.preprocess_image(image, config), expected, atol=1e-5, rtol=0)


def test_alpha_white_equals_hf_compositing():
  config = images.ImageProcessorConfig(size=12, crop_size=12)
  rgba = np.concatenate([_random_image(13, 19), _random_image(13, 19, seed=3)[..., :1]], -1)
  image = Image.fromarray(rgba)
  ours = images.preprocess_image(image, config, alpha="white")
  np.testing.assert_allclose(ours, _hf_pixels(image, config), atol=1e-5, rtol=0)
  dropped = images.preprocess_image(image, config, alpha="drop")
  assert np.abs(dropped - ours).max() > 0.1  # the two policies really differ on translucency


def test_grayscale_arrays_are_accepted():
  config = images.ImageProcessorConfig(size=8, crop_size=8)
  gray = _random_image(9, 10)[..., 0]
  expected = _hf_pixels(Image.fromarray(gray).convert("RGB"), config)
  np.testing.assert_allclose(images.preprocess_image(gray, config), expected, atol=1e-5)
  np.testing.assert_allclose(images.preprocess_image(gray[..., None], config), expected, atol=1e-5)


def test_batch_helper_stacks_nhwc():
  config = images.ImageProcessorConfig(size=10, crop_size=(10, 9))
  arrays = [_random_image(12, 20, seed=s) for s in range(3)]
  batch = images.preprocess_images(arrays, config)
  assert batch.shape == (3, 10, 9, 3) and batch.dtype == np.float32
  np.testing.assert_array_equal(batch[1], images.preprocess_image(arrays[1], config))
  assert images.preprocess_images([], config).shape == (0, 10, 9, 3)
  assert images.blank_pixel_values(config).shape == (10, 9, 3)


@pytest.mark.parametrize(
  "bad, match",
  [
    ("not an image", "not an image"),
    (None, "not an image"),
    (np.zeros((0, 5, 3), np.uint8), "zero-size"),
    (np.zeros((4, 0), np.uint8), "zero-size"),
    (Image.new("RGB", (0, 5)), "zero-size"),
    (np.zeros((4, 5, 3), np.float32), "uint8"),
    (np.zeros((4, 5, 2), np.uint8), "shape"),
    (np.zeros((2, 4, 5, 3), np.uint8), "shape"),
  ],
  ids=["str", "none", "zero-h", "zero-w", "pil-zero", "float", "2ch", "4d"],
)
def test_bad_input_raises(bad, match):
  with pytest.raises(ValueError, match=match):
    images.preprocess_image(bad, images.CLIP_VIT_L14_336)


def test_load_image(tmp_path):
  path = tmp_path / "a.png"
  Image.fromarray(_random_image(5, 6)).convert("P").save(path)
  assert images.load_image(path).mode == "RGB"
  (tmp_path / "b.png").write_bytes(b"not a png")
  with pytest.raises(ValueError, match="b.png"):
    images.load_image(tmp_path / "b.png")


def test_config_validation():
  with pytest.raises(ValueError, match="aspect_mode"):
    images.ImageProcessorConfig(aspect_mode="anyres")
  with pytest.raises(ValueError, match="crop_size"):
    images.ImageProcessorConfig(crop_size=(0, 3))
  with pytest.raises(ValueError, match="alpha"):
    images.preprocess_image(_random_image(4, 4), images.CLIP_VIT_L14_336, alpha="black")


def test_hf_dict_round_trip_through_transformers(tmp_path):
  config = images.ImageProcessorConfig(size=24, crop_size=(20, 27), aspect_mode="pad")
  assert images.ImageProcessorConfig.from_hf_dict(config.to_hf_dict()) == config
  HFProcessor(**config.to_hf_dict()).save_pretrained(tmp_path)
  saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
  assert images.ImageProcessorConfig.from_hf_dict(saved) == config


def test_from_hf_dict_reads_a_llava_processor_config(tmp_path):
  tokenizer = _tiny_tokenizer()
  processor = transformers.LlavaProcessor(
    image_processor=HFProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
    tokenizer=tokenizer,
    patch_size=8,
    vision_feature_select_strategy="default",
    image_token="<image>",
    num_additional_image_tokens=1,
  )
  processor.save_pretrained(tmp_path)
  saved = json.loads((tmp_path / "processor_config.json").read_text())
  config = images.ImageProcessorConfig.from_hf_dict(saved)
  assert config == images.ImageProcessorConfig(size=32, crop_size=32)


def _tiny_tokenizer():
  from lmm_align.data.tokenizer import train_bpe_tokenizer

  return train_bpe_tokenizer(["a small corpus"], vocab_size=270)


def test_from_hf_dict_legacy_int_sizes_and_defaults():
  # openai/clip-vit-large-patch14-336's preprocessor_config.json (feature-extractor era).
  legacy = {
    "crop_size": 336,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 336,
  }
  assert images.ImageProcessorConfig.from_hf_dict(legacy) == images.CLIP_VIT_L14_336
  assert images.ImageProcessorConfig.from_hf_dict({}) == images.ImageProcessorConfig()


@pytest.mark.parametrize(
  "d, match",
  [
    ({"do_center_crop": False}, "do_center_crop"),
    ({"size": {"height": 10, "width": 12}}, "shortest_edge"),
    ({"size": {"shortest_edge": 10, "longest_edge": 20}}, "shortest_edge"),
    ({"crop_size": {"height": 10}}, "width"),
    ({"image_aspect_ratio": "anyres"}, "anyres"),
  ],
)
def test_from_hf_dict_rejects_unsupported(d, match):
  with pytest.raises(ValueError, match=match):
    images.ImageProcessorConfig.from_hf_dict(d)
