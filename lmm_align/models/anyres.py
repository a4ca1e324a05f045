"""Anyres feature packing for LLaVA-NeXT and LLaVA-OneVision, as transformers' `pack_image_features`.

An anyres image reaches the vision tower as a base tile (the whole image squashed to one tile)
followed by the tiles of a `rows x cols` grid (see `lmm_align.data.anyres`). Each tile gives
`P = s * s` features (`s = tile_size // patch_size`, no class token). Packing turns the tiles'
features [tiles, P, D] of one image into the sequence the decoder reads:

  1. the base tile's P features, in patch order;
  2. the grid tiles' features laid out as one `[rows * s, cols * s]` feature map;
  3. unpadded to the original aspect ratio (`unpad_image`: the rows or columns that only saw
     the processor's zero padding are cut, symmetrically);
  4. OneVision only (`anyres_max_N`): when the unpadded map holds more than `1.1**2 * N` tiles'
     worth of features, bilinearly downsampled by `ratio = sqrt(h * w / (N * s * s))` to
     `(int(h // ratio), int(w // ratio))` (torch `interpolate(mode="bilinear")`,
     `align_corners=False`, no antialias);
  5. read row by row, `image_newline` after each row.

A single-tile image (OneVision's multi-image mode) is its P features then one `image_newline`.

Static shapes. Every size above is a function of the image's (height, width) and the config,
so it is computed on the host, in numpy, from Python ints. The packing is then a gather: a
`PackPlan` holds, for each output token, the flat indices (into that image's [tiles * P]
features) of the 2 x 2 bilinear taps and their row and column weights (taps of weight 0 and
(1, 0) weights where there is no interpolation), and whether the token is `image_newline`.
`apply_pack_plan` applies it with `take_along_axis` inside jit. The plan's arrays are data, not
shapes, so one compiled step serves every image size for a given (tile bucket, token budget).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# transformers' class defaults (LlavaNextConfig, LlavaOnevisionConfig and their towers).
LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
LLAVA_ONEVISION_PINPOINTS = tuple((384 * i, 384 * j) for i in range(1, 7) for j in range(1, 7))
_FAMILY_DEFAULTS = {
  "llava_next": dict(pinpoints=LLAVA_NEXT_PINPOINTS, tile_size=336, patch_size=14, aspect=None),
  "llava_onevision": dict(
    pinpoints=LLAVA_ONEVISION_PINPOINTS, tile_size=384, patch_size=14, aspect="anyres_max_9"
  ),
}
# OneVision downsamples only when the unpadded map is this much larger (per side) than N tiles.
DOWNSAMPLE_THRESHOLD = 1.1


def parse_pinpoints(pinpoints: Any, tile_size: int, field: str = "image_grid_pinpoints"):
  """Validates `image_grid_pinpoints` -> tuple of (height, width) multiples of `tile_size`.

  transformers counts a pinpoint's tiles with a ceil (`image_size_to_num_patches`) but lays the
  grid out with a floor (`get_anyres_image_grid_shape`); they agree only on multiples of the
  tile size, so anything else is refused here rather than mis-packed later.
  """
  try:
    parsed = tuple((int(h), int(w)) for h, w in pinpoints)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{field} must be a list of [height, width] pairs, got {pinpoints!r}") from e
  if not parsed:
    raise ValueError(f"{field} is empty: anyres needs at least one [height, width] resolution")
  for h, w in parsed:
    if h <= 0 or w <= 0 or h % tile_size or w % tile_size:
      raise ValueError(
        f"{field} entry [{h}, {w}] is not a positive multiple of the tile size {tile_size}"
      )
  return parsed


def parse_max_num_tiles(vision_aspect_ratio: str | None) -> int | None:
  """OneVision's `vision_aspect_ratio` "anyres_max_N" -> N; None (LLaVA-NeXT) -> None."""
  if vision_aspect_ratio is None:
    return None
  match = re.fullmatch(r"anyres_max_(\d+)", str(vision_aspect_ratio))
  if not match or int(match.group(1)) <= 0:
    raise ValueError(
      f"vision_aspect_ratio {vision_aspect_ratio!r} is not supported: expected 'anyres_max_N'"
    )
  return int(match.group(1))


@dataclasses.dataclass(frozen=True)
class AnyresPackingConfig:
  """What the model needs to pack one image's tile features.

  image_grid_pinpoints: candidate (height, width) resolutions, multiples of tile_size.
  tile_size: the vision tower's input side (`vision_config.image_size`).
  patch_size: the vision tower's patch side; s = tile_size // patch_size features per side
    (floored, as the tower's strided conv does).
  max_num_tiles: OneVision's N in `anyres_max_N` (downsampling); None for LLaVA-NeXT.
  """

  image_grid_pinpoints: tuple[tuple[int, int], ...]
  tile_size: int
  patch_size: int
  max_num_tiles: int | None = None

  def __post_init__(self):
    object.__setattr__(self, "tile_size", int(self.tile_size))
    object.__setattr__(self, "patch_size", int(self.patch_size))
    # Not necessarily a multiple: SigLIP-so400m/14 at 384 sees 27 x 27 patches (the conv
    # drops the last 6 pixels), and transformers takes image_size // patch_size too.
    if self.patch_size <= 0 or self.tile_size < self.patch_size:
      raise ValueError(
        f"vision image_size {self.tile_size} must be at least patch_size {self.patch_size} > 0"
      )
    pins = parse_pinpoints(self.image_grid_pinpoints, self.tile_size)
    object.__setattr__(self, "image_grid_pinpoints", pins)
    if self.max_num_tiles is not None:
      object.__setattr__(self, "max_num_tiles", int(self.max_num_tiles))
      if self.max_num_tiles <= 0:
        raise ValueError(f"max_num_tiles must be positive, got {self.max_num_tiles}")

  @property
  def side(self) -> int:
    """s: features per tile side."""
    return self.tile_size // self.patch_size

  @property
  def features_per_tile(self) -> int:
    """P = s * s."""
    return self.side**2

  @property
  def max_tiles_per_image(self) -> int:
    """1 + the largest grid among the pinpoints: the tile count no image exceeds."""
    return 1 + max(h * w for h, w in self.image_grid_pinpoints) // self.tile_size**2

  @classmethod
  def from_hf_config(cls, d: Mapping[str, Any]) -> AnyresPackingConfig:
    """Reads a LLaVA-NeXT or LLaVA-OneVision `config.json` dict (missing keys: class defaults)."""
    family = d.get("model_type")
    if family not in _FAMILY_DEFAULTS:
      raise ValueError(
        f"model_type {family!r} has no anyres packing: expected one of {sorted(_FAMILY_DEFAULTS)}"
      )
    defaults = _FAMILY_DEFAULTS[family]
    vision = d.get("vision_config") or {}
    aspect = d.get("vision_aspect_ratio", defaults["aspect"]) if family != "llava_next" else None
    return cls(
      image_grid_pinpoints=d.get("image_grid_pinpoints") or defaults["pinpoints"],
      tile_size=vision.get("image_size", defaults["tile_size"]),
      patch_size=vision.get("patch_size", defaults["patch_size"]),
      max_num_tiles=parse_max_num_tiles(aspect),
    )


# ---------------------------------------------------------------------------------------------
# Geometry on the host (Python ints), shared with the preprocessing.
# ---------------------------------------------------------------------------------------------


def select_best_resolution(
  image_size: tuple[int, int], pinpoints: Sequence[tuple[int, int]]
) -> tuple[int, int]:
  """The pinpoint that keeps most of the image's pixels, then wastes least (transformers' rule).

  Args:
    image_size: (height, width) of the original image.
    pinpoints: candidate (height, width) resolutions; the first of equal ones wins.
  """
  height, width = (int(x) for x in image_size)
  if height <= 0 or width <= 0:
    raise ValueError(f"image size must be positive (height, width), got {tuple(image_size)}")
  best, best_effective, best_wasted = None, 0, float("inf")
  for pin_h, pin_w in pinpoints:
    scale = min(pin_w / width, pin_h / height)
    effective = min(int(width * scale) * int(height * scale), width * height)
    wasted = pin_w * pin_h - effective
    if effective > best_effective or (effective == best_effective and wasted < best_wasted):
      best, best_effective, best_wasted = (int(pin_h), int(pin_w)), effective, wasted
  if best is None:
    raise ValueError(f"no usable resolution in image_grid_pinpoints {list(pinpoints)}")
  return best


def grid_shape(image_size: tuple[int, int], config: AnyresPackingConfig) -> tuple[int, int]:
  """(rows, cols) of tiles the image is cut into (besides the base tile)."""
  best_h, best_w = select_best_resolution(image_size, config.image_grid_pinpoints)
  return best_h // config.tile_size, best_w // config.tile_size


def num_tiles(image_size: tuple[int, int], config: AnyresPackingConfig) -> int:
  """1 + rows * cols: the tiles an anyres image sends through the tower."""
  rows, cols = grid_shape(image_size, config)
  return 1 + rows * cols


def unpadded_window(image_size: tuple[int, int], current: tuple[int, int]) -> tuple[slice, slice]:
  """transformers' `unpad_image` as slices of a [current_h, current_w] map.

  The processor fitted the image into the grid keeping its aspect ratio and zero-padded the
  rest, centred; the map rows (or columns) that cover only padding are cut, the same number
  from each side.
  """
  height, width = image_size
  cur_h, cur_w = current
  if width / height > cur_w / cur_h:
    new_h = int(round(height * (cur_w / width), 7))
    pad = (cur_h - new_h) // 2
    return slice(pad, cur_h - pad), slice(0, cur_w)
  new_w = int(round(width * (cur_h / height), 7))
  pad = (cur_w - new_w) // 2
  return slice(0, cur_h), slice(pad, cur_w - pad)


def packed_grid_shape(
  image_size: tuple[int, int], config: AnyresPackingConfig
) -> tuple[tuple[slice, slice], tuple[int, int]]:
  """The unpadded window of the grid feature map and the (rows, cols) after downsampling."""
  rows, cols = grid_shape(image_size, config)
  s = config.side
  window = unpadded_window(image_size, (rows * s, cols * s))
  cur_h = window[0].stop - window[0].start
  cur_w = window[1].stop - window[1].start
  out = (cur_h, cur_w)
  if config.max_num_tiles is not None:
    ratio = np.sqrt(cur_h * cur_w / (config.max_num_tiles * s**2))
    if ratio > DOWNSAMPLE_THRESHOLD:
      out = (int(cur_h // ratio), int(cur_w // ratio))
  return window, out


def num_image_tokens(
  image_size: tuple[int, int], config: AnyresPackingConfig, anyres: bool = True
) -> int:
  """Image placeholders the model fills for one image, as transformers counts them.

  anyres: P base features + rows * (cols + 1) for the unpadded (OneVision: possibly
  downsampled) grid with one `image_newline` per row. Otherwise (OneVision multi-image) a
  single tile: P + 1.
  """
  if not anyres:
    return config.features_per_tile + 1
  _, (rows, cols) = packed_grid_shape(image_size, config)
  return config.features_per_tile + rows * (cols + 1)


def _bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """torch's `upsample_bilinear2d` source indices and weights along one axis.

  align_corners=False with no scale factor given: scale = in / out, the source coordinate is
  max(scale * (dst + 0.5) - 0.5, 0), floored for the first tap, the second tap one further
  (clamped at the edge). Computed in float32, as torch's CPU kernel does for float inputs.
  Returns (index0 [out], index1 [out], weights [out, 2]).
  """
  dst = np.arange(out_size)
  if in_size == out_size:
    return dst, dst, np.stack([np.ones(out_size), np.zeros(out_size)], -1).astype(np.float32)
  scale = np.float32(in_size) / np.float32(out_size)
  real = np.maximum(scale * (dst.astype(np.float32) + np.float32(0.5)) - np.float32(0.5), 0)
  real = real.astype(np.float32)
  index0 = np.minimum(np.floor(real).astype(np.int64), in_size - 1)
  lambda1 = np.clip(real - index0.astype(np.float32), 0, 1).astype(np.float32)
  index1 = index0 + (index0 < in_size - 1)
  weights = np.stack([np.float32(1) - lambda1, lambda1], -1).astype(np.float32)
  return index0, index1, weights


# ---------------------------------------------------------------------------------------------
# The packing plan (host) and its application (jit).
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PackPlan:
  """Where each packed token of a batch of N images comes from (L tokens per image, padded).

  taps: int32 [N, L, 2, 2], flat indices into the image's features [tiles * P]; taps[..., i, j]
    is the (row tap i, column tap j) of the bilinear stencil.
  row_weights, col_weights: float32 [N, L, 2]; (1, 0) where a token copies one feature.
  is_newline: bool [N, L], the token is `image_newline`.
  valid: bool [N, L], False past the image's own token count.
  num_tokens: int32 [N].
  """

  taps: np.ndarray
  row_weights: np.ndarray
  col_weights: np.ndarray
  is_newline: np.ndarray
  valid: np.ndarray
  num_tokens: np.ndarray

  def as_arrays(self) -> dict[str, np.ndarray]:
    """The plan as a dict of arrays, to ride in a batch into a jitted step."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _image_plan(image_size, config: AnyresPackingConfig, anyres: bool):
  """One image's (taps [L, 2, 2], row_w [L, 2], col_w [L, 2], is_newline [L])."""
  s, p = config.side, config.features_per_tile
  base = np.arange(p)
  if not anyres:
    flat = np.concatenate([base, [0]])
    rows_w = np.tile(np.float32([1, 0]), (p + 1, 1))
    newline = np.zeros(p + 1, bool)
    newline[-1] = True
    return np.broadcast_to(flat[:, None, None], (p + 1, 2, 2)), rows_w, rows_w, newline

  _, cols = grid_shape(image_size, config)
  (win_y, win_x), (out_h, out_w) = packed_grid_shape(image_size, config)
  cur_h, cur_w = win_y.stop - win_y.start, win_x.stop - win_x.start
  y0, y1, wy = _bilinear_taps(cur_h, out_h)
  x0, x1, wx = _bilinear_taps(cur_w, out_w)

  def flat_index(y, x):
    # Map position (y, x) of the full [rows * s, cols * s] map -> tile 1 + (y//s)*cols + x//s.
    y, x = y + win_y.start, x + win_x.start
    return (1 + (y // s) * cols + x // s) * p + (y % s) * s + (x % s)

  yy = np.stack([y0, y1], -1)[:, None, :, None]  # [out_h, 1, 2, 1]
  xx = np.stack([x0, x1], -1)[None, :, None, :]  # [1, out_w, 1, 2]
  grid_taps = flat_index(yy, xx)  # [out_h, out_w, 2, 2]
  # One newline column after each row; its taps point at feature 0 with weight 0.
  taps = np.concatenate([grid_taps, np.zeros((out_h, 1, 2, 2), np.int64)], 1)
  row_w = np.concatenate(
    [np.broadcast_to(wy[:, None], (out_h, out_w, 2)), np.zeros((out_h, 1, 2))], 1
  )
  col_w = np.concatenate([np.broadcast_to(wx[None], (out_h, out_w, 2)), np.zeros((out_h, 1, 2))], 1)
  newline = np.zeros((out_h, out_w + 1), bool)
  newline[:, -1] = True
  one = np.tile(np.float32([1, 0]), (p, 1))
  return (
    np.concatenate([np.broadcast_to(base[:, None, None], (p, 2, 2)), taps.reshape(-1, 2, 2)]),
    np.concatenate([one, row_w.reshape(-1, 2)]),
    np.concatenate([one, col_w.reshape(-1, 2)]),
    np.concatenate([np.zeros(p, bool), newline.reshape(-1)]),
  )


def pack_plan(
  image_sizes: Sequence[tuple[int, int] | None],
  config: AnyresPackingConfig,
  max_tokens: int | None = None,
  anyres: Sequence[bool] | bool = True,
) -> PackPlan:
  """The packing plan of N images, padded to `max_tokens` (default: the longest image's count).

  Args:
    image_sizes: (height, width) of each original image; None (or a 0 size) for a slot with no
      image (a text-only row), which gets no tokens.
    config: the model's packing settings.
    max_tokens: L, the token budget per image (a bucket); an image needing more raises.
    anyres: per image (or for all), False for a single tile (OneVision multi-image).
  """
  if isinstance(anyres, bool):
    anyres = [anyres] * len(image_sizes)
  if len(anyres) != len(image_sizes):
    raise ValueError(f"anyres has {len(anyres)} flags for {len(image_sizes)} images")
  plans = []
  for size, tiled in zip(image_sizes, anyres):
    if size is None or min(size) == 0:
      plans.append(None)
    else:
      plans.append(_image_plan(tuple(int(x) for x in size), config, bool(tiled)))
  counts = np.array([0 if pl is None else len(pl[3]) for pl in plans], np.int32)
  length = int(counts.max(initial=0)) if max_tokens is None else int(max_tokens)
  if counts.size and counts.max() > length:
    worst = int(np.argmax(counts))
    raise ValueError(
      f"max_tokens={length} is too small: image {worst} of size {tuple(image_sizes[worst])} "
      f"packs into {counts[worst]} tokens"
    )
  n = len(image_sizes)
  taps = np.zeros((n, length, 2, 2), np.int32)
  row_w = np.zeros((n, length, 2), np.float32)
  col_w = np.zeros((n, length, 2), np.float32)
  is_newline = np.zeros((n, length), bool)
  for i, pl in enumerate(plans):
    if pl is not None:
      k = counts[i]
      taps[i, :k], row_w[i, :k], col_w[i, :k], is_newline[i, :k] = pl
  valid = np.arange(length)[None, :] < counts[:, None]
  return PackPlan(taps, row_w, col_w, is_newline, valid, counts)


def apply_pack_plan(
  features: Array, image_newline: Array, plan: PackPlan | Mapping[str, Array]
) -> Array:
  """Packs tile features by a plan; jit-compatible, shapes fixed by (tiles, L).

  Args:
    features: [N, tiles, P, D], each image's tile features (base tile first; padded tiles are
      never read).
    image_newline: [D], the learned row separator.
    plan: a `PackPlan` or its `as_arrays()` dict (arrays may be traced).

  Returns:
    [N, L, D] in the features' dtype: the packed tokens, zeros where `valid` is False.
  """
  get = plan.get if isinstance(plan, Mapping) else lambda k: getattr(plan, k)
  n, tiles, p, d = features.shape
  taps = get("taps")
  if isinstance(taps, np.ndarray) and taps.size and taps.max() >= tiles * p:
    raise ValueError(
      f"the plan reads feature {taps.max()} but features hold {tiles} tiles x {p} = {tiles * p}"
    )
  taps = jnp.asarray(taps)
  flat = features.reshape(n, tiles * p, d)
  col_w = jnp.asarray(get("col_weights"), jnp.float32)
  row_w = jnp.asarray(get("row_weights"), jnp.float32)

  def tap(i: int, j: int) -> Array:
    # One [N, L, D] gather per stencil tap, so that XLA can fuse each into the weighted sum
    # instead of materialising all four ([N, L, 4, D] is ~0.4 GB per OneVision-7B image).
    return jnp.take_along_axis(flat, taps[:, :, i, j, None], axis=1).astype(jnp.float32)

  # torch's order: interpolate along the columns within each row tap, then across the rows.
  rows = [tap(i, 0) * col_w[..., 0:1] + tap(i, 1) * col_w[..., 1:2] for i in (0, 1)]
  packed = rows[0] * row_w[..., 0:1] + rows[1] * row_w[..., 1:2]
  packed = jnp.where(jnp.asarray(get("is_newline"))[..., None], image_newline, packed)
  packed = jnp.where(jnp.asarray(get("valid"))[..., None], packed, 0)
  return packed.astype(features.dtype)


def pack_image_features(
  features: Array,
  image_size: tuple[int, int],
  config: AnyresPackingConfig,
  image_newline: Array,
  anyres: bool = True,
) -> Array:
  """One image's packed features, as transformers' `pack_image_features` returns them.

  Args:
    features: [tiles, P, D] (tiles >= the image's tile count; extra padded tiles are ignored).
    image_size: (height, width) of the original image, Python ints (static under jit).
    config: the model's packing settings.
    image_newline: [D].
    anyres: False for a single-tile image (OneVision multi-image).

  Returns:
    [num_image_tokens(image_size, config, anyres), D].
  """
  tiles, p, _ = features.shape
  if p != config.features_per_tile:
    raise ValueError(
      f"features have {p} per tile, the config's tile_size {config.tile_size} / patch_size "
      f"{config.patch_size} gives {config.features_per_tile} (a class token not dropped?)"
    )
  need = num_tiles(image_size, config) if anyres else 1
  if tiles < need:
    raise ValueError(f"image of size {tuple(image_size)} needs {need} tiles, features have {tiles}")
  plan = pack_plan([image_size], config, anyres=anyres)
  return apply_pack_plan(features[None], image_newline, plan)[0]
