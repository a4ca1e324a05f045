"""Pure-functional Flax models: CLIP / SigLIP towers + projector + LLaMA / Qwen2 decoders
(LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision), anyres packing, and their configs."""

from lmm_align.models.anyres import AnyresPackingConfig, PackPlan, apply_pack_plan, pack_plan
from lmm_align.models.config import (
  LLAVA_FAMILIES,
  ModelConfig,
  RopeScaling,
  RuntimeConfig,
  TextConfig,
  VisionConfig,
  siglip_vision,
)
from lmm_align.models.hf_config import (
  from_hf_config,
  to_hf_config,
  vision_config_from_hf,
  vision_config_to_hf,
)
from lmm_align.models.layers import KVCache
from lmm_align.models.llava import Llava, ModelOutput, check_image_tokens, init_cache, init_params
from lmm_align.models.siglip import SiglipVisionTower
from lmm_align.models.variants import VARIANTS, VISION_VARIANTS, get_variant, get_vision_variant

__all__ = [
    "LLAVA_FAMILIES", "VARIANTS", "VISION_VARIANTS", "AnyresPackingConfig", "KVCache", "Llava",
    "ModelConfig", "ModelOutput", "PackPlan", "RopeScaling", "RuntimeConfig", "SiglipVisionTower",
    "TextConfig", "VisionConfig", "apply_pack_plan", "check_image_tokens", "from_hf_config",
    "get_variant", "get_vision_variant", "init_cache", "init_params", "pack_plan", "siglip_vision",
    "to_hf_config", "vision_config_from_hf", "vision_config_to_hf",
]  # fmt: skip
