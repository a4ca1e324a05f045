"""Parity with transformers: our logits from an imported HF folder, and the export round trip."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_hf
import torch
import transformers

from lmm_align import hf
from lmm_align.models import RuntimeConfig


def _batch(strategy: str, seed: int = 0):
  """Row 0: image then text; row 1: left-padded, image in the middle; row 2: text only, padded."""
  rng = np.random.default_rng(seed)
  n_img = tiny_hf.image_tokens_per_image(strategy)
  text = lambda n: list(rng.integers(5, 290, size=n))
  rows = [
    [1] + [tiny_hf.IMAGE_TOKEN] * n_img + text(9),
    [1] + text(3) + [tiny_hf.IMAGE_TOKEN] * n_img + text(2),
    [1] + text(12),
  ]
  t = max(map(len, rows))
  ids = np.zeros((3, t), np.int64)
  mask = np.zeros((3, t), np.int64)
  for i, row in enumerate(rows):
    ids[i, t - len(row) :] = row
    mask[i, t - len(row) :] = 1
  return ids, mask, tiny_hf.random_pixels(2, seed)


def _hf_logits(model, ids, mask, pixels=None):
  positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)
  kwargs = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                position_ids=torch.from_numpy(positions))  # fmt: skip
  if pixels is not None:
    kwargs["pixel_values"] = tiny_hf.to_torch_pixels(pixels)
  with torch.no_grad():
    return model(**kwargs).logits.numpy()


def _our_logits(model, params, ids, mask, pixels=None):
  out = model.apply(
    {"params": params},
    jnp.asarray(ids, jnp.int32),
    pixel_values=pixels,
    attention_mask=jnp.asarray(mask),
  )
  return np.asarray(out.logits)


LLAVA_VARIANTS = {
  "gqa_default_-2": dict(num_kv_heads=2, vision_feature_layer=-2, select_strategy="default"),
  "mha_full_-1": dict(num_kv_heads=4, vision_feature_layer=-1, select_strategy="full"),
  "layer_list": dict(num_kv_heads=2, vision_feature_layer=[-3, -1], select_strategy="default"),
  "mqa_full_-3": dict(num_kv_heads=1, vision_feature_layer=-3, select_strategy="full"),
}


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
@pytest.mark.parametrize("variant", list(LLAVA_VARIANTS))
def test_llava_logits_match_transformers(tmp_path, variant, scan):
  kwargs = LLAVA_VARIANTS[variant]
  ref = tiny_hf.save_tiny_llava(tmp_path, **kwargs)
  model, params = hf.load_pretrained(tmp_path, runtime=RuntimeConfig(scan_layers=scan))
  ids, mask, pixels = _batch(kwargs["select_strategy"])
  expected = _hf_logits(ref, ids, mask, pixels)
  got = _our_logits(model, params, ids, mask, pixels)
  valid = mask.astype(bool)
  assert got.shape == expected.shape
  np.testing.assert_allclose(got[valid], expected[valid], atol=1e-4, rtol=0)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_llama_logits_match_transformers(tmp_path, tie):
  ref = tiny_hf.save_tiny_llama(tmp_path, tie=tie, num_kv_heads=1)
  model, params = hf.load_pretrained(tmp_path)
  assert model.config.vision is None and model.config.text.tie_word_embeddings == tie
  ids, mask, _ = _batch("default")
  ids = np.where(ids == tiny_hf.IMAGE_TOKEN, 7, ids)
  np.testing.assert_allclose(
    _our_logits(model, params, ids, mask)[mask.astype(bool)],
    _hf_logits(ref, ids, mask)[mask.astype(bool)],
    atol=1e-4,
  )


def test_llama3_rope_scaling_matches_transformers(tmp_path):
  rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}  # fmt: skip
  ref = tiny_hf.save_tiny_llama(tmp_path, rope_parameters=rope, max_position_embeddings=256)
  model, params = hf.load_pretrained(tmp_path)
  assert model.config.text.rope_scaling is not None
  rng = np.random.default_rng(1)
  ids = rng.integers(5, 290, size=(2, 120))
  mask = np.ones_like(ids)
  np.testing.assert_allclose(
    _our_logits(model, params, ids, mask), _hf_logits(ref, ids, mask), atol=1e-4
  )


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("tiny_llava")
  ref = tiny_hf.save_tiny_llava(folder)
  return folder, ref


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
def test_export_round_trip_is_identical(tmp_path, llava_folder, scan):
  folder, ref = llava_folder
  model, params = hf.load_pretrained(folder, runtime=RuntimeConfig(scan_layers=scan))
  hf.save_pretrained(model, params, tmp_path)
  reloaded = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
  ref_state, new_state = ref.state_dict(), reloaded.state_dict()
  assert set(ref_state) == set(new_state)
  for key in ref_state:
    np.testing.assert_array_equal(new_state[key].numpy(), ref_state[key].numpy(), err_msg=key)
  ids, mask, pixels = _batch("default")
  np.testing.assert_array_equal(
    _hf_logits(reloaded, ids, mask, pixels), _hf_logits(ref, ids, mask, pixels)
  )
  # And back into lmm_align: the same params, bit for bit.
  _, params2 = hf.load_pretrained(tmp_path, runtime=RuntimeConfig(scan_layers=scan))
  jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_export_shards_and_bfloat16(tmp_path, llava_folder):
  folder, ref = llava_folder
  model, params = hf.load_pretrained(folder, dtype="bfloat16")
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
  hf.save_pretrained(model, params, tmp_path, max_shard_bytes=40_000)
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  files = set(index["weight_map"].values())
  assert len(files) > 2 and all((tmp_path / f).exists() for f in files)
  reloaded = transformers.LlavaForConditionalGeneration.from_pretrained(
    tmp_path, dtype=torch.bfloat16
  )
  for key, value in ref.state_dict().items():
    expected = value.to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(reloaded.state_dict()[key].float().numpy(), expected, err_msg=key)


def test_text_only_export_loads_as_llama(tmp_path):
  src = tmp_path / "src"
  ref = tiny_hf.save_tiny_llama(src)
  model, params = hf.load_pretrained(src)
  hf.save_pretrained(model, params, tmp_path / "out")
  reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
  for key, value in ref.state_dict().items():
    np.testing.assert_array_equal(reloaded.state_dict()[key].numpy(), value.numpy(), err_msg=key)
