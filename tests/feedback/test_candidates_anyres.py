"""The loop's candidate stage on a LLaVA-OneVision policy: each prompt's image is tiled, its
placeholders counted by its packed size, and the greedy samples equal transformers' `generate`
on transformers' own preprocessing of the image (two aspect ratios and a text-only prompt)."""

from __future__ import annotations

import numpy as np
import pytest
import tiny_hf
import torch
import transformers
from PIL import Image

from lmm_align.data import conversation
from lmm_align.data.anyres import AnyresImageConfig
from lmm_align.feedback import candidates
from lmm_align.feedback.candidates import Prompt
from lmm_align.inference import load_model_folder
from lmm_align.sampling import SamplingSettings

TEMPLATE = "qwen_1_5"
NEW_TOKENS = 6
# (height, width): a wide 1 x 2 grid (3 tiles) and a tall 2 x 2 grid (5 tiles, downsampled).
PICTURES = {"wide": (20, 64), "tall": (60, 44)}
PROMPTS = [
  Prompt("p_wide", "Describe the image.", "wide"),
  Prompt("p_tall", "What is in the picture?", "tall"),
  Prompt("p_text", "Say something.", None),
]


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
  """A tiny random OneVision folder: BPE tokenizer with ChatML tokens, its image processor."""
  folder = tmp_path_factory.mktemp("onevision")
  tokenizer = tiny_hf.chatml_tokenizer([p.question for p in PROMPTS] * 4)
  torch.manual_seed(0)
  model = tiny_hf.save_onevision_for(tokenizer, folder)
  processor = transformers.LlavaOnevisionImageProcessorPil.from_pretrained(folder)
  rng = np.random.default_rng(0)
  pictures = {
    name: Image.fromarray(rng.integers(0, 256, (*size, 3), np.uint8))
    for name, size in PICTURES.items()
  }
  return folder, model, processor, pictures


def test_onevision_candidates_equal_transformers_generate(policy, tmp_path):
  folder, hf_model, processor, pictures = policy
  loaded = load_model_folder(folder, template=TEMPLATE)
  assert isinstance(loaded.image_config, AnyresImageConfig)
  tokenizer = loaded.tokenizer
  stop = conversation.answer_stop_ids(tokenizer, TEMPLATE)
  settings = SamplingSettings(temperature=0.0, max_new_tokens=NEW_TOKENS, stop_token_ids=stop)
  records = candidates.generate_candidates(
    loaded.model, loaded.params, tokenizer, loaded.image_config, PROMPTS,
    tmp_path / "candidates.jsonl", num_samples=2, settings=settings, seed=0, template=TEMPLATE,
    load_image=pictures.__getitem__,
  )  # fmt: skip
  assert [r["prompt_id"] for r in records] == ["p_wide"] * 2 + ["p_tall"] * 2 + ["p_text"] * 2

  image_id = loaded.model.config.image_token_id
  for prompt, (first, second) in zip(PROMPTS, zip(records[::2], records[1::2]), strict=True):
    assert first["response"] == second["response"]  # greedy: the K samples agree
    kwargs, image_tokens = {}, 1
    if prompt.image is not None:
      hf_pixels = processor(pictures[prompt.image], return_tensors="pt")
      kwargs = {"pixel_values": hf_pixels["pixel_values"], "image_sizes": hf_pixels["image_sizes"]}
      # transformers refuses a prompt whose placeholders are not its packed features' count
      image_tokens = loaded.model.config.image_tokens(tuple(hf_pixels["image_sizes"][0].tolist()))
    ids = conversation.encode_generation_prompt(
      prompt.question, tokenizer, TEMPLATE, image_tokens, image_id,
      with_image=prompt.image is not None, num_images=int(prompt.image is not None),
    ).input_ids  # fmt: skip
    with torch.no_grad():
      out = hf_model.generate(
        input_ids=torch.tensor(ids)[None], attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=list(stop), pad_token_id=3,
        **kwargs,
      )[0, len(ids) :].tolist()  # fmt: skip
    cut = next((i for i, t in enumerate(out) if t in stop), len(out))
    want = tokenizer.decode(out[:cut], skip_special_tokens=True).strip()
    assert first["response"] == want, prompt.id
    assert first["num_tokens"] == cut
