"""Greedy parity with transformers: 16 tokens of our KV-cache sampler vs
`LlavaForConditionalGeneration.generate(do_sample=False)` on the same (tiny, random) weights,
for a left-padded batch with an image row and a text-only row."""

import jax
import numpy as np
import pytest
import torch
import transformers

from lmm_align.hf import load_pretrained
from lmm_align.sampling import SamplingSettings, generate

NEW = 16
IMAGE = 299


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
  torch.manual_seed(0)
  vision = transformers.CLIPVisionConfig(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
  )
  text = transformers.LlamaConfig(
    vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
  )  # fmt: skip
  config = transformers.LlavaConfig(
    vision_config=vision, text_config=text, image_token_index=IMAGE, image_seq_length=16
  )
  model = transformers.LlavaForConditionalGeneration(config).eval()
  folder = tmp_path_factory.mktemp("tiny_llava_hf")
  model.save_pretrained(folder)
  return folder, model


def test_greedy_matches_transformers(hf_folder):
  folder, hf_model = hf_folder
  ours, params = load_pretrained(folder)
  rs = np.random.RandomState(0)
  prompts = [
    [1, 5] + [IMAGE] * ours.config.num_image_tokens + rs.randint(3, 299, 6).tolist(),
    [1] + rs.randint(3, 299, 5).tolist(),
  ]
  pixels = rs.randn(1, 32, 32, 3).astype(np.float32)

  settings = SamplingSettings(temperature=0.0, max_new_tokens=NEW, stop_token_ids=())
  out = generate(ours, params, prompts, pixels, settings=settings, rng=jax.random.key(0))

  length = max(map(len, prompts))
  ids = torch.zeros((2, length), dtype=torch.long)
  mask = torch.zeros((2, length), dtype=torch.long)
  for i, p in enumerate(prompts):
    ids[i, length - len(p) :], mask[i, length - len(p) :] = torch.tensor(p), 1
  with torch.no_grad():
    hf_out = hf_model.generate(
      input_ids=ids, attention_mask=mask, pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2),
      do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0,
      return_dict_in_generate=True, output_logits=True,
    )  # fmt: skip
  np.testing.assert_array_equal(out.tokens, hf_out.sequences[:, length:].numpy())
  assert (out.lengths == NEW).all()
  # Our logprobs are the raw model's: HF's unprocessed logits, log-softmaxed, at our tokens.
  hf_logprobs = torch.stack(hf_out.logits, 1).log_softmax(-1)
  hf_logprobs = hf_logprobs.gather(-1, torch.tensor(out.tokens).long()[..., None])[..., 0]
  np.testing.assert_allclose(out.logprobs, hf_logprobs.numpy(), atol=1e-4)
