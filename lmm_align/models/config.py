"""Model configurations: frozen dataclasses (the variants are in `variants`, the HF config.json
conversion in `hf_config`).

The architecture fields mirror `transformers`' `CLIPVisionConfig`, `SiglipVisionConfig`,
`LlamaConfig`, `Qwen2Config` and `LlavaConfig` so that an HF `config.json` maps one to one;
the runtime fields (dtypes, scan, remat) are ours. Configs are hashable so that they can be
Flax module attributes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lmm_align.models.anyres import (
  AnyresPackingConfig,
  num_image_tokens,
  parse_max_num_tiles,
)

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
LLAVA_FAMILIES = ("llava", "llava_next", "llava_onevision")
TEXT_MODEL_TYPES = ("llama", "qwen2")
VISION_TOWERS = ("clip", "siglip")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters (Hu et al. 2021) on the dense layers whose module path matches `targets`.

  y = x W + (alpha / rank) * dropout(x) A B, A [in, rank] (Kaiming-uniform, as PEFT), B
  [rank, out] (zeros, so training starts at the base model). A and B live in the "lora"
  variable collection, apart from the frozen "params".
  targets: regexes over '/'-joined module paths, e.g. "language_model/.*(q|k|v|o)_proj".
  """

  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = (r"language_model/.*_proj",)

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
  """How the model computes, independent of what it computes.

  dtype: activation / matmul dtype ("float32" or "bfloat16").
  param_dtype: dtype params are created in by `init`.
  scan_layers: stack decoder layers and run them with `nn.scan` (one compiled layer).
  remat_policy: one of REMAT_POLICIES; "none" keeps every activation.
  lora: adapters on matching dense layers, or None.
  """

  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = True
  remat_policy: str = "none"
  lora: LoraConfig | None = None

  def __post_init__(self):
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy {self.remat_policy!r} is not one of {REMAT_POLICIES}")
    for field in ("dtype", "param_dtype"):
      if getattr(self, field) not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"{field}={getattr(self, field)!r}: use float32, bfloat16 or float16")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3 style frequency-dependent RoPE scaling ("llama3"), or plain position "linear" scaling."""

  rope_type: str = "llama3"
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """A LLaMA-architecture decoder: LLaMA (Vicuna, Llama 2, Llama 3 sizes) or Qwen2.

  model_type: "llama" or "qwen2", the HF family it is read from and exported as.
  qkv_bias: biases on the q, k and v projections (Qwen2's; o_proj never has one). This is not
    LLaMA's `attention_bias`, which also biases o_proj.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  pad_token_id: int | None = 0
  bos_token_id: int | None = 1
  eos_token_id: int | None = 2
  model_type: str = "llama"
  qkv_bias: bool = False

  def __post_init__(self):
    if self.model_type not in TEXT_MODEL_TYPES:
      raise ValueError(f"text model_type {self.model_type!r} is not one of {TEXT_MODEL_TYPES}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
      )


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """A ViT vision tower: CLIP's or SigLIP's.

  tower: "clip" (a class token, a pre-LayerNorm, no patch bias) or "siglip" (no class token, a
    patch conv with bias, no pre-LayerNorm). The SigLIP defaults differ: build one with
    `siglip_vision(...)` or from its HF config, which set `gelu_pytorch_tanh` and eps 1e-6.
  use_head: SigLIP's attention-pooling (MAP) head; LLaVA never reads it, and LLaVA-OneVision's
    tower is saved without it.
  """

  image_size: int
  patch_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  num_channels: int = 3
  tower: str = "clip"
  use_head: bool = False

  def __post_init__(self):
    if self.tower not in VISION_TOWERS:
      raise ValueError(f"vision tower {self.tower!r} is not one of {VISION_TOWERS}")
    if self.use_head and self.tower != "siglip":
      raise ValueError("use_head (the attention-pooling head) exists only on a SigLIP tower")
    if self.hidden_size % self.num_heads:
      raise ValueError(
        f"vision hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}"
      )

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def has_class_token(self) -> bool:
    return self.tower == "clip"


def siglip_vision(**fields: Any) -> VisionConfig:
  """A SigLIP tower with SigLIP's defaults (`SiglipVisionConfig`'s): gelu_pytorch_tanh, eps 1e-6."""
  return VisionConfig(
    **{"tower": "siglip", "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, **fields}
  )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A LLaVA model, or a text-only LLaMA when `vision` is None.

  Anyres (LLaVA-NeXT, LLaVA-OneVision) when `image_grid_pinpoints` is set: each image is a base
  tile plus a grid of tiles whose features are packed (unpadded, `image_newline` after each
  row; see `lmm_align.models.anyres`). `vision_aspect_ratio` ("anyres_max_N") makes it
  OneVision, which also downsamples large grids; without it the model is LLaVA-NeXT.
  """

  text: TextConfig
  vision: VisionConfig | None = None
  projector_type: str = "mlp2x_gelu"  # "mlp2x_gelu" (LLaVA-1.5) or "linear" (LLaVA / LLaVA-RLHF)
  projector_hidden_act: str = "gelu"
  projector_bias: bool = True
  vision_feature_layer: int | tuple[int, ...] = -2
  # "default" drops the first token of the tower's output ("full" keeps it): the CLS token of
  # CLIP, but a real patch of SigLIP, which has none; transformers drops it all the same.
  vision_feature_select_strategy: str = "default"
  image_token_id: int = 32000
  runtime: RuntimeConfig = RuntimeConfig()
  # Anyres: candidate (height, width) resolutions, multiples of the tower's image_size.
  image_grid_pinpoints: tuple[tuple[int, int], ...] | None = None
  vision_aspect_ratio: str | None = None  # OneVision's "anyres_max_N"
  video_token_id: int | None = None  # OneVision's; kept for export (videos are not read)

  def __post_init__(self):
    if isinstance(self.vision_feature_layer, list):
      object.__setattr__(self, "vision_feature_layer", tuple(self.vision_feature_layer))
    if self.image_grid_pinpoints is not None:
      if self.vision is None:
        raise ValueError("image_grid_pinpoints (anyres) needs a vision tower")
      pins = tuple(tuple(int(x) for x in pin) for pin in self.image_grid_pinpoints)
      object.__setattr__(self, "image_grid_pinpoints", pins)
      packing = self.packing  # validates the pinpoints against the tile size, the aspect ratio
      if self.features_per_tile != packing.features_per_tile:
        raise ValueError(
          f"vision_feature_select_strategy {self.vision_feature_select_strategy!r} leaves "
          f"{self.features_per_tile} features per tile, anyres packing needs "
          f"{packing.features_per_tile} ({packing.side} x {packing.side} patches)"
        )
    elif self.vision_aspect_ratio is not None:
      raise ValueError("vision_aspect_ratio (OneVision) needs image_grid_pinpoints")
    if self.projector_type not in ("mlp2x_gelu", "linear"):
      raise ValueError(f"projector_type {self.projector_type!r}: use 'mlp2x_gelu' or 'linear'")
    if self.vision_feature_select_strategy not in ("default", "full"):
      raise ValueError(
        f"vision_feature_select_strategy {self.vision_feature_select_strategy!r}: use 'default' or 'full'"
      )

  @property
  def has_vision(self) -> bool:
    return self.vision is not None

  @property
  def family(self) -> str:
    """The transformers model_type: "llava", "llava_next" or "llava_onevision"."""
    if self.image_grid_pinpoints is None:
      return "llava"
    return "llava_next" if self.vision_aspect_ratio is None else "llava_onevision"

  @property
  def anyres(self) -> bool:
    return self.image_grid_pinpoints is not None

  @property
  def packing(self) -> AnyresPackingConfig:
    """The anyres packing settings (tile and patch size from the tower)."""
    if self.image_grid_pinpoints is None:
      raise ValueError("packing: the config is not anyres (no image_grid_pinpoints)")
    return AnyresPackingConfig(
      image_grid_pinpoints=self.image_grid_pinpoints,
      tile_size=self.vision.image_size,
      patch_size=self.vision.patch_size,
      max_num_tiles=parse_max_num_tiles(self.vision_aspect_ratio),
    )

  @property
  def features_per_tile(self) -> int:
    """Projected features one tile (one image for LLaVA-1.5) gives after the select strategy."""
    if self.vision is None:
      return 0
    tokens = self.vision.num_patches + (1 if self.vision.has_class_token else 0)
    return tokens - (1 if self.vision_feature_select_strategy == "default" else 0)

  @property
  def num_image_tokens(self) -> int:
    """How many placeholder tokens one image occupies in `input_ids` (one tile, for anyres).

    For an anyres config this is a single-tile image's count (its features and one
    `image_newline`, OneVision's multi-image layout); a tiled image takes
    `image_tokens((height, width))`.
    """
    return self.features_per_tile + (1 if self.anyres else 0)

  def image_tokens(self, image_size: tuple[int, int]) -> int:
    """Placeholders of one image of (height, width): tiled when anyres, as transformers counts."""
    if not self.anyres:
      return self.num_image_tokens
    return num_image_tokens(image_size, self.packing)

  @property
  def vision_feature_layers(self) -> tuple[int, ...]:
    layer = self.vision_feature_layer
    return (layer,) if isinstance(layer, int) else tuple(layer)

  def replace(self, **changes: Any) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  def with_runtime(self, **changes: Any) -> ModelConfig:
    return dataclasses.replace(self, runtime=dataclasses.replace(self.runtime, **changes))
