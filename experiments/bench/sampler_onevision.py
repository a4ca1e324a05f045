"""Sampler throughput on a LLaVA-OneVision with image tiles: lmm_align vs transformers, CPU.

  python experiments/bench/sampler_onevision.py

A small LLaVA-OneVision (headless SigLIP: 32-pixel tiles of 8-pixel patches, 3 layers; Qwen2:
hidden 256, 4 layers, 8 heads, 4 KV heads, vocab 2048) is built in transformers with random
weights, saved and loaded with `lmm_align.hf.load_pretrained` (one param tree per layer, as a
sampling job loads it). `image_grid_pinpoints` go up to 2 x 2 tiles and `anyres_max_4`, so each
image is 3 or 5 tiles (the base image and its grid) whose unpadded features are packed with
`image_newline`; the batch mixes two aspect ratios (wide 40 x 64 and tall 60 x 44), left-padded
to one length, as LLaVA-Critic's judge and OV-Chat's sampler see them. Both sides decode the
same batch greedily for 64 new tokens (min_new_tokens, no stop tokens) after one warm-up call
each (ours compiles there); the median of 5 timed runs is reported.

As in experiments/bench/sampler.py: transformers is timed with torch's default thread count
and with one thread and the faster is the baseline; JAX gets one CPU device per core and the
sampler runs data-parallel over them (`generate(mesh=...)`, the pack plan riding with its rows);
the one-device run is printed beside it. The last line is `speedup_vs_transformers: X.XXx`.
"""

from __future__ import annotations

import timing  # first: it sets the environment JAX and transformers start in

# isort: split

import tempfile

import jax
import numpy as np
import torch
import transformers

from lmm_align import sharding
from lmm_align.hf import load_pretrained
from lmm_align.models.config import RuntimeConfig
from lmm_align.sampling import SamplingSettings, generate

BATCH, NEW_TOKENS, TEXT_TOKENS, RUNS = 8, 64, 24, 5
IMAGE_TOKEN, VIDEO_TOKEN, VOCAB, TILE = 2047, 2046, 2048, 32
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]
SIZES = [(40, 64), (60, 44)]  # wide and tall: 2 x 2 grids, unpadded and downsampled differently


def build_hf_model() -> transformers.LlavaOnevisionForConditionalGeneration:
  torch.manual_seed(0)
  vision = transformers.SiglipVisionConfig(
    image_size=TILE, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
    num_attention_heads=4, vision_use_head=False,
  )  # fmt: skip
  text = transformers.Qwen2Config(
    vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024, pad_token_id=0,
    bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
  )  # fmt: skip
  config = transformers.LlavaOnevisionConfig(
    vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
    video_token_index=VIDEO_TOKEN, vision_feature_layer=-1, vision_feature_select_strategy="full",
    vision_aspect_ratio="anyres_max_4", image_grid_pinpoints=PINPOINTS,
  )  # fmt: skip
  return transformers.LlavaOnevisionForConditionalGeneration(config).eval()


def main():
  hf_model = build_hf_model()
  with tempfile.TemporaryDirectory() as folder:
    hf_model.save_pretrained(folder)
    model, params = load_pretrained(folder, runtime=RuntimeConfig(scan_layers=False))
  num_params = sum(p.numel() for p in hf_model.parameters())

  rs = np.random.RandomState(0)
  sizes = np.asarray([SIZES[i % 2] for i in range(BATCH)], np.int64)
  prompts = [
    [1] + [IMAGE_TOKEN] * model.config.image_tokens(tuple(size))
    + rs.randint(3, 2000, TEXT_TOKENS).tolist()
    for size in sizes
  ]  # fmt: skip
  tiles = model.config.packing.max_tiles_per_image
  pixels = rs.randn(BATCH, tiles, TILE, TILE, 3).astype(np.float32)
  settings = SamplingSettings(temperature=0.0, max_new_tokens=NEW_TOKENS, stop_token_ids=())
  width = max(map(len, prompts))

  mesh = sharding.make_mesh((-1, 1, 1))
  replicated_params = jax.device_put(params, sharding.replicated(mesh))

  def ours(data_parallel: bool = True):
    out = generate(
      model, replicated_params if data_parallel else params, prompts, pixels, settings=settings,
      rng=None, image_sizes=sizes, mesh=mesh if data_parallel else None, buckets=(width,),
    )  # fmt: skip
    assert (out.lengths == NEW_TOKENS).all()
    return out

  # transformers: the same rows, left-padded to one length as its generate wants.
  ids = np.zeros((BATCH, width), np.int64)
  mask = np.zeros((BATCH, width), np.int64)
  for i, row in enumerate(prompts):
    ids[i, width - len(row) :], mask[i, width - len(row) :] = row, 1
  hf_inputs = dict(
    input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
    pixel_values=torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 1, 4, 2, 3))),
    image_sizes=torch.from_numpy(sizes),
  )  # fmt: skip

  def theirs():
    with torch.inference_mode():
      out = hf_model.generate(
        **hf_inputs, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
        pad_token_id=0,
      )  # fmt: skip
    assert out.shape[1] == width + NEW_TOKENS
    return out

  ours_s = timing.median_seconds(ours, RUNS)
  ours_one_device_s = timing.median_seconds(lambda: ours(data_parallel=False), RUNS)
  best_threads, theirs_by_threads = timing.torch_best_threads(theirs, RUNS)
  theirs_s = theirs_by_threads[best_threads]
  ours_tokens = ours().tokens
  same = np.array_equal(ours_tokens, theirs()[:, width:].numpy())
  same_one_device = np.array_equal(ours_tokens, ours(data_parallel=False).tokens)
  tokens = BATCH * NEW_TOKENS
  image_tokens = sorted({model.config.image_tokens(tuple(s)) for s in SIZES})
  print(
    f"model: {num_params / 1e6:.2f}M params, batch {BATCH}, {tiles} tile slots per image, "
    f"{image_tokens} image tokens per image (wide, tall), prompts of {width} tokens, "
    f"{NEW_TOKENS} new tokens, greedy, jax on {jax.devices()[0].platform}"
  )
  print(f"greedy tokens identical: {same} (data-parallel vs one device: {same_one_device})")
  print(
    f"lmm_align.sampling, data-parallel over {len(jax.devices())} CPU device(s): "
    f"{tokens / ours_s:9.1f} tokens/s ({ours_s * 1e3:.1f} ms per call)"
  )
  print(
    f"  (one device: {tokens / ours_one_device_s:9.1f} tokens/s, {ours_one_device_s * 1e3:.1f} "
    f"ms per call, {theirs_s / ours_one_device_s:.2f}x transformers)"
  )
  for threads, seconds in theirs_by_threads.items():
    print(
      f"transformers, {threads} torch thread(s): {tokens / seconds:9.1f} tokens/s "
      f"({seconds * 1e3:.1f} ms per call)"
    )
  print(f"transformers (best, {best_threads} thread(s)): {tokens / theirs_s:9.1f} tokens/s")
  print(f"speedup_vs_transformers: {theirs_s / ours_s:.2f}x")


if __name__ == "__main__":
  main()
