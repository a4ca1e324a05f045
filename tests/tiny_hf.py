"""Tiny random `transformers` models saved to local folders: the references of parity tests."""

from __future__ import annotations

import pathlib

import numpy as np
import torch
import transformers

IMAGE_TOKEN = 299
VOCAB = 300


def llama_config(num_kv_heads: int = 2, tie: bool = False, **overrides) -> transformers.LlamaConfig:
  kwargs = dict(
      hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=num_kv_heads, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1,
      eos_token_id=2, rms_norm_eps=1e-6, tie_word_embeddings=tie, max_position_embeddings=256,
  )  # fmt: skip
  kwargs.update(overrides)
  return transformers.LlamaConfig(**kwargs)


def clip_config(**overrides) -> transformers.CLIPVisionConfig:
  kwargs = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                num_hidden_layers=3, num_attention_heads=4)  # fmt: skip
  kwargs.update(overrides)
  return transformers.CLIPVisionConfig(**kwargs)


def save_tiny_llava(
  folder: pathlib.Path,
  seed: int = 0,
  num_kv_heads: int = 2,
  vision_feature_layer: int | list[int] = -2,
  select_strategy: str = "default",
  **text_overrides,
) -> transformers.LlavaForConditionalGeneration:
  torch.manual_seed(seed)
  config = transformers.LlavaConfig(
    vision_config=clip_config(),
    text_config=llama_config(num_kv_heads, **text_overrides),
    image_token_index=IMAGE_TOKEN,
    projector_hidden_act="gelu",
    vision_feature_layer=vision_feature_layer,
    vision_feature_select_strategy=select_strategy,
  )
  model = transformers.LlavaForConditionalGeneration(config).eval()
  _randomize_norms(model)
  model.save_pretrained(folder)
  return model


def save_tiny_llama(
  folder: pathlib.Path, seed: int = 0, num_kv_heads: int = 2, tie: bool = False, **overrides
):
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(llama_config(num_kv_heads, tie, **overrides)).eval()
  _randomize_norms(model)
  model.save_pretrained(folder)
  return model


def _randomize_norms(model: torch.nn.Module) -> None:
  """Norm weights start at exactly 1 and biases at 0; random ones catch a mis-mapped tensor."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias") or "class_embedding" in name:
        p.add_(0.1 * torch.randn_like(p))


def image_tokens_per_image(strategy: str = "default") -> int:
  return 16 + (1 if strategy == "full" else 0)


def random_pixels(n: int, seed: int = 0) -> np.ndarray:
  """float32[n, 32, 32, 3] NHWC, roughly the range of normalised images."""
  return np.random.default_rng(seed).normal(size=(n, 32, 32, 3)).astype(np.float32)


def to_torch_pixels(pixels_nhwc: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(pixels_nhwc.transpose(0, 3, 1, 2)))


# --------------------------------------------------------------------------------------------
# SigLIP and Qwen2 (the LLaVA-OneVision families).
# --------------------------------------------------------------------------------------------


def siglip_config(**overrides) -> transformers.SiglipVisionConfig:
  """16 patches of 8 pixels on 32-pixel images, like `clip_config`; SigLIP's own defaults
  (gelu_pytorch_tanh, eps 1e-6, the attention-pooling head on)."""
  kwargs = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                num_hidden_layers=3, num_attention_heads=4)  # fmt: skip
  kwargs.update(overrides)
  return transformers.SiglipVisionConfig(**kwargs)


def qwen2_config(num_kv_heads: int = 2, tie: bool = False, **overrides) -> transformers.Qwen2Config:
  kwargs = dict(
      hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=num_kv_heads, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1,
      eos_token_id=2, rms_norm_eps=1e-6, tie_word_embeddings=tie, max_position_embeddings=256,
      rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
  )  # fmt: skip
  kwargs.update(overrides)
  return transformers.Qwen2Config(**kwargs)


def save_tiny_siglip(folder: pathlib.Path, seed: int = 0, **overrides):
  torch.manual_seed(seed)
  model = transformers.SiglipVisionModel(siglip_config(**overrides)).eval()
  _randomize_norms(model)
  model.save_pretrained(folder)
  return model


def save_tiny_qwen2(
  folder: pathlib.Path, seed: int = 0, num_kv_heads: int = 2, tie: bool = False, **overrides
):
  torch.manual_seed(seed)
  model = transformers.Qwen2ForCausalLM(qwen2_config(num_kv_heads, tie, **overrides)).eval()
  _randomize_norms(model)
  model.save_pretrained(folder)
  return model


def save_tiny_siglip_qwen2_llava(
  folder: pathlib.Path,
  seed: int = 0,
  num_kv_heads: int = 2,
  vision_feature_layer: int | list[int] = -1,
  select_strategy: str = "full",
  use_head: bool = False,
) -> transformers.LlavaForConditionalGeneration:
  """A LLaVA of a SigLIP tower (no head, as LLaVA-OneVision's) and a Qwen2 decoder."""
  torch.manual_seed(seed)
  config = transformers.LlavaConfig(
    vision_config=siglip_config(vision_use_head=use_head),
    text_config=qwen2_config(num_kv_heads),
    image_token_index=IMAGE_TOKEN,
    projector_hidden_act="gelu",
    vision_feature_layer=vision_feature_layer,
    vision_feature_select_strategy=select_strategy,
  )
  model = transformers.LlavaForConditionalGeneration(config).eval()
  _randomize_norms(model)
  model.save_pretrained(folder)
  return model


def siglip_image_tokens_per_image(strategy: str = "full") -> int:
  """SigLIP has no class token: 16 patches, and "default" drops the first patch."""
  return 16 - (1 if strategy == "default" else 0)


# --------------------------------------------------------------------------------------------
# LLaVA-NeXT and LLaVA-OneVision (anyres tiling, image_newline).
# --------------------------------------------------------------------------------------------

# 32-pixel tiles: a 1 x 2, 2 x 1 and 2 x 2 grid (tiles + the base tile: 3, 3, 5).
NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64]]
ONEVISION_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]
VIDEO_TOKEN = 298


def save_tiny_llava_next(
  folder: pathlib.Path,
  seed: int = 0,
  num_kv_heads: int = 2,
  vision_feature_layer: int | list[int] = -2,
  select_strategy: str = "default",
  pinpoints: list[list[int]] | None = None,
) -> transformers.LlavaNextForConditionalGeneration:
  """A LLaVA-NeXT of a CLIP tower (16 patches + CLS) and a LLaMA decoder with GQA."""
  torch.manual_seed(seed)
  config = transformers.LlavaNextConfig(
    vision_config=clip_config(),
    text_config=llama_config(num_kv_heads),
    image_token_index=IMAGE_TOKEN,
    projector_hidden_act="gelu",
    vision_feature_layer=vision_feature_layer,
    vision_feature_select_strategy=select_strategy,
    image_grid_pinpoints=pinpoints or NEXT_PINPOINTS,
    image_seq_length=16,
  )
  model = transformers.LlavaNextForConditionalGeneration(config).eval()
  _randomize_norms(model)
  model.save_pretrained(folder)
  return model


def save_tiny_llava_onevision(
  folder: pathlib.Path,
  seed: int = 0,
  num_kv_heads: int = 2,
  vision_aspect_ratio: str = "anyres_max_1",
  vision_feature_layer: int | list[int] = -1,
  select_strategy: str = "full",
  pinpoints: list[list[int]] | None = None,
) -> transformers.LlavaOnevisionForConditionalGeneration:
  """A LLaVA-OneVision of a headless SigLIP tower (16 patches) and a Qwen2 decoder with GQA.

  `anyres_max_1` downsamples any unpadded grid map above 1.1**2 tiles' worth of features, so
  every multi-tile image in a test goes through the bilinear path.
  """
  torch.manual_seed(seed)
  config = transformers.LlavaOnevisionConfig(
    vision_config=siglip_config(vision_use_head=False),
    text_config=qwen2_config(num_kv_heads),
    image_token_index=IMAGE_TOKEN,
    video_token_index=VIDEO_TOKEN,
    projector_hidden_act="gelu",
    vision_feature_layer=vision_feature_layer,
    vision_feature_select_strategy=select_strategy,
    vision_aspect_ratio=vision_aspect_ratio,
    image_grid_pinpoints=pinpoints or ONEVISION_PINPOINTS,
  )
  model = transformers.LlavaOnevisionForConditionalGeneration(config).eval()
  _randomize_norms(model)
  with torch.no_grad():  # image_newline starts random already; make it visibly so.
    model.model.image_newline.add_(torch.randn_like(model.model.image_newline))
  model.save_pretrained(folder)
  return model


def anyres_batch(config, image_sizes, seed: int = 0):
  """A left-padded batch with one tiled image per row, placeholders counted by
  `ModelConfig.image_tokens` (anyres.num_image_tokens); a (0, 0) size is a text-only row.

  Row i: BOS, i text tokens, the image's placeholders, text. Returns (ids int64[B, T],
  mask int64[B, T], pixels float32[B, tiles, 32, 32, 3] NHWC, sizes int64[B, 2]).
  """
  rng = np.random.default_rng(seed)
  rows = []
  for i, size in enumerate(image_sizes):
    n = config.image_tokens(size) if size[0] else 0
    rows.append([1, *rng.integers(5, 290, size=i)] + [IMAGE_TOKEN] * n + [*rng.integers(5, 290, 6)])
  t = max(map(len, rows))
  ids, mask = np.zeros((len(rows), t), np.int64), np.zeros((len(rows), t), np.int64)
  for i, row in enumerate(rows):
    ids[i, t - len(row) :], mask[i, t - len(row) :] = row, 1
  tiles = config.packing.max_tiles_per_image
  pixels = rng.normal(size=(len(rows), tiles, 32, 32, 3)).astype(np.float32)
  return ids, mask, pixels, np.asarray(image_sizes, np.int64)


def hf_anyres_logits(model, ids, mask, pixels, sizes) -> np.ndarray:
  """transformers' logits for `anyres_batch`'s inputs: the images of rows with one only."""
  has_image = sizes[:, 0] > 0
  positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)
  with torch.no_grad():
    return model(
      input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
      position_ids=torch.from_numpy(positions),
      pixel_values=torch.from_numpy(np.ascontiguousarray(pixels[has_image].transpose(0, 1, 4, 2, 3))),
      image_sizes=torch.from_numpy(sizes[has_image]),
    ).logits.numpy()  # fmt: skip


# --------------------------------------------------------------------------------------------
# On a trained BPE tokenizer with ChatML markup (OneVision's templates): for tests that go
# through the data pipeline and the tokenizer (DPO, PPO, the loop's stages).
# --------------------------------------------------------------------------------------------

CHATML_TOKENS = ("<|im_start|>", "<|im_end|>", "<video>")


def chatml_tokenizer(texts: list[str]):
  """A 300-entry BPE tokenizer trained on `texts`, with the ChatML markup and <video> added."""
  from lmm_align.data.tokenizer import train_bpe_tokenizer

  tokenizer = train_bpe_tokenizer(texts, 300)
  tokenizer.add_special_tokens({"additional_special_tokens": list(CHATML_TOKENS)})
  return tokenizer


def save_onevision_for(tokenizer, folder: pathlib.Path):
  """A tiny LLaVA-OneVision on `tokenizer`'s vocabulary (pad id 3, its <image> and <video>
  ids; anyres_max_1, so multi-tile images are downsampled), saved with the tokenizer and a
  32-pixel anyres image processor (mean and std 0.5). Seeds nothing: the caller's torch seed
  decides the weights."""
  config = transformers.LlavaOnevisionConfig(
    vision_config=siglip_config(vision_use_head=False),
    text_config=qwen2_config(vocab_size=len(tokenizer), pad_token_id=3),
    image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
    projector_hidden_act="gelu",
    vision_feature_layer=-1,
    vision_feature_select_strategy="full",
    vision_aspect_ratio="anyres_max_1",
    image_grid_pinpoints=ONEVISION_PINPOINTS,
  )
  model = transformers.LlavaOnevisionForConditionalGeneration(config).eval()
  _randomize_norms(model)
  model.save_pretrained(folder)
  tokenizer.save_pretrained(folder)
  transformers.LlavaOnevisionImageProcessorPil(
    size={"height": 32, "width": 32}, image_grid_pinpoints=ONEVISION_PINPOINTS,
    image_mean=[0.5] * 3, image_std=[0.5] * 3, do_pad=True,
  ).save_pretrained(folder)  # fmt: skip
  return model


def save_next_for(tokenizer, folder: pathlib.Path):
  """A tiny LLaVA-NeXT (CLIP + LLaMA) on `tokenizer`'s vocabulary, saved with the tokenizer
  (its processor is derived from the model). Seeds nothing, as `save_onevision_for`."""
  config = transformers.LlavaNextConfig(
    vision_config=clip_config(),
    text_config=llama_config(vocab_size=len(tokenizer), pad_token_id=3),
    image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    projector_hidden_act="gelu",
    vision_feature_layer=-2,
    vision_feature_select_strategy="default",
    image_grid_pinpoints=NEXT_PINPOINTS,
    image_seq_length=16,
  )
  model = transformers.LlavaNextForConditionalGeneration(config).eval()
  _randomize_norms(model)
  model.save_pretrained(folder)
  tokenizer.save_pretrained(folder)
  return model
