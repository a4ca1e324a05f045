"""Model configurations: frozen dataclasses, variant lookup tables and HF config.json conversion.

The architecture fields mirror `transformers`' `CLIPVisionConfig`, `SiglipVisionConfig`,
`LlamaConfig`, `Qwen2Config` and `LlavaConfig` so that an HF `config.json` maps one to one;
the runtime fields (dtypes, scan, remat) are ours. Configs are hashable so that they can be
Flax module attributes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lmm_align.models.anyres import (
  LLAVA_NEXT_PINPOINTS,
  LLAVA_ONEVISION_PINPOINTS,
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


# --------------------------------------------------------------------------------------------
# Variants.
# --------------------------------------------------------------------------------------------

_CLIP_L14_336 = VisionConfig(
  image_size=336,
  patch_size=14,
  hidden_size=1024,
  intermediate_size=4096,
  num_layers=24,
  num_heads=16,
)


# google/siglip-so400m-patch14-384's vision tower (its config.json; the MAP head included).
# LLaVA-OneVision's tower is this one with the last layer and the head dropped:
# dataclasses.replace(..., num_layers=26, use_head=False).
_SIGLIP_SO400M_14_384 = siglip_vision(
  image_size=384, patch_size=14, hidden_size=1152, intermediate_size=4304, num_layers=27,
  num_heads=16, use_head=True,
)  # fmt: skip

# Tests: 16 patches of 8 pixels, the head on.
_SIGLIP_TINY = siglip_vision(
  image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
  use_head=True,
)  # fmt: skip

# Vision towers alone, for a tower's own import / export and stage-1 starts.
VISION_VARIANTS: dict[str, VisionConfig] = {
  "clip-l-14-336": _CLIP_L14_336,
  "siglip-so400m-14-384": _SIGLIP_SO400M_14_384,
  "siglip-tiny": _SIGLIP_TINY,
}


def get_vision_variant(name: str) -> VisionConfig:
  """The named vision tower config."""
  if name not in VISION_VARIANTS:
    raise KeyError(f"unknown vision variant {name!r}; known: {sorted(VISION_VARIANTS)}")
  return VISION_VARIANTS[name]


# The shapes world's tower: 48-pixel scenes, one 16-pixel patch per grid cell.
_SHAPES_VISION = VisionConfig(
  image_size=48, patch_size=16, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4
)

# The shapes decoder twice as wide: the shapes-world judges' (labelers') language model.
_SHAPES_WIDE_TEXT = TextConfig(
  vocab_size=600, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8,
  num_kv_heads=4, head_dim=32,
)  # fmt: skip


def _vicuna(hidden: int, mlp: int, layers: int, heads: int) -> TextConfig:
  return TextConfig(
      vocab_size=32064, hidden_size=hidden, intermediate_size=mlp, num_layers=layers,
      num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads, rms_norm_eps=1e-5,
      max_position_embeddings=4096, pad_token_id=0,
  )  # fmt: skip


def _qwen2(
  hidden: int, mlp: int, layers: int, heads: int, kv_heads: int, vocab: int, tie: bool
) -> TextConfig:
  """Qwen2-*-Instruct's config.json (the LLMs of LLaVA-OneVision and LLaVA-Critic): RoPE theta
  1e6, RMSNorm eps 1e-6, 32768 positions, <|endoftext|> 151643 as BOS, <|im_end|> 151645 as EOS.
  The base models share the architecture (their max_position_embeddings and EOS differ)."""
  return TextConfig(
      vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_layers=layers,
      num_heads=heads, num_kv_heads=kv_heads, head_dim=hidden // heads, rms_norm_eps=1e-6,
      rope_theta=1_000_000.0, max_position_embeddings=32768, tie_word_embeddings=tie,
      pad_token_id=None, bos_token_id=151643, eos_token_id=151645, model_type="qwen2",
      qkv_bias=True,
  )  # fmt: skip


# Tests: a Qwen2 with GQA and q/k/v biases.
_TINY_QWEN2 = TextConfig(
  vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
  head_dim=16, rope_theta=1_000_000.0, pad_token_id=None, model_type="qwen2", qkv_bias=True,
)  # fmt: skip


VARIANTS: dict[str, ModelConfig] = {
  # A few hundred thousand params: unit tests and CPU runs.
  "tiny": ModelConfig(
    text=TextConfig(
      vocab_size=512,
      hidden_size=64,
      intermediate_size=128,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      head_dim=16,
    ),
    vision=VisionConfig(
      image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4
    ),
    image_token_id=4,
  ),  # fmt: skip
  # The shapes world on CPU: vocab and image token come from its own tokenizer at run time.
  "shapes": ModelConfig(
    text=TextConfig(
      vocab_size=600,
      hidden_size=128,
      intermediate_size=384,
      num_layers=4,
      num_heads=4,
      num_kv_heads=2,
      head_dim=32,
    ),
    vision=_SHAPES_VISION,
    image_token_id=4,
  ),  # fmt: skip
  # The shapes vision tower under a twice-as-wide decoder: a shapes-world judge (labeler)
  # larger than the policy it labels, as RLAIF-V's labeler is.
  "shapes-wide": ModelConfig(
    text=_SHAPES_WIDE_TEXT,
    vision=_SHAPES_VISION,
    image_token_id=4,
  ),  # fmt: skip
  # A shapes-world judge that also sees better than the policy: the wide decoder on a tower
  # twice as wide and deep. The policy's pretrained tower misreads about 2% of shapes (star /
  # triangle, cross / circle, star / diamond), the same pairs the SFT policy's false claims
  # confuse most; a labeler on that frozen tower shares the blind spot. RLAIF-V's labelers are
  # larger models than the policies they label.
  "shapes-judge": ModelConfig(
    text=_SHAPES_WIDE_TEXT,
    vision=VisionConfig(
      image_size=48,
      patch_size=16,
      hidden_size=128,
      intermediate_size=512,
      num_layers=4,
      num_heads=4,
    ),
    image_token_id=4,
  ),  # fmt: skip
  # A few million params: CPU benchmarks.
  "small": ModelConfig(
    text=TextConfig(
      vocab_size=2048,
      hidden_size=256,
      intermediate_size=688,
      num_layers=4,
      num_heads=8,
      num_kv_heads=4,
      head_dim=32,
    ),
    vision=VisionConfig(
      image_size=64, patch_size=8, hidden_size=128, intermediate_size=512, num_layers=4, num_heads=4
    ),
    image_token_id=4,
  ),  # fmt: skip
  # llava-hf/llava-1.5-7b-hf and -13b-hf (vocab 32064 includes <image>=32000 and padding rows).
  "llava-1.5-7b": ModelConfig(
    text=_vicuna(4096, 11008, 32, 32), vision=_CLIP_L14_336, image_token_id=32000
  ),
  "llava-1.5-13b": ModelConfig(
    text=_vicuna(5120, 13824, 40, 40), vision=_CLIP_L14_336, image_token_id=32000
  ),
  "vicuna-7b": ModelConfig(text=_vicuna(4096, 11008, 32, 32)),
  # Qwen/Qwen2-{0.5B,7B,72B}-Instruct (the Qwen2 technical report's table 1 and the config.json
  # files): 0.5B ties its embeddings, 7B and 72B do not; vocab rows 151936 / 152064.
  "qwen2-0.5b": ModelConfig(text=_qwen2(896, 4864, 24, 14, 2, 151936, tie=True)),
  "qwen2-7b": ModelConfig(text=_qwen2(3584, 18944, 28, 28, 4, 152064, tie=False)),
  "qwen2-72b": ModelConfig(text=_qwen2(8192, 29568, 80, 64, 8, 152064, tie=False)),
  # Tests: a text-only Qwen2 (GQA, q/k/v biases), and a LLaVA of a SigLIP tower and that Qwen2,
  # reading the last layer with every patch, as LLaVA-OneVision does.
  "tiny-qwen2": ModelConfig(text=_TINY_QWEN2),
  "tiny-siglip-qwen2": ModelConfig(
    text=_TINY_QWEN2,
    vision=dataclasses.replace(_SIGLIP_TINY, use_head=False),
    vision_feature_layer=-1,
    vision_feature_select_strategy="full",
    image_token_id=4,
  ),  # fmt: skip
}


# LLaVA-NeXT and LLaVA-OneVision.
#
# llava-next-34b: RLAIF-V's labeler, LLaVA-v1.6-34B (llava-hf/llava-v1.6-34b-hf): CLIP
# ViT-L/14-336 read at layer -2 without its class token, LLaVA-NeXT's five pinpoints, and the
# LLaMA-architecture Nous-Hermes-2-Yi-34B (its config.json: hidden 7168, MLP 20480, 60 layers,
# 56 heads, 8 KV heads, RoPE theta 5e6, RMSNorm eps 1e-5, 4096 positions, <|im_end|> 7 as EOS);
# llava-hf pads the 64000-token vocabulary to 64064 rows and adds <image> as 64000.
# llava-onevision-*: lmms-lab's / llava-hf's LLaVA-OneVision-Qwen2 (the OneVision paper, sec. 3):
# SigLIP-so400m/14-384 with the last layer and the head dropped, read in full at layer -1,
# anyres_max_9 over the 36 pinpoints (1..6 x 1..6 tiles of 384), Qwen2-0.5B/7B/72B-Instruct;
# <image> 151646, <video> 151647 (llava-hf's ids, inside Qwen2's padded vocabulary).
_ONEVISION_SIGLIP = dataclasses.replace(_SIGLIP_SO400M_14_384, num_layers=26, use_head=False)
_YI_34B = TextConfig(
  vocab_size=64064, hidden_size=7168, intermediate_size=20480, num_layers=60, num_heads=56,
  num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=5_000_000.0,
  max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=7,
)  # fmt: skip


def _onevision(text: TextConfig) -> ModelConfig:
  return ModelConfig(
    text=text, vision=_ONEVISION_SIGLIP, vision_feature_layer=-1,
    vision_feature_select_strategy="full", image_token_id=151646, video_token_id=151647,
    image_grid_pinpoints=LLAVA_ONEVISION_PINPOINTS, vision_aspect_ratio="anyres_max_9",
  )  # fmt: skip


VARIANTS.update({
  "llava-next-34b": ModelConfig(
    text=_YI_34B, vision=_CLIP_L14_336, image_token_id=64000,
    image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
  ),
  "llava-onevision-0.5b": _onevision(VARIANTS["qwen2-0.5b"].text),
  "llava-onevision-7b": _onevision(VARIANTS["qwen2-7b"].text),
  "llava-onevision-72b": _onevision(VARIANTS["qwen2-72b"].text),
  # Tests: 32-pixel tiles of 16 patches; NeXT's CLIP drops its class token, OneVision's SigLIP
  # reads every patch; anyres_max_1 so that every multi-tile image is downsampled.
  "tiny-llava-next": VARIANTS["tiny"].replace(
    image_grid_pinpoints=((32, 64), (64, 32), (64, 64))
  ),
  "tiny-llava-onevision": VARIANTS["tiny-siglip-qwen2"].replace(
    image_grid_pinpoints=((32, 32), (32, 64), (64, 32), (64, 64)),
    vision_aspect_ratio="anyres_max_1",
    video_token_id=5,
  ),
})  # fmt: skip


def get_variant(name: str, **runtime: Any) -> ModelConfig:
  """The named variant, with optional runtime overrides (dtype, scan_layers, ...)."""
  if name not in VARIANTS:
    raise KeyError(f"unknown model variant {name!r}; known: {sorted(VARIANTS)}")
  config = VARIANTS[name]
  return config.with_runtime(**runtime) if runtime else config


# --------------------------------------------------------------------------------------------
# HF config.json <-> ModelConfig.
# --------------------------------------------------------------------------------------------


def _text_from_hf(d: dict[str, Any]) -> TextConfig:
  model_type = d.get("model_type", "llama")
  if model_type not in TEXT_MODEL_TYPES:
    raise ValueError(f"text model_type {model_type!r} is not supported (llama, qwen2)")
  heads = d["num_attention_heads"]
  rope = d.get("rope_parameters") or {}
  rope_theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
  scaling = d.get("rope_scaling") or (
    rope if rope.get("rope_type", "default") != "default" else None
  )
  rope_scaling = None
  if scaling:
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type == "llama3":
      rope_scaling = RopeScaling(
          rope_type="llama3", factor=float(scaling["factor"]),
          low_freq_factor=float(scaling["low_freq_factor"]),
          high_freq_factor=float(scaling["high_freq_factor"]),
          original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
      )  # fmt: skip
    elif rope_type == "linear":
      rope_scaling = RopeScaling(rope_type="linear", factor=float(scaling["factor"]))
    elif rope_type not in (None, "default"):
      raise ValueError(
        f"rope scaling type {rope_type!r} is not supported (default, linear, llama3)"
      )
  if model_type == "llama" and (d.get("attention_bias") or d.get("mlp_bias")):
    raise ValueError("LLaMA checkpoints with attention_bias or mlp_bias are not supported")
  if model_type == "qwen2" and (
    d.get("use_sliding_window") or "sliding_attention" in (d.get("layer_types") or ())
  ):
    # Every published Qwen2 checkpoint attends over the full context; a window would need a
    # second mask here and in the KV cache.
    raise ValueError(
      "Qwen2 use_sliding_window=true (layer_types with 'sliding_attention') is not supported"
    )
  return TextConfig(
    vocab_size=d["vocab_size"],
    hidden_size=d["hidden_size"],
    intermediate_size=d["intermediate_size"],
    num_layers=d["num_hidden_layers"],
    num_heads=heads,
    num_kv_heads=d.get("num_key_value_heads") or heads,
    head_dim=d.get("head_dim") or d["hidden_size"] // heads,
    rms_norm_eps=d.get("rms_norm_eps", 1e-6),
    rope_theta=float(rope_theta),
    rope_scaling=rope_scaling,
    max_position_embeddings=d.get("max_position_embeddings", 4096),
    tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
    pad_token_id=d.get("pad_token_id"),
    bos_token_id=d.get("bos_token_id"),
    eos_token_id=d.get("eos_token_id")
    if not isinstance(d.get("eos_token_id"), list)
    else d["eos_token_id"][0],
    model_type=model_type,
    qkv_bias=model_type == "qwen2",
  )


def _square(d: dict[str, Any], field: str) -> int:
  """SigLIP configs may give image_size / patch_size as [height, width]; ours are square."""
  value = d[field]
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ValueError(f"vision_config.{field}={value}: only square sizes are supported")
    value = value[0]
  return int(value)


def vision_config_from_hf(d: dict[str, Any]) -> VisionConfig:
  """A VisionConfig from a `CLIPVisionConfig` or `SiglipVisionConfig` dict."""
  model_type = d.get("model_type", "clip_vision_model")
  if model_type in ("clip_vision_model", "clip"):
    tower, act, eps = "clip", "quick_gelu", 1e-5
  elif model_type == "siglip_vision_model":
    tower, act, eps = "siglip", "gelu_pytorch_tanh", 1e-6
  else:
    raise ValueError(
      f"vision tower model_type {model_type!r} is not supported "
      "(clip_vision_model, siglip_vision_model)"
    )
  hidden_act = d.get("hidden_act", act)
  if hidden_act not in ("quick_gelu", "gelu", "gelu_pytorch_tanh"):
    raise ValueError(
      f"vision_config.hidden_act {hidden_act!r} is not supported (quick_gelu, gelu, gelu_pytorch_tanh)"
    )
  return VisionConfig(
    image_size=_square(d, "image_size"),
    patch_size=_square(d, "patch_size"),
    hidden_size=d["hidden_size"],
    intermediate_size=d["intermediate_size"],
    num_layers=d["num_hidden_layers"],
    num_heads=d["num_attention_heads"],
    layer_norm_eps=d.get("layer_norm_eps", eps),
    hidden_act=hidden_act,
    num_channels=d.get("num_channels", 3),
    tower=tower,
    # SiglipVisionConfig's default is a head; a config.json that omits the field has one.
    use_head=tower == "siglip" and bool(d.get("vision_use_head", True)),
  )


# Per family: (vision_feature_layer, select strategy) defaults of its transformers config class.
_FAMILY_FEATURE_DEFAULTS = {
  "llava": (-2, "default"),
  "llava_next": (-2, "default"),
  "llava_onevision": (-1, "full"),
}
_ARCHITECTURES = {
  "llava": "LlavaForConditionalGeneration",
  "llava_next": "LlavaNextForConditionalGeneration",
  "llava_onevision": "LlavaOnevisionForConditionalGeneration",
}


def from_hf_config(d: dict[str, Any], runtime: RuntimeConfig | None = None) -> ModelConfig:
  """A ModelConfig from the dict of a `LlavaForConditionalGeneration` (CLIP or SigLIP tower,
  LLaMA or Qwen2 decoder), `LlavaNextForConditionalGeneration`,
  `LlavaOnevisionForConditionalGeneration`, `LlamaForCausalLM` or `Qwen2ForCausalLM`
  config.json. Missing fields take the transformers class defaults."""
  runtime = runtime or RuntimeConfig()
  model_type = d.get("model_type")
  if model_type in LLAVA_FAMILIES:
    text = _text_from_hf(d["text_config"])
    if "tie_word_embeddings" in d and "tie_word_embeddings" not in d["text_config"]:
      text = dataclasses.replace(text, tie_word_embeddings=bool(d["tie_word_embeddings"]))
    act = d.get("projector_hidden_act", "gelu")
    if act != "gelu":
      raise ValueError(f"projector_hidden_act {act!r} is not supported (gelu)")
    layer, strategy = _FAMILY_FEATURE_DEFAULTS[model_type]
    anyres: dict[str, Any] = {}
    if model_type == "llava_next":
      anyres["image_grid_pinpoints"] = d.get("image_grid_pinpoints") or LLAVA_NEXT_PINPOINTS
    elif model_type == "llava_onevision":
      anyres["image_grid_pinpoints"] = d.get("image_grid_pinpoints") or LLAVA_ONEVISION_PINPOINTS
      anyres["vision_aspect_ratio"] = d.get("vision_aspect_ratio", "anyres_max_9")
      anyres["video_token_id"] = d.get("video_token_index", d.get("video_token_id", 151647))
    default_image_token = {"llava": 32000, "llava_next": 32000, "llava_onevision": 151646}
    return ModelConfig(
      text=text,
      vision=vision_config_from_hf(d["vision_config"]),
      projector_type="mlp2x_gelu",
      projector_bias=bool(d.get("multimodal_projector_bias", True)),
      vision_feature_layer=d.get("vision_feature_layer", layer),
      vision_feature_select_strategy=d.get("vision_feature_select_strategy", strategy),
      image_token_id=d.get(
        "image_token_index", d.get("image_token_id", default_image_token[model_type])
      ),
      runtime=runtime,
      **anyres,
    )
  if model_type in TEXT_MODEL_TYPES:
    return ModelConfig(text=_text_from_hf(d), runtime=runtime)
  if model_type in ("clip_vision_model", "clip", "siglip_vision_model", "siglip"):
    raise ValueError(
      f"config.json model_type {model_type!r} is a vision tower alone; read it into a LLaVA's "
      "tower with lmm_align.hf.load_vision_tower"
    )
  raise ValueError(
    f"config.json model_type {model_type!r} is not supported "
    f"({', '.join(LLAVA_FAMILIES + TEXT_MODEL_TYPES)})"
  )


def _text_to_hf(t: TextConfig, dtype: str) -> dict[str, Any]:
  rope: dict[str, Any] = {"rope_theta": t.rope_theta, "rope_type": "default"}
  if t.rope_scaling is not None:
    rope["rope_type"] = t.rope_scaling.rope_type
    rope["factor"] = t.rope_scaling.factor
    if t.rope_scaling.rope_type == "llama3":
      rope.update(
        low_freq_factor=t.rope_scaling.low_freq_factor,
        high_freq_factor=t.rope_scaling.high_freq_factor,
        original_max_position_embeddings=t.rope_scaling.original_max_position_embeddings,
      )
  if t.model_type == "qwen2":
    if not t.qkv_bias:
      raise ValueError("a Qwen2 TextConfig without qkv_bias has no transformers equivalent")
    family = {
      "use_sliding_window": False,
      "sliding_window": None,
      "max_window_layers": t.num_layers,
      "layer_types": ["full_attention"] * t.num_layers,
    }
  else:
    if t.qkv_bias:
      raise ValueError("a LLaMA TextConfig with qkv_bias has no transformers equivalent")
    family = {"attention_bias": False, "mlp_bias": False}
  return {
    "model_type": t.model_type,
    "vocab_size": t.vocab_size,
    "hidden_size": t.hidden_size,
    "intermediate_size": t.intermediate_size,
    "num_hidden_layers": t.num_layers,
    "num_attention_heads": t.num_heads,
    "num_key_value_heads": t.num_kv_heads,
    "head_dim": t.head_dim,
    "hidden_act": "silu",
    "rms_norm_eps": t.rms_norm_eps,
    "rope_parameters": rope,
    "max_position_embeddings": t.max_position_embeddings,
    "tie_word_embeddings": t.tie_word_embeddings,
    **family,
    "pad_token_id": t.pad_token_id,
    "bos_token_id": t.bos_token_id,
    "eos_token_id": t.eos_token_id,
    "dtype": dtype,
  }


def to_hf_config(config: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
  """The config.json dict that `transformers` reads back into an equivalent model."""
  text = _text_to_hf(config.text, dtype)
  if config.vision is None:
    architectures = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    return {**text, "architectures": [architectures[config.text.model_type]]}
  if config.projector_type != "mlp2x_gelu":
    raise ValueError(
      "transformers' LlavaForConditionalGeneration has only the mlp2x_gelu projector"
    )
  layer = config.vision_feature_layer
  family = config.family
  anyres: dict[str, Any] = {}
  if config.anyres:
    anyres["image_grid_pinpoints"] = [list(pin) for pin in config.image_grid_pinpoints]
  if family == "llava_onevision":
    anyres["vision_aspect_ratio"] = config.vision_aspect_ratio
    if config.video_token_id is not None:
      anyres["video_token_index"] = config.video_token_id
  return {
    "model_type": family,
    "architectures": [_ARCHITECTURES[family]],
    "text_config": text,
    "vision_config": vision_config_to_hf(config.vision),
    "image_token_index": config.image_token_id,
    # transformers' llava / llava_next field (features of one image / of the base tile).
    **({} if family == "llava_onevision" else {"image_seq_length": config.features_per_tile}),
    **anyres,
    "projector_hidden_act": config.projector_hidden_act,
    "multimodal_projector_bias": config.projector_bias,
    "vision_feature_layer": layer if isinstance(layer, int) else list(layer),
    "vision_feature_select_strategy": config.vision_feature_select_strategy,
    "tie_word_embeddings": config.text.tie_word_embeddings,
    "dtype": dtype,
  }


def vision_config_to_hf(v: VisionConfig) -> dict[str, Any]:
  """The `CLIPVisionConfig` or `SiglipVisionConfig` dict of a tower."""
  d = {
    "model_type": "clip_vision_model" if v.tower == "clip" else "siglip_vision_model",
    "image_size": v.image_size,
    "patch_size": v.patch_size,
    "hidden_size": v.hidden_size,
    "intermediate_size": v.intermediate_size,
    "num_hidden_layers": v.num_layers,
    "num_attention_heads": v.num_heads,
    "layer_norm_eps": v.layer_norm_eps,
    "hidden_act": v.hidden_act,
    "num_channels": v.num_channels,
  }
  if v.tower == "clip":
    d["projection_dim"] = v.hidden_size
  else:
    d["vision_use_head"] = v.use_head
  return d
