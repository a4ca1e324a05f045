"""LoRA: zero-initialised adapters leave the model unchanged, merging is exact, and the PEFT
layout equals the merged delta in HF's Linear layout."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmm_align import hf
from lmm_align.hf.peft import peft_tensors
from lmm_align.models import Llava, get_variant
from lmm_align.models.config import LoraConfig
from lmm_align.models.llava import dummy_inputs
from lmm_align.models.lora import merge_lora

LORA = LoraConfig(
  rank=4,
  alpha=8.0,
  targets=(r"language_model/.*(q|v|o|down)_proj", r"multi_modal_projector/linear_1"),
)


def _variables(config, seed=0):
  return flax.linen.unbox(jax.jit(Llava(config).init)(jax.random.key(seed), *dummy_inputs(config)))


def _randomise_b(lora_tree, seed=1):
  leaves, treedef = jax.tree.flatten(lora_tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(
    treedef, [0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
  )


@pytest.fixture(scope="module", params=[True, False], ids=["scan", "unrolled"])
def lora_model(request):
  config = get_variant("tiny", scan_layers=request.param, lora=LORA)
  variables = _variables(config)
  return config, variables["params"], _randomise_b(variables["lora"])


def test_adapters_start_at_zero_delta():
  config = get_variant("tiny", lora=LORA)
  variables = _variables(config)
  ids, pixels = dummy_inputs(config, 2)
  with_lora = Llava(config).apply(variables, ids, pixels).logits
  base = (
    Llava(config.with_runtime(lora=None)).apply({"params": variables["params"]}, ids, pixels).logits
  )
  np.testing.assert_array_equal(with_lora, base)
  targeted = {"/".join(p[:-1]) for p in flax.traverse_util.flatten_dict(variables["lora"])}
  assert "multi_modal_projector/linear_1" in targeted and "language_model/layers/q_proj" in targeted
  assert not any("k_proj" in t or "vision_tower" in t for t in targeted)


def test_merged_params_equal_the_adapted_model(lora_model):
  config, params, lora = lora_model
  ids, pixels = dummy_inputs(config, 2)
  adapted = jax.jit(Llava(config).apply)({"params": params, "lora": lora}, ids, pixels).logits
  merged = merge_lora(params, lora, LORA)
  plain = jax.jit(Llava(config.with_runtime(lora=None)).apply)(
    {"params": merged}, ids, pixels
  ).logits
  np.testing.assert_allclose(plain, adapted, atol=2e-5)
  assert (
    float(
      jnp.abs(
        adapted
        - Llava(config.with_runtime(lora=None)).apply({"params": params}, ids, pixels).logits
      ).max()
    )
    > 1e-3
  )


def test_peft_tensors_are_the_merged_delta_in_hf_layout(tmp_path, lora_model):
  config, params, lora = lora_model
  plain = config.with_runtime(lora=None)
  hf.save_pretrained(plain, params, tmp_path / "base")
  hf.save_pretrained(plain, merge_lora(params, lora, LORA), tmp_path / "merged")
  from safetensors.numpy import load_file

  base, merged = (
    load_file(str(tmp_path / "base" / "model.safetensors")),
    load_file(str(tmp_path / "merged" / "model.safetensors")),
  )
  adapters = peft_tensors(lora, config)
  modules = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in adapters}
  assert (
    "language_model.model.layers.1.self_attn.o_proj" in modules
    and "multi_modal_projector.linear_1" in modules
  )
  for module in modules:
    a = adapters[f"base_model.model.{module}.lora_A.weight"]
    b = adapters[f"base_model.model.{module}.lora_B.weight"]
    assert a.shape[0] == b.shape[1] == LORA.rank
    expected = base[f"{module}.weight"] + LORA.scale * (b @ a)
    np.testing.assert_allclose(merged[f"{module}.weight"], expected, atol=1e-6, err_msg=module)
  changed = [k for k in base if not np.array_equal(base[k], merged[k])]
  assert sorted(k.removesuffix(".weight") for k in changed) == sorted(modules)
