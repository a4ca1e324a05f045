"""The named model variants (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, their towers and decoders,
and tiny ones for tests): `get_variant(name)`, `get_vision_variant(name)`."""

from __future__ import annotations

import dataclasses
from typing import Any

from lmm_align.models.anyres import LLAVA_NEXT_PINPOINTS, LLAVA_ONEVISION_PINPOINTS
from lmm_align.models.config import (
  ModelConfig,
  TextConfig,
  VisionConfig,
  siglip_vision,
)

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
