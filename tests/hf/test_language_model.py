"""A language model alone (LLaVA's stage 1 starts its decoder from Vicuna): LlamaForCausalLM
folders into a LLaVA's `language_model`, a smaller vocabulary extended by mean rows, and the
folders that are refused."""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
import numpy as np
import pytest
import tiny_hf
import torch

from lmm_align import hf
from lmm_align.models import Llava, init_params
from lmm_align.trainers import modelling

LLM_VOCAB = 280  # the LLaVA's tokenizer adds 20 rows (tiny_hf.VOCAB = 300)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("stage1")
  tiny_hf.save_tiny_llava(root / "llava")
  llm = tiny_hf.save_tiny_llama(root / "llm", seed=3, vocab_size=LLM_VOCAB)
  model, _ = hf.load_pretrained(root / "llava")
  return root, model.config, llm


def test_decoder_equals_transformers_and_added_rows_are_the_mean(folders):
  root, config, llm = folders
  params = hf.load_language_model(root / "llm", config)
  embed, head = params["embed_tokens"]["embedding"], params["lm_head"]["kernel"]
  assert embed.shape == (tiny_hf.VOCAB, config.text.hidden_size)
  assert head.shape == (config.text.hidden_size, tiny_hf.VOCAB)
  want_embed = llm.model.embed_tokens.weight.detach().numpy()
  np.testing.assert_array_equal(embed[:LLM_VOCAB], want_embed)
  np.testing.assert_allclose(
    embed[LLM_VOCAB:], np.broadcast_to(want_embed.mean(0), (20, 64)), atol=1e-6
  )
  want_head = llm.lm_head.weight.detach().numpy()  # [V, D]
  np.testing.assert_allclose(
    head[:, LLM_VOCAB:], np.broadcast_to(want_head.mean(0)[:, None], (64, 20)), atol=1e-6
  )

  text_model = Llava(dataclasses.replace(config, vision=None))
  ids = np.random.default_rng(0).integers(3, LLM_VOCAB, size=(2, 11)).astype(np.int32)
  got = np.asarray(text_model.apply({"params": {"language_model": params}}, ids).logits)
  with torch.no_grad():
    want = llm(input_ids=torch.from_numpy(ids.astype(np.int64))).logits.numpy()
  np.testing.assert_allclose(got[..., :LLM_VOCAB], want, atol=1e-4)


def test_other_folders_are_refused_naming_the_field(folders, tmp_path):
  root, config, _ = folders
  tiny_hf.save_tiny_llama(tmp_path / "wide", intermediate_size=96)
  with pytest.raises(hf.CheckpointError, match=r"wide: text config differs .*intermediate_size"):
    hf.load_language_model(tmp_path / "wide", config)
  tiny_hf.save_tiny_llama(tmp_path / "big_vocab", vocab_size=320)
  with pytest.raises(hf.CheckpointError, match=r"vocab_size 320 is larger than the model's 300"):
    hf.load_language_model(tmp_path / "big_vocab", config)
  with pytest.raises(hf.CheckpointError, match="is a LLaVA; a language model folder"):
    hf.load_language_model(root / "llava", config)


def test_initial_params_take_tower_and_decoder_from_their_folders(folders, tmp_path):
  root, config, _ = folders
  llava = hf.load_pretrained(root / "llava")[1]
  hf.save_vision_tower(config, llava["vision_tower"], tmp_path / "tower")
  run = ml_collections.ConfigDict(
    dict(init_from="", seed=0, model=dict(vision_init=str(tmp_path / "tower"), text_init=str(root / "llm")))
  )  # fmt: skip
  params = modelling.initial_params(Llava(config), run, "scratch", None, None)
  jax.tree.map(np.testing.assert_array_equal, params["vision_tower"], llava["vision_tower"])
  jax.tree.map(
    np.testing.assert_array_equal,
    params["language_model"],
    hf.load_language_model(root / "llm", config),
  )
  # The projector is new: the seed's, as a model built from scratch has it.
  scratch = init_params(config, jax.random.key(0))
  jax.tree.map(
    np.testing.assert_array_equal, params["multi_modal_projector"], scratch["multi_modal_projector"]
  )
