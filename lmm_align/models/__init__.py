"""Pure-functional Flax models: CLIP ViT + projector + LLaMA (LLaVA), and their configs."""

from lmm_align.models.config import (
  VARIANTS,
  ModelConfig,
  RopeScaling,
  RuntimeConfig,
  TextConfig,
  VisionConfig,
  from_hf_config,
  get_variant,
  to_hf_config,
)
from lmm_align.models.layers import KVCache
from lmm_align.models.llava import Llava, ModelOutput, check_image_tokens, init_cache, init_params

__all__ = [
    "VARIANTS", "KVCache", "Llava", "ModelConfig", "ModelOutput", "RopeScaling", "RuntimeConfig",
    "TextConfig", "VisionConfig", "check_image_tokens", "from_hf_config", "get_variant",
    "init_cache", "init_params", "to_hf_config",
]  # fmt: skip
