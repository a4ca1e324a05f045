"""CLIP image preprocessing in pillow + numpy, equal to `transformers.CLIPImageProcessor`.

The pipeline is the one HF runs for CLIP (and LLaVA runs through it):

  1. convert to RGB;
  2. (LLaVA `image_aspect_ratio='pad'` only) `expand2square`: paste the image centred on a
     square canvas filled with the mean colour `tuple(int(x * 255) for x in mean)`;
  3. resize the shortest edge to `size` with PIL (bicubic) on the uint8 image; the long edge
     becomes `int(size * long / short)` (HF's `get_resize_output_image_size`,
     `default_to_square=False`);
  4. center crop to `crop_size`: offset `(in - out) // 2`; where the image is smaller than the
     crop it is zero-padded first, placed at `ceil((out - in) / 2)` (HF's `center_crop`);
  5. rescale by 1/255 (in float64, then cast to float32) and normalise `(x - mean) / std` in
     float32.

Output is NHWC float32: `[H, W, 3]` per image, `[B, H, W, 3]` for a batch (HF returns NCHW;
JAX convolutions want channels last).

Transparency: LLaVA opens images with `Image.open(path).convert("RGB")`, which drops alpha,
whereas HF's processor composites alpha onto white. `alpha="drop"` (default) follows LLaVA;
`alpha="white"` follows HF. They agree on every image without transparency.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the integer HF writes as "resample"

# "crop": shortest-edge resize then center crop (HF's default; LLaVA calls it "square").
# "pad": LLaVA's expand2square before the same steps (LLaVA-1.5, LLaVA-RLHF, RLAIF-V).
ASPECT_MODES = ("crop", "pad")
# LLaVA's `image_aspect_ratio` names for our modes, used in the HF dict round trip.
_LLAVA_ASPECT_NAMES = {"crop": "square", "pad": "pad"}
ALPHA_MODES = ("drop", "white")


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
  """What a CLIP image processor does, as in an HF `preprocessor_config.json`.

  size: target length of the shortest edge after resizing.
  crop_size: (height, width) of the center crop; an int means a square crop.
  mean, std: per-channel normalisation, on the [0, 1] scale.
  resample: PIL resampling filter id (3 = bicubic, as CLIP uses).
  aspect_mode: one of ASPECT_MODES.
  rescale_factor: multiplies uint8 values before normalisation.
  """

  size: int = 224
  crop_size: int | tuple[int, int] = 224
  mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
  std: tuple[float, float, float] = OPENAI_CLIP_STD
  resample: int = BICUBIC
  aspect_mode: str = "crop"
  rescale_factor: float = 1 / 255

  def __post_init__(self):
    # Normalise to hashable canonical forms so that equal configs compare equal.
    crop = self.crop_size
    if isinstance(crop, int | np.integer):
      crop = (int(crop), int(crop))
    crop = tuple(int(c) for c in crop)
    object.__setattr__(self, "crop_size", crop)
    object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
    object.__setattr__(self, "std", tuple(float(s) for s in self.std))
    object.__setattr__(self, "size", int(self.size))
    object.__setattr__(self, "resample", int(self.resample))
    if self.size <= 0:
      raise ValueError(f"size must be positive, got {self.size}")
    if len(crop) != 2 or min(crop) <= 0:
      raise ValueError(f"crop_size must be a positive int or (height, width), got {crop}")
    if len(self.mean) != 3 or len(self.std) != 3:
      raise ValueError(f"mean and std need 3 channels, got {self.mean} and {self.std}")
    if min(self.std) <= 0:
      raise ValueError(f"std must be positive, got {self.std}")
    if self.aspect_mode not in ASPECT_MODES:
      raise ValueError(f"aspect_mode {self.aspect_mode!r} is not one of {ASPECT_MODES}")

  @property
  def pad_color(self) -> tuple[int, int, int]:
    """The expand2square fill colour, truncated exactly as LLaVA does: (122, 116, 104) for CLIP."""
    return tuple(int(m * 255) for m in self.mean)

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any]) -> ImageProcessorConfig:
    """Reads a `preprocessor_config.json` dict, or a `processor_config.json` one that nests it.

    Missing keys take `CLIPImageProcessor`'s class defaults. Settings this module does not
    implement (a disabled step, a (height, width) resize, `anyres`) raise ValueError rather
    than silently preprocessing differently.
    """
    if isinstance(d.get("image_processor"), Mapping):
      d = d["image_processor"]
    for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"):
      if d.get(flag, True) is False:
        raise ValueError(f"{flag}=false is not supported: this processor always runs that step")

    size = d.get("size", 224)
    if isinstance(size, Mapping):
      if set(k for k, v in size.items() if v is not None) != {"shortest_edge"}:
        raise ValueError(f"size {dict(size)} is not supported: only {{'shortest_edge': n}}")
      size = size["shortest_edge"]
    crop = d.get("crop_size", 224)
    if isinstance(crop, Mapping):
      if "height" not in crop or "width" not in crop:
        raise ValueError(f"crop_size {dict(crop)} needs 'height' and 'width'")
      crop = (crop["height"], crop["width"])

    aspect = d.get("image_aspect_ratio") or "square"
    modes = {v: k for k, v in _LLAVA_ASPECT_NAMES.items()} | {"crop": "crop"}
    if aspect not in modes:
      raise ValueError(f"image_aspect_ratio {aspect!r} is not supported: use 'pad' or 'square'")
    return cls(
      size=size,
      crop_size=crop,
      mean=tuple(d.get("image_mean", OPENAI_CLIP_MEAN)),
      std=tuple(d.get("image_std", OPENAI_CLIP_STD)),
      resample=d.get("resample", BICUBIC),
      aspect_mode=modes[aspect],
      rescale_factor=d.get("rescale_factor", 1 / 255),
    )

  def to_hf_dict(self) -> dict[str, Any]:
    """The `preprocessor_config.json` dict that `CLIPImageProcessor(**d)` accepts.

    `image_aspect_ratio` (LLaVA's name for the aspect mode) rides along as an extra key;
    HF keeps it as an attribute and ignores it, so the mode survives a round trip.
    """
    return {
      "image_processor_type": "CLIPImageProcessor",
      "do_convert_rgb": True,
      "do_resize": True,
      "size": {"shortest_edge": self.size},
      "resample": self.resample,
      "do_center_crop": True,
      "crop_size": {"height": self.crop_size[0], "width": self.crop_size[1]},
      "do_rescale": True,
      "rescale_factor": self.rescale_factor,
      "do_normalize": True,
      "image_mean": list(self.mean),
      "image_std": list(self.std),
      "image_aspect_ratio": _LLAVA_ASPECT_NAMES[self.aspect_mode],
    }


# openai/clip-vit-large-patch14-336, the LLaVA-1.5 vision tower.
CLIP_VIT_L14_336 = ImageProcessorConfig(size=336, crop_size=336)
# What LLaVA-1.5 (and LLaVA-RLHF, RLAIF-V) feed that tower: the same with pad mode.
LLAVA_1_5_IMAGE_CONFIG = dataclasses.replace(CLIP_VIT_L14_336, aspect_mode="pad")


def to_rgb(image: Image.Image | np.ndarray, alpha: str = "drop") -> Image.Image:
  """Validates an image and returns it as an RGB PIL image.

  Args:
    image: a PIL image of any mode, or a uint8 array [H, W], [H, W, 1], [H, W, 3] or [H, W, 4].
    alpha: "drop" discards transparency (LLaVA's `.convert("RGB")`); "white" composites it
      onto white (HF's `convert_to_rgb`).
  """
  if alpha not in ALPHA_MODES:
    raise ValueError(f"alpha {alpha!r} is not one of {ALPHA_MODES}")
  if isinstance(image, np.ndarray):
    image = _array_to_pil(image)
  elif not isinstance(image, Image.Image):
    raise ValueError(
      f"not an image: expected a PIL.Image.Image or a uint8 array, got {type(image)}"
    )
  if image.width == 0 or image.height == 0:
    raise ValueError(f"zero-size image: {image.width}x{image.height} (width x height)")
  has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
  if alpha == "white" and has_alpha:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
  return image if image.mode == "RGB" else image.convert("RGB")


def _array_to_pil(array: np.ndarray) -> Image.Image:
  if array.dtype != np.uint8:
    # Float arrays are ambiguous ([0, 1] or [0, 255]); make the caller decide.
    raise ValueError(f"image arrays must be uint8 [H, W(, C)], got dtype {array.dtype}")
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
    raise ValueError(f"image arrays must be [H, W] or [H, W, 1|3|4], got shape {array.shape}")
  if 0 in array.shape:
    raise ValueError(f"zero-size image: array shape {array.shape}")
  return Image.fromarray(array)


def load_image(path: str | os.PathLike, alpha: str = "drop") -> Image.Image:
  """Opens an image file as RGB; an unreadable file raises ValueError naming the path."""
  try:
    with Image.open(path) as image:
      image.load()
      return to_rgb(image, alpha=alpha)
  except (OSError, Image.DecompressionBombError) as e:
    raise ValueError(f"cannot read image {os.fspath(path)!r}: {e}") from e


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
  """LLaVA's expand2square: pads the short side equally-ish (extra pixel after), image centred."""
  width, height = image.size
  if width == height:
    return image
  side = max(width, height)
  canvas = Image.new(image.mode, (side, side), fill)
  canvas.paste(image, ((side - width) // 2, (side - height) // 2))
  return canvas


def resize_output_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
  """(new_height, new_width) with the short edge at `shortest_edge`, truncated as HF does."""
  short, long = (width, height) if width <= height else (height, width)
  new_long = int(shortest_edge * long / short)
  return (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)


def center_crop(array: np.ndarray, crop_size: tuple[int, int]) -> np.ndarray:
  """HF's center crop of an [H, W, C] array, zero-padding the axes shorter than the crop.

  Returns: [crop_h, crop_w, C], same dtype.
  """
  out = np.zeros((*crop_size, array.shape[-1]), dtype=array.dtype)
  src, dst = [], []
  for size_in, size_out in zip(array.shape[:2], crop_size):
    if size_out <= size_in:
      start = (size_in - size_out) // 2
      src.append(slice(start, start + size_out))
      dst.append(slice(0, size_out))
    else:
      start = math.ceil((size_out - size_in) / 2)
      src.append(slice(0, size_in))
      dst.append(slice(start, start + size_in))
  out[dst[0], dst[1]] = array[src[0], src[1]]
  return out


def preprocess_image(
  image: Image.Image | np.ndarray, config: ImageProcessorConfig, alpha: str = "drop"
) -> np.ndarray:
  """Image -> pixel values as the vision tower expects them.

  Args:
    image: PIL image (any mode) or uint8 array [H, W(, C)].
    config: the processor settings.
    alpha: transparency handling, see `to_rgb`.

  Returns:
    float32 [crop_h, crop_w, 3].
  """
  image = to_rgb(image, alpha=alpha)
  if config.aspect_mode == "pad":
    image = expand_to_square(image, config.pad_color)
  height, width = resize_output_size(image.height, image.width, config.size)
  # PIL on the uint8 image, as HF's PIL path does; resizing floats would differ slightly.
  image = image.resize((width, height), resample=config.resample)
  pixels = center_crop(np.asarray(image), config.crop_size)
  # HF rescales in float64 then casts, and normalises in float32; the same order keeps the
  # result bit-identical.
  pixels = (pixels.astype(np.float64) * config.rescale_factor).astype(np.float32)
  mean = np.asarray(config.mean, dtype=np.float32)
  std = np.asarray(config.std, dtype=np.float32)
  return (pixels - mean) / std


def preprocess_images(
  images: Sequence[Image.Image | np.ndarray], config: ImageProcessorConfig, alpha: str = "drop"
) -> np.ndarray:
  """Batch version of `preprocess_image`: returns float32 [B, crop_h, crop_w, 3]."""
  if len(images) == 0:
    return np.zeros((0, *config.crop_size, 3), np.float32)
  return np.stack([preprocess_image(image, config, alpha=alpha) for image in images])


def blank_pixel_values(config: ImageProcessorConfig) -> np.ndarray:
  """Zeros [crop_h, crop_w, 3]: LLaVA's stand-in image for text-only samples.

  LLaVA feeds `torch.zeros(3, H, W)` already in normalised space, so this is not the
  preprocessing of a black image.
  """
  return np.zeros((*config.crop_size, 3), np.float32)
