"""LLaVA-NeXT / LLaVA-OneVision anyres preprocessing in pillow + numpy, equal to transformers'
`LlavaNextImageProcessorPil` / `LlavaOnevisionImageProcessorPil`.

Per image (anyres):
  1. convert to RGB (see `images.to_rgb` for the alpha choice);
  2. pick the best resolution among `image_grid_pinpoints` (`select_best_resolution`);
  3. resize (PIL, on uint8) to fit that resolution keeping the aspect ratio: the limiting side
     takes the target, the other `min(ceil(side * scale), target)`;
  4. zero-pad to the resolution, centred (the odd pixel after);
  5. cut into `tile x tile` tiles, row-major; prepend the base tile: the whole original image
     resized (squashed) to `size`;
  6. each tile: resize to `size` (a no-op for the grid tiles of the released configs), center
     crop to `crop_size` when enabled, rescale (float64, cast to float32), normalise in float32.
OneVision's multi-image mode (several images in one sample) skips 2-5: the image is padded to a
square with the mean colour and becomes one tile.

Output is channels-last float32 [tiles, H, W, 3] (HF returns [tiles, 3, H, W]). A batch is
padded with zero tiles to a tile count from a small set (`tile_buckets`) so that one compiled
step serves a run, with each image's real tile count and (height, width) alongside.

The placeholder count per image is `num_image_tokens` (from `lmm_align.models.anyres`, where
the packing it counts lives): a prompt gets exactly that many image tokens.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from lmm_align.data import images
from lmm_align.models.anyres import (
  LLAVA_NEXT_PINPOINTS,
  LLAVA_ONEVISION_PINPOINTS,
  AnyresPackingConfig,
  num_image_tokens,
  parse_max_num_tiles,
  parse_pinpoints,
  select_best_resolution,
)

__all__ = [
  "AnyresBatch",
  "AnyresImageConfig",
  "choose_tile_bucket",
  "num_image_tokens",
  "preprocess_anyres_batch",
  "preprocess_anyres_image",
  "preprocess_single_tile_image",
  "resize_for_patching",
  "select_best_resolution",
]

# The class defaults of transformers' two processors, keyed by `image_processor_type` stem.
_FAMILIES = {
  "LlavaNextImageProcessor": dict(
    size={"shortest_edge": 224},
    crop_size={"height": 224, "width": 224},
    do_center_crop=True,
    image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
  ),
  "LlavaOnevisionImageProcessor": dict(
    size={"height": 384, "width": 384},
    crop_size=None,
    do_center_crop=False,
    image_grid_pinpoints=LLAVA_ONEVISION_PINPOINTS,
  ),
}


@dataclasses.dataclass(frozen=True)
class AnyresImageConfig:
  """What an anyres image processor does, as in an HF `preprocessor_config.json`.

  image_grid_pinpoints: candidate (height, width) resolutions, multiples of the tile size.
  size: an int is HF's {"shortest_edge": n}, a pair is {"height": h, "width": w}.
  crop_size: (height, width) of the center crop, or None; it also sets the tile size when given
    (HF's rule), else `size` does.
  do_center_crop: whether tiles are center cropped to `crop_size`.
  mean, std, resample, rescale_factor: as `images.ImageProcessorConfig`.
  processor_type: the transformers class this mirrors (written back by `to_hf_dict`).
  """

  image_grid_pinpoints: tuple[tuple[int, int], ...]
  size: int | tuple[int, int] = 336
  crop_size: tuple[int, int] | None = (336, 336)
  do_center_crop: bool = True
  mean: tuple[float, float, float] = images.OPENAI_CLIP_MEAN
  std: tuple[float, float, float] = images.OPENAI_CLIP_STD
  resample: int = images.BICUBIC
  rescale_factor: float = 1 / 255
  processor_type: str = "LlavaNextImageProcessor"

  def __post_init__(self):
    size = self.size
    size = int(size) if isinstance(size, int | np.integer) else tuple(int(s) for s in size)
    object.__setattr__(self, "size", size)
    if self.crop_size is not None:
      crop = self.crop_size
      crop = (int(crop), int(crop)) if isinstance(crop, int | np.integer) else tuple(crop)
      object.__setattr__(self, "crop_size", tuple(int(c) for c in crop))
    object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
    object.__setattr__(self, "std", tuple(float(s) for s in self.std))
    object.__setattr__(self, "resample", int(self.resample))
    object.__setattr__(self, "do_center_crop", bool(self.do_center_crop))
    if self.processor_type not in _FAMILIES:
      raise ValueError(
        f"image_processor_type {self.processor_type!r} is not one of {list(_FAMILIES)}"
      )
    if (isinstance(size, int) and size <= 0) or (not isinstance(size, int) and min(size) <= 0):
      raise ValueError(f"size must be positive, got {size}")
    if self.do_center_crop and self.crop_size is None:
      raise ValueError("do_center_crop=true needs a crop_size")
    if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
      raise ValueError(f"mean and std need 3 channels (std > 0), got {self.mean} and {self.std}")
    # Tiles are cut at `tile_size` and the model lays them out at its tower's input size, so
    # every tile must come out of steps 5-6 as tile_size x tile_size.
    out = self._tile_output_shape(self.tile_size)
    if out != (self.tile_size, self.tile_size):
      raise ValueError(
        f"size {size} with crop_size {self.crop_size} (do_center_crop={self.do_center_crop}) "
        f"turns a {self.tile_size}-pixel tile into {out}: tiles must stay square at the tile size"
      )
    pins = parse_pinpoints(self.image_grid_pinpoints, self.tile_size)
    object.__setattr__(self, "image_grid_pinpoints", pins)

  @property
  def tile_size(self) -> int:
    """The side tiles are cut at (HF's `patch_size`): crop height, else size height / edge."""
    if self.crop_size is not None:
      return self.crop_size[0]
    return self.size if isinstance(self.size, int) else self.size[0]

  @property
  def base_size(self) -> tuple[int, int]:
    """(height, width) the whole image is squashed to for the base tile."""
    return (self.size, self.size) if isinstance(self.size, int) else self.size

  def _tile_resize_size(self, height: int, width: int) -> tuple[int, int]:
    if isinstance(self.size, int):
      return images.resize_output_size(height, width, self.size)
    return self.size

  def _tile_output_shape(self, side: int) -> tuple[int, int]:
    if self.do_center_crop:
      return self.crop_size
    return self._tile_resize_size(side, side)

  def max_tiles_per_image(self) -> int:
    """1 + the largest grid: the tile count no image exceeds (the largest useful bucket)."""
    return 1 + max(h * w for h, w in self.image_grid_pinpoints) // self.tile_size**2

  def num_tiles(self, image_size: tuple[int, int]) -> int:
    """1 + rows * cols for an image of (height, width)."""
    best_h, best_w = select_best_resolution(image_size, self.image_grid_pinpoints)
    return 1 + (best_h // self.tile_size) * (best_w // self.tile_size)

  def packing_config(
    self, patch_size: int, vision_aspect_ratio: str | None = None
  ) -> AnyresPackingConfig:
    """The model-side packing settings that go with these tiles (for token counts).

    Args:
      patch_size: the vision tower's patch side (14 for CLIP-L/14-336 and SigLIP-so400m/14).
      vision_aspect_ratio: OneVision's "anyres_max_N"; None for LLaVA-NeXT.
    """
    return AnyresPackingConfig(
      self.image_grid_pinpoints,
      self.tile_size,
      patch_size,
      parse_max_num_tiles(vision_aspect_ratio),
    )

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any]) -> AnyresImageConfig:
    """Reads a `preprocessor_config.json` dict (or a `processor_config.json` that nests one).

    Missing keys take the defaults of the class named by `image_processor_type` (a `...Pil`
    or `...Fast` suffix is accepted). Disabled steps this module always runs raise ValueError.
    """
    if isinstance(d.get("image_processor"), Mapping):
      d = d["image_processor"]
    kind = str(d.get("image_processor_type", ""))
    for suffix in ("Pil", "Fast"):
      kind = kind.removesuffix(suffix)
    if kind not in _FAMILIES:
      raise ValueError(
        f"image_processor_type {d.get('image_processor_type')!r} is not an anyres processor: "
        f"expected one of {list(_FAMILIES)}"
      )
    defaults = _FAMILIES[kind]
    for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
      if d.get(flag, True) is False:
        raise ValueError(f"{flag}=false is not supported: this processor always runs that step")

    size = d.get("size") or defaults["size"]
    if isinstance(size, Mapping):
      keys = {k for k, v in size.items() if v is not None}
      if keys == {"shortest_edge"}:
        size = size["shortest_edge"]
      elif keys == {"height", "width"}:
        size = (size["height"], size["width"])
      else:
        raise ValueError(f"size {dict(size)} is not supported: use shortest_edge or height/width")
    crop = d.get("crop_size", defaults["crop_size"])
    if isinstance(crop, Mapping):
      if "height" not in crop or "width" not in crop:
        raise ValueError(f"crop_size {dict(crop)} needs 'height' and 'width'")
      crop = (crop["height"], crop["width"])
    do_crop = d.get("do_center_crop", defaults["do_center_crop"])
    return cls(
      image_grid_pinpoints=d.get("image_grid_pinpoints") or defaults["image_grid_pinpoints"],
      size=size,
      crop_size=crop,
      do_center_crop=bool(do_crop),
      mean=tuple(d.get("image_mean", images.OPENAI_CLIP_MEAN)),
      std=tuple(d.get("image_std", images.OPENAI_CLIP_STD)),
      resample=d.get("resample", images.BICUBIC),
      rescale_factor=d.get("rescale_factor", 1 / 255),
      processor_type=kind,
    )

  def to_hf_dict(self) -> dict[str, Any]:
    """The `preprocessor_config.json` dict the matching transformers class accepts."""
    size = (
      {"shortest_edge": self.size}
      if isinstance(self.size, int)
      else {"height": self.size[0], "width": self.size[1]}
    )
    crop = None if self.crop_size is None else dict(zip(("height", "width"), self.crop_size))
    return {
      "image_processor_type": self.processor_type,
      "do_convert_rgb": True,
      "do_resize": True,
      "size": size,
      "resample": self.resample,
      "do_center_crop": self.do_center_crop,
      "crop_size": crop,
      "do_rescale": True,
      "rescale_factor": self.rescale_factor,
      "do_normalize": True,
      "image_mean": list(self.mean),
      "image_std": list(self.std),
      "do_pad": True,
      "image_grid_pinpoints": [list(p) for p in self.image_grid_pinpoints],
    }


# llava-hf/llava-v1.6-*-hf (CLIP-L/14-336) and llava-hf/llava-onevision-qwen2-*-ov-hf (SigLIP).
LLAVA_NEXT_IMAGE_CONFIG = AnyresImageConfig(LLAVA_NEXT_PINPOINTS, size=336, crop_size=(336, 336))
LLAVA_ONEVISION_IMAGE_CONFIG = AnyresImageConfig(
  LLAVA_ONEVISION_PINPOINTS,
  size=(384, 384),
  crop_size=None,
  do_center_crop=False,
  mean=(0.5, 0.5, 0.5),
  std=(0.5, 0.5, 0.5),
  processor_type="LlavaOnevisionImageProcessor",
)


def resize_for_patching(image_size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
  """(height, width) the image is resized to inside `target`, aspect kept (HF's
  `get_patch_output_size`): the side with the smaller scale takes the target exactly."""
  height, width = image_size
  target_h, target_w = target
  scale_w, scale_h = target_w / width, target_h / height
  if scale_w < scale_h:
    return min(math.ceil(height * scale_w), target_h), target_w
  return target_h, min(math.ceil(width * scale_h), target_w)


def _finish_tile(tile: Image.Image, config: AnyresImageConfig) -> np.ndarray:
  """Step 6 on one uint8 tile: resize to size, crop, rescale, normalise -> float32 [H, W, 3]."""
  height, width = config._tile_resize_size(tile.height, tile.width)
  tile = tile.resize((width, height), resample=config.resample)
  pixels = np.asarray(tile)
  if config.do_center_crop:
    pixels = images.center_crop(pixels, config.crop_size)
  # Float64 rescale then float32, as HF does, keeps the values bit-identical.
  pixels = (pixels.astype(np.float64) * config.rescale_factor).astype(np.float32)
  mean = np.asarray(config.mean, dtype=np.float32)
  std = np.asarray(config.std, dtype=np.float32)
  return (pixels - mean) / std


def preprocess_anyres_image(
  image: Image.Image | np.ndarray, config: AnyresImageConfig, alpha: str = "drop"
) -> tuple[np.ndarray, tuple[int, int]]:
  """One image -> its tiles, base first, and its original (height, width).

  Args:
    image: PIL image (any mode) or uint8 array [H, W(, C)].
    config: the processor settings.
    alpha: transparency handling, see `images.to_rgb` (HF composites onto white).

  Returns:
    (float32 [1 + rows * cols, tile, tile, 3], (height, width)).
  """
  image = images.to_rgb(image, alpha=alpha)
  size = (image.height, image.width)
  best = select_best_resolution(size, config.image_grid_pinpoints)
  new_h, new_w = resize_for_patching(size, best)
  resized = np.asarray(image.resize((new_w, new_h), resample=config.resample))
  # Centred zero padding, the odd pixel at the bottom / right.
  top, left = (best[0] - new_h) // 2, (best[1] - new_w) // 2
  canvas = np.zeros((*best, 3), np.uint8)
  canvas[top : top + new_h, left : left + new_w] = resized
  t = config.tile_size
  base_h, base_w = config.base_size
  tiles = [image.resize((base_w, base_h), resample=config.resample)]
  tiles += [
    Image.fromarray(canvas[y : y + t, x : x + t])
    for y in range(0, best[0], t)
    for x in range(0, best[1], t)
  ]
  return np.stack([_finish_tile(tile, config) for tile in tiles]), size


def preprocess_single_tile_image(
  image: Image.Image | np.ndarray, config: AnyresImageConfig, alpha: str = "drop"
) -> tuple[np.ndarray, tuple[int, int]]:
  """OneVision's multi-image mode: pad to a square with the mean colour, one tile.

  Returns:
    (float32 [1, tile, tile, 3], (height, width)).
  """
  image = images.to_rgb(image, alpha=alpha)
  size = (image.height, image.width)
  square = images.expand_to_square(image, tuple(int(m * 255) for m in config.mean))
  return _finish_tile(square, config)[None], size


def choose_tile_bucket(tile_counts: Sequence[int], tile_buckets: Sequence[int]) -> int:
  """The smallest bucket holding the largest tile count; none: ValueError naming tile_buckets."""
  need = max(tile_counts, default=0)
  fits = [b for b in sorted(tile_buckets) if b >= need]
  if not fits:
    raise ValueError(
      f"an image needs {need} tiles, more than the largest of tile_buckets {sorted(tile_buckets)}"
    )
  return fits[0]


@dataclasses.dataclass(frozen=True)
class AnyresBatch:
  """A batch of anyres images with a static tile count.

  pixel_values: float32 [B, tiles, H, W, 3], zero tiles after each image's own.
  image_sizes: int32 [B, 2], original (height, width); (0, 0) for a text-only row.
  num_tiles: int32 [B], real tiles per row (0 for a text-only row).
  anyres: bool [B], False for a single-tile (multi-image mode) row.
  """

  pixel_values: np.ndarray
  image_sizes: np.ndarray
  num_tiles: np.ndarray
  anyres: np.ndarray


def preprocess_anyres_batch(
  batch: Sequence[Image.Image | np.ndarray | None],
  config: AnyresImageConfig,
  tile_buckets: Sequence[int],
  alpha: str = "drop",
  anyres: bool = True,
) -> AnyresBatch:
  """Images (None for a text-only row) -> an `AnyresBatch` padded to a tile bucket.

  Args:
    batch: one image or None per row.
    config: the processor settings.
    tile_buckets: allowed tile counts (e.g. `(5,)` for LLaVA-NeXT's 2 x 2 grids, or a few
      sizes up to `config.max_tiles_per_image()` for OneVision); the smallest that holds the
      batch is used.
    alpha: transparency handling, see `images.to_rgb`.
    anyres: False for OneVision's multi-image mode (one padded-square tile per image).
  """
  step = preprocess_anyres_image if anyres else preprocess_single_tile_image
  rows = [None if image is None else step(image, config, alpha=alpha) for image in batch]
  counts = [0 if r is None else len(r[0]) for r in rows]
  tiles = choose_tile_bucket(counts, tile_buckets)
  t = config.tile_size
  pixels = np.zeros((len(batch), tiles, t, t, 3), np.float32)
  sizes = np.zeros((len(batch), 2), np.int32)
  for i, r in enumerate(rows):
    if r is not None:
      pixels[i, : counts[i]] = r[0]
      sizes[i] = r[1]
  return AnyresBatch(
    pixel_values=pixels,
    image_sizes=sizes,
    num_tiles=np.asarray(counts, np.int32),
    anyres=np.full(len(batch), anyres),
  )


def image_config_for_model(
  model: Any, hf_dict: Mapping[str, Any] | None = None, source: str = "the model"
) -> AnyresImageConfig:
  """The anyres processor that goes with an anyres `ModelConfig`: a checkpoint's
  `preprocessor_config.json` dict when given, else transformers' defaults for the family at
  the tower's tile size. Raises ValueError naming `source` when its tiles or pinpoints are not
  the model's (the placeholders counted would not be the features packed)."""
  packing = model.packing
  if hf_dict is not None:
    config = AnyresImageConfig.from_hf_dict(hf_dict)
  else:
    base = LLAVA_NEXT_IMAGE_CONFIG if model.family == "llava_next" else LLAVA_ONEVISION_IMAGE_CONFIG
    t = packing.tile_size
    config = dataclasses.replace(
      base,
      image_grid_pinpoints=packing.image_grid_pinpoints,
      size=t if isinstance(base.size, int) else (t, t),
      crop_size=None if base.crop_size is None else (t, t),
    )
  if config.tile_size != packing.tile_size or tuple(config.image_grid_pinpoints) != tuple(
    packing.image_grid_pinpoints
  ):
    raise ValueError(
      f"{source}: the image processor cuts {config.tile_size}-pixel tiles on pinpoints "
      f"{list(config.image_grid_pinpoints)}, the model's config.json says "
      f"{packing.tile_size} on {list(packing.image_grid_pinpoints)}"
    )
  return config
