"""A vision tower alone: CLIPVisionModel / CLIPModel folders in, CLIPVisionModel folders out."""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
import numpy as np
import pytest
import tiny_hf
import torch
import transformers

from lmm_align import hf
from lmm_align.models import Llava, get_variant, init_params
from lmm_align.models.clip_vit import ClipVisionTower
from lmm_align.trainers import modelling

CONFIG = get_variant("tiny")


def _tower_hidden_states(vision_params: dict, pixels: np.ndarray) -> list[np.ndarray]:
  tower = ClipVisionTower(CONFIG.vision, CONFIG.runtime)
  return [np.asarray(h) for h in tower.apply({"params": vision_params}, pixels)]


def _reference_hidden_states(model: transformers.CLIPVisionModel, pixels: np.ndarray):
  with torch.no_grad():
    out = model(pixel_values=tiny_hf.to_torch_pixels(pixels), output_hidden_states=True)
  return [h.numpy() for h in out.hidden_states]


@pytest.fixture(scope="module")
def clip_vision_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("clip_vision")
  torch.manual_seed(0)
  model = transformers.CLIPVisionModel(tiny_hf.clip_config(num_hidden_layers=2)).eval()
  tiny_hf._randomize_norms(model)
  model.save_pretrained(folder)
  return folder, model


def test_load_matches_transformers_hidden_states(clip_vision_folder):
  folder, reference = clip_vision_folder
  params = hf.load_vision_tower(folder, CONFIG)
  pixels = tiny_hf.random_pixels(2)
  got, want = _tower_hidden_states(params, pixels), _reference_hidden_states(reference, pixels)
  assert len(got) == len(want) == 3
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(g, w, atol=1e-5)


def test_save_then_transformers_loads_the_same_tower(tmp_path):
  params = init_params(CONFIG, jax.random.key(3))["vision_tower"]
  hf.save_vision_tower(CONFIG, params, tmp_path)
  model, info = transformers.CLIPVisionModel.from_pretrained(tmp_path, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  pixels = tiny_hf.random_pixels(2, seed=1)
  for g, w in zip(
    _tower_hidden_states(params, pixels),
    _reference_hidden_states(model.eval(), pixels),
    strict=True,
  ):
    np.testing.assert_allclose(g, w, atol=1e-5)
  back = hf.load_vision_tower(tmp_path, CONFIG)
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_clip_model_folder_skips_the_text_tower(tmp_path):
  torch.manual_seed(1)
  config = transformers.CLIPConfig(
    vision_config=tiny_hf.clip_config(num_hidden_layers=2).to_dict(),
    text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99),
    projection_dim=16,
  )  # fmt: skip
  model = transformers.CLIPModel(config).eval()
  model.save_pretrained(tmp_path)
  params = hf.load_vision_tower(tmp_path, CONFIG)
  pixels = tiny_hf.random_pixels(1, seed=2)
  with torch.no_grad():
    want = model.vision_model(
      pixel_values=tiny_hf.to_torch_pixels(pixels), output_hidden_states=True
    ).hidden_states[-1]
  np.testing.assert_allclose(_tower_hidden_states(params, pixels)[-1], want.numpy(), atol=1e-5)


def test_a_different_tower_is_refused_naming_the_fields(clip_vision_folder):
  folder, _ = clip_vision_folder
  other = CONFIG.replace(vision=dataclasses.replace(CONFIG.vision, hidden_size=48, num_layers=3))
  with pytest.raises(hf.CheckpointError, match=r"hidden_size.*num_layers|num_layers.*hidden_size"):
    hf.load_vision_tower(folder, other)
  with pytest.raises(hf.CheckpointError, match="model_type 'llama'"):
    llama = folder.parent / "llama"
    tiny_hf.save_tiny_llama(llama)
    hf.load_vision_tower(llama, CONFIG)


def test_initial_params_take_the_tower_from_vision_init(clip_vision_folder):
  folder, _ = clip_vision_folder
  config = ml_collections.ConfigDict(
    dict(init_from="", seed=0, model=dict(vision_init=str(folder)))
  )
  params = modelling.initial_params(Llava(CONFIG), config, "scratch", None, None)
  jax.tree.map(
    np.testing.assert_array_equal, params["vision_tower"], hf.load_vision_tower(folder, CONFIG)
  )
  scratch = init_params(CONFIG, jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, params["language_model"], scratch["language_model"])
