"""Sampler throughput: lmm_align.sampling.generate vs transformers' generate, same weights, CPU.

  python experiments/bench/sampler.py

A LLaVA of a few million params (text: hidden 256, 4 layers, 8 heads, vocab 2048; the tiny
CLIP tower) is built in transformers with random weights, saved to a temp dir and loaded with
`lmm_align.hf.load_pretrained` twice: as a sampling job loads it (one param tree per layer,
`RuntimeConfig(scan_layers=False)`), and in the training layout (layers stacked for nn.scan,
printed beside it). Both sides decode the same batch (8 copies of one prompt with
an image) greedily for 128 new tokens (min_new_tokens=128, no stop tokens), after one warm-up
call each (ours compiles there); the median of 7 timed runs is reported. The prompts have one
fixed length, so ours is given that length as its only bucket (as PPO gives its query length):
both sides prefill the same 41 tokens, where the default power-of-two bucket would pad to 64.

Both sides get every core. transformers runs with torch's default thread count and with one
thread, and the faster is the baseline: on a small shared CPU the default can be many times
slower (spinning threads fight other processes), which would flatter us. XLA:CPU runs these
small ops on one thread, so JAX is given one CPU device per core and the sampler runs
data-parallel over them (`generate(mesh=...)`: each device decodes its share of the rows); the
one-device run is printed beside it. The last line is `speedup_vs_transformers: X.XXx`.
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

BATCH, NEW_TOKENS, TEXT_TOKENS, RUNS = 8, 128, 24, 7
IMAGE_TOKEN, IMAGE_SIZE, PATCH = 2047, 32, 8


def build_hf_model(
  hidden: int = 256, layers: int = 4
) -> transformers.LlavaForConditionalGeneration:
  torch.manual_seed(0)
  vision = transformers.CLIPVisionConfig(
    image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=32, intermediate_size=64,
    num_hidden_layers=2, num_attention_heads=4,
  )  # fmt: skip
  text = transformers.LlamaConfig(
    vocab_size=2048, hidden_size=hidden, intermediate_size=hidden * 688 // 256,
    num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
  )  # fmt: skip
  config = transformers.LlavaConfig(
    vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
    image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
  )  # fmt: skip
  return transformers.LlavaForConditionalGeneration(config).eval()


def main():
  import argparse

  parser = argparse.ArgumentParser()
  parser.add_argument("--hidden", type=int, default=256, help="text hidden size (MLP 2.69x)")
  parser.add_argument("--layers", type=int, default=4)
  args = parser.parse_args()
  hf_model = build_hf_model(args.hidden, args.layers)
  with tempfile.TemporaryDirectory() as folder:
    hf_model.save_pretrained(folder)
    # The layout a sampling job loads (one param tree per layer), and the training layout
    # (layers stacked for nn.scan), which `decode` unstacks once per call.
    model, params = load_pretrained(folder, runtime=RuntimeConfig(scan_layers=False))
    scanned_model, scanned_params = load_pretrained(folder)
  num_params = sum(p.numel() for p in hf_model.parameters())

  rs = np.random.RandomState(0)
  prompt = (
    [1] + [IMAGE_TOKEN] * model.config.num_image_tokens + rs.randint(3, 2000, TEXT_TOKENS).tolist()
  )
  pixels = rs.randn(BATCH, IMAGE_SIZE, IMAGE_SIZE, 3).astype(np.float32)
  settings = SamplingSettings(temperature=0.0, max_new_tokens=NEW_TOKENS, stop_token_ids=())

  mesh = sharding.make_mesh((-1, 1, 1))
  replicated_params = jax.device_put(params, sharding.replicated(mesh))

  def ours(data_parallel: bool = True, scanned: bool = False, unroll_layers: bool = True):
    out = generate(
      scanned_model if scanned else model,
      scanned_params if scanned else replicated_params if data_parallel else params,
      [prompt] * BATCH, pixels, settings=settings, rng=jax.random.key(0),
      unroll_layers=unroll_layers, mesh=mesh if data_parallel else None, buckets=(len(prompt),),
    )  # fmt: skip
    assert (out.lengths == NEW_TOKENS).all()
    return out

  hf_ids = torch.tensor([prompt] * BATCH)
  hf_pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()

  def theirs():
    with torch.inference_mode():
      out = hf_model.generate(
        input_ids=hf_ids, attention_mask=torch.ones_like(hf_ids), pixel_values=hf_pixels,
        do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0,
      )  # fmt: skip
    assert out.shape[1] == len(prompt) + NEW_TOKENS
    return out

  ours_s = timing.median_seconds(ours, RUNS)
  ours_one_device_s = timing.median_seconds(lambda: ours(data_parallel=False), RUNS)
  ours_unstacked_s = timing.median_seconds(lambda: ours(data_parallel=False, scanned=True), RUNS)
  ours_scanned_s = timing.median_seconds(
    lambda: ours(data_parallel=False, scanned=True, unroll_layers=False), RUNS
  )
  best_threads, theirs_by_threads = timing.torch_best_threads(theirs, RUNS)
  theirs_s = theirs_by_threads[best_threads]
  same = np.array_equal(ours().tokens, theirs()[:, len(prompt) :].numpy())
  same_one_device = np.array_equal(ours().tokens, ours(data_parallel=False).tokens)
  tokens = BATCH * NEW_TOKENS
  print(f"model: {num_params / 1e6:.2f}M params, batch {BATCH}, prompt {len(prompt)} tokens (1 image each), "
        f"{NEW_TOKENS} new tokens, greedy, jax on {jax.devices()[0].platform}")  # fmt: skip
  print(f"greedy tokens identical: {same} (data-parallel vs one device: {same_one_device})")
  print(
    f"lmm_align.sampling, data-parallel over {len(jax.devices())} CPU device(s): "
    f"{tokens / ours_s:9.1f} tokens/s ({ours_s * 1e3:.1f} ms per call)"
  )
  print(
    f"  (one device: {tokens / ours_one_device_s:9.1f} tokens/s, {ours_one_device_s * 1e3:.1f} ms "
    f"per call, {theirs_s / ours_one_device_s:.2f}x transformers)"
  )
  print(
    f"  (one device, training layout, layers unstacked per call: "
    f"{tokens / ours_unstacked_s:9.1f} tokens/s, {ours_unstacked_s * 1e3:.1f} ms per call)"
  )
  print(
    f"  (one device, training layout, decode loop under nn.scan, unroll_layers=False: "
    f"{tokens / ours_scanned_s:9.1f} tokens/s, {ours_scanned_s * 1e3:.1f} ms per call)"
  )
  for threads, seconds in theirs_by_threads.items():
    print(
      f"transformers, {threads} torch thread(s): {tokens / seconds:9.1f} tokens/s ({seconds * 1e3:.1f} ms per call)"
    )
  print(f"transformers (best, {best_threads} thread(s)): {tokens / theirs_s:9.1f} tokens/s")
  print(f"speedup_vs_transformers: {theirs_s / ours_s:.2f}x")


if __name__ == "__main__":
  main()
