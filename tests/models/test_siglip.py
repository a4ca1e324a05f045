"""The SigLIP tower against transformers: `SiglipVisionModel` (hidden states, post-LayerNorm,
attention-pooling head), a LLaVA of SigLIP + Qwen2 (`LlavaForConditionalGeneration`, the way
LLaVA-OneVision composes them), export round trips, full-size shapes and bad folders."""

from __future__ import annotations

import dataclasses
import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_hf
import torch
import transformers
from safetensors.numpy import load_file, save_file

from lmm_align import hf
from lmm_align.hf import CheckpointError, name_map
from lmm_align.models import Llava, ModelConfig, RuntimeConfig, get_variant
from lmm_align.models.hf_config import to_hf_config, vision_config_from_hf
from lmm_align.models.llava import dummy_inputs
from lmm_align.models.siglip import SiglipVisionTower
from lmm_align.models.variants import get_vision_variant
from lmm_align.sampling import SamplingSettings, generate
from lmm_align.sharding import DEFAULT_RULES, check_rules_cover

TEXT = get_variant("tiny-qwen2").text


def _tower_outputs(vision, params, pixels, scan=True):
  tower = SiglipVisionTower(vision, RuntimeConfig(scan_layers=scan))
  apply = jax.jit(lambda p, x: tower.apply({"params": p}, x, mutable=["intermediates"]))
  hidden, state = apply(params, pixels)
  inter = state["intermediates"]
  pooled = inter["pooler_output"][0] if "pooler_output" in inter else None
  return [np.asarray(h) for h in hidden], np.asarray(inter["last_hidden_state"][0]), pooled


@pytest.fixture(scope="module")
def siglip_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("siglip_vision")
  return folder, tiny_hf.save_tiny_siglip(folder)


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
def test_tower_matches_siglip_vision_model(siglip_folder, scan):
  folder, ref = siglip_folder
  vision = vision_config_from_hf(json.loads((folder / "config.json").read_text()))
  assert vision.tower == "siglip" and vision.use_head and vision.hidden_act == "gelu_pytorch_tanh"
  config = ModelConfig(text=TEXT, vision=vision, runtime=RuntimeConfig(scan_layers=scan))
  params = hf.load_vision_tower(folder, config)
  assert "class_embedding" not in params and "pre_layrnorm" not in params
  pixels = tiny_hf.random_pixels(3, seed=1)
  hidden, last, pooled = _tower_outputs(vision, params, pixels, scan)
  with torch.no_grad():
    want = ref(pixel_values=tiny_hf.to_torch_pixels(pixels), output_hidden_states=True)
  assert len(hidden) == len(want.hidden_states) == vision.num_layers + 1
  for i, (g, w) in enumerate(zip(hidden, want.hidden_states, strict=True)):
    assert g.shape == (3, 16, 32)
    np.testing.assert_allclose(g, w.numpy(), atol=1e-4, err_msg=f"hidden state {i}")
  np.testing.assert_allclose(last, want.last_hidden_state.numpy(), atol=1e-4)
  assert pooled.shape == (3, 32)
  np.testing.assert_allclose(pooled, want.pooler_output.numpy(), atol=1e-4)


def test_tower_export_and_two_tower_folder(siglip_folder, tmp_path):
  folder, ref = siglip_folder
  vision = vision_config_from_hf(json.loads((folder / "config.json").read_text()))
  config = ModelConfig(text=TEXT, vision=vision)
  params = hf.load_vision_tower(folder, config)
  hf.save_vision_tower(config, params, tmp_path / "out")
  reloaded, info = transformers.SiglipVisionModel.from_pretrained(
    tmp_path / "out", output_loading_info=True
  )
  assert not info["missing_keys"] and not info["unexpected_keys"]
  for key, value in ref.state_dict().items():
    np.testing.assert_array_equal(reloaded.state_dict()[key].numpy(), value.numpy(), err_msg=key)
  # A SiglipModel folder: the tower under "vision_model.", a text tower and logit scale beside.
  text = transformers.SiglipTextConfig(
    vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
  )
  two = transformers.SiglipModel(
    transformers.SiglipConfig(text_config=text.to_dict(), vision_config=ref.config.to_dict())
  )
  two.vision_model.load_state_dict(ref.state_dict())
  two.save_pretrained(tmp_path / "two")
  jax.tree.map(
    np.testing.assert_array_equal, params, hf.load_vision_tower(tmp_path / "two", config)
  )


LLAVA_CASES = {
  "onevision_-1_full": dict(vision_feature_layer=-1, select_strategy="full"),
  "-2_default": dict(vision_feature_layer=-2, select_strategy="default"),
  "layer_list_mqa": dict(vision_feature_layer=[-3, -1], select_strategy="default", num_kv_heads=1),
}


def _llava_batch(strategy: str, seed: int = 0):
  """Row 0: image then text; row 1: left-padded, image mid-row; row 2: text only, padded."""
  rng = np.random.default_rng(seed)
  n_img = tiny_hf.siglip_image_tokens_per_image(strategy)
  text = lambda n: list(rng.integers(5, 290, size=n))
  rows = [
    [1] + [tiny_hf.IMAGE_TOKEN] * n_img + text(9),
    [1] + text(3) + [tiny_hf.IMAGE_TOKEN] * n_img + text(2),
    [1] + text(12),
  ]
  t = max(map(len, rows))
  ids, mask = np.zeros((3, t), np.int64), np.zeros((3, t), np.int64)
  for i, row in enumerate(rows):
    ids[i, t - len(row) :], mask[i, t - len(row) :] = row, 1
  return ids, mask, tiny_hf.random_pixels(2, seed)


def _hf_logits(model, ids, mask, pixels):
  positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)
  with torch.no_grad():
    return model(
      input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
      position_ids=torch.from_numpy(positions), pixel_values=tiny_hf.to_torch_pixels(pixels),
    ).logits.numpy()  # fmt: skip


def _our_logits(model, params, ids, mask, pixels):
  out = model.apply({"params": params}, ids.astype(np.int32), pixel_values=pixels,
                    attention_mask=mask)  # fmt: skip
  return np.asarray(out.logits)


@pytest.mark.parametrize("case", list(LLAVA_CASES))
def test_siglip_qwen2_llava_matches_transformers(tmp_path, case):
  kwargs = LLAVA_CASES[case]
  ref = tiny_hf.save_tiny_siglip_qwen2_llava(tmp_path, **kwargs)
  scan = case != "-2_default"
  model, params = hf.load_pretrained(tmp_path, runtime=RuntimeConfig(scan_layers=scan))
  c = model.config
  assert c.vision.tower == "siglip" and not c.vision.use_head and c.text.model_type == "qwen2"
  assert c.num_image_tokens == tiny_hf.siglip_image_tokens_per_image(kwargs["select_strategy"])
  ids, mask, pixels = _llava_batch(kwargs["select_strategy"])
  valid = mask.astype(bool)
  np.testing.assert_allclose(
    _our_logits(model, params, ids, mask, pixels)[valid],
    _hf_logits(ref, ids, mask, pixels)[valid],
    atol=1e-4,
    rtol=0,
  )


def test_siglip_qwen2_llava_export_round_trip(tmp_path):
  ref = tiny_hf.save_tiny_siglip_qwen2_llava(tmp_path / "src")
  model, params = hf.load_pretrained(tmp_path / "src")
  hf.save_pretrained(model, params, tmp_path / "out")
  written = json.loads((tmp_path / "out" / "config.json").read_text())
  assert written["vision_config"]["model_type"] == "siglip_vision_model"
  assert written["text_config"]["model_type"] == "qwen2"
  reloaded = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
  ref_state, new_state = ref.state_dict(), reloaded.state_dict()
  assert set(ref_state) == set(new_state)
  for key in ref_state:
    np.testing.assert_array_equal(new_state[key].numpy(), ref_state[key].numpy(), err_msg=key)
  ids, mask, pixels = _llava_batch("full")
  np.testing.assert_array_equal(
    _hf_logits(reloaded, ids, mask, pixels), _hf_logits(ref, ids, mask, pixels)
  )
  _, params2 = hf.load_pretrained(tmp_path / "out")
  jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_scan_and_remat_give_the_same_loss_and_grads(siglip_folder):
  """The tower scanned vs unrolled under full remat: the same loss and gradients."""
  folder, _ = siglip_folder
  vision = vision_config_from_hf(json.loads((folder / "config.json").read_text()))
  params = hf.load_vision_tower(folder, ModelConfig(text=TEXT, vision=vision))
  pixels = tiny_hf.random_pixels(2)

  def loss(p, runtime):
    hidden = SiglipVisionTower(vision, runtime).apply({"params": p}, pixels)
    return jnp.mean(hidden[-1] ** 2) + jnp.mean(jnp.tanh(hidden[-2]))

  value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  ref_loss, ref_grads = value_and_grad(params, RuntimeConfig())
  unrolled = RuntimeConfig(scan_layers=False, remat_policy="full")
  got_loss, got_grads = value_and_grad(_unstack(params), unrolled)
  np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-6)
  assert float(jnp.abs(got_grads["layers_0"]["fc1"]["kernel"]).max()) > 0
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), _unstack(ref_grads),
    got_grads,
  )  # fmt: skip


def _unstack(params):
  """Scanned params -> the unrolled layout (layers_i)."""
  out = {}
  for path, value in flax.traverse_util.flatten_dict(params).items():
    if "layers" in path:
      k = path.index("layers")
      for i in range(value.shape[0]):
        out[path[:k] + (f"layers_{i}",) + path[k + 1 :]] = value[i]
    else:
      out[path] = value
  return flax.traverse_util.unflatten_dict(out)


def test_image_token_counts_follow_transformers():
  config = get_variant("tiny-siglip-qwen2")
  assert config.num_image_tokens == 16  # "full": every patch, no class token
  assert config.replace(vision_feature_select_strategy="default").num_image_tokens == 15
  clip = get_variant("tiny")
  assert clip.num_image_tokens == 16  # the class token dropped
  assert clip.replace(vision_feature_select_strategy="full").num_image_tokens == 17


def test_every_param_is_named_and_covered_by_the_sharding_rules():
  config = get_variant("tiny-siglip-qwen2")
  config = config.replace(vision=dataclasses.replace(config.vision, use_head=True))
  boxed = jax.eval_shape(Llava(config).init, jax.random.key(0), *dummy_inputs(config))
  check_rules_cover(boxed, DEFAULT_RULES)
  specs = flax.traverse_util.flatten_dict(flax.linen.get_partition_spec(boxed)["params"])
  shapes = flax.traverse_util.flatten_dict(flax.linen.unbox(boxed)["params"])
  assert ("vision_tower", "head", "in_proj_kernel") in shapes
  for path, spec in specs.items():
    assert len(spec) == len(shapes[path].shape), path
    assert any(name is not None for name in spec), path


def test_so400m_variant_has_the_published_shapes():
  """siglip-so400m-14-384 against transformers' own module tree (built on the meta device)."""
  vision = get_vision_variant("siglip-so400m-14-384")
  assert vision.num_patches == 27 * 27
  config = ModelConfig(text=TEXT, vision=vision)
  tower = SiglipVisionTower(vision, config.runtime)
  pixels = jax.ShapeDtypeStruct((1, 384, 384, 3), np.float32)
  abstract = jax.eval_shape(tower.init, jax.random.key(0), pixels)["params"]
  ours = flax.traverse_util.flatten_dict(flax.linen.unbox(abstract))
  ours = {("vision_tower", *k): v.shape for k, v in ours.items()}
  hf_config = transformers.SiglipVisionConfig(**to_hf_config(config)["vision_config"])
  with torch.device("meta"):
    ref = transformers.SiglipVisionModel(hf_config)
  want = {f"vision_tower.{k}": tuple(v.shape) for k, v in ref.state_dict().items()}
  mapped = {}
  for rule in name_map.tower_rules(vision):
    for layer in range(vision.num_layers) if rule.layered else [None]:
      path, index = name_map.our_path(rule.ours, layer, scan=True)
      shape = ours[path][1:] if index is not None else ours[path]
      key = rule.hf.replace("{i}", str(layer)) if layer is not None else rule.hf
      mapped[key] = name_map.hf_shape(rule.transform, shape)
  assert mapped == want
  num_params = sum(int(np.prod(s)) for s in ours.values())
  assert num_params == sum(p.numel() for p in ref.parameters())


def test_bad_siglip_folders_are_named(tmp_path, siglip_folder):
  src = tmp_path / "src"
  tiny_hf.save_tiny_siglip_qwen2_llava(src)
  config = json.loads((src / "config.json").read_text())
  tensors = load_file(str(src / "model.safetensors"))

  def write(name, cfg, weights):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder

  bad = dict(tensors)
  bad["vision_tower.embeddings.position_embedding.weight"] = np.zeros((17, 32), np.float32)
  with pytest.raises(
    CheckpointError,
    match=r"mis-shaped.*position_embedding\.weight.*\(17, 32\), expected \(16, 32\)",
  ):
    hf.load_pretrained(write("shape", config, bad))
  missing = {
    k: v for k, v in tensors.items() if k != "vision_tower.embeddings.patch_embedding.bias"
  }
  with pytest.raises(CheckpointError, match=r"missing 1 tensor.*vision_tower/patch_embedding/bias"):
    hf.load_pretrained(write("missing", config, missing))
  other_tower = dict(config, vision_config=dict(config["vision_config"], model_type="dinov2"))
  with pytest.raises(CheckpointError, match=r"other_tower/config\.json.*'dinov2' is not supported"):
    hf.load_pretrained(write("other_tower", other_tower, tensors))
  oblong = dict(config, vision_config=dict(config["vision_config"], image_size=[32, 48]))
  with pytest.raises(CheckpointError, match=r"oblong/config\.json.*image_size=\[32, 48\]"):
    hf.load_pretrained(write("oblong", oblong, tensors))
  folder, _ = siglip_folder
  two_layers = ModelConfig(text=TEXT, vision=get_vision_variant("siglip-tiny"))  # the folder: 3
  with pytest.raises(CheckpointError, match=r"vision config differs.*'num_layers': \(3, 2\)"):
    hf.load_vision_tower(folder, two_layers)
  with pytest.raises(CheckpointError, match=r"'siglip_vision_model' is a vision tower alone"):
    hf.load_pretrained(folder)


def test_siglip_qwen2_llava_greedy_generation_matches_transformers(tmp_path):
  """Our KV-cached sampler vs `generate` on a left-padded batch: an image row, a text row."""
  ref = tiny_hf.save_tiny_siglip_qwen2_llava(tmp_path)
  model, params = hf.load_pretrained(tmp_path)
  new, n_img = 10, model.config.num_image_tokens
  rng = np.random.RandomState(0)
  prompts = [
    [1, 5, *[tiny_hf.IMAGE_TOKEN] * n_img, *rng.randint(3, 290, 6).tolist()],
    [1, *rng.randint(3, 290, 5).tolist()],
  ]
  pixels = tiny_hf.random_pixels(1, seed=3)
  settings = SamplingSettings(temperature=0.0, max_new_tokens=new, stop_token_ids=())
  out = generate(model, params, prompts, pixels, settings=settings, rng=None)
  t = max(map(len, prompts))
  ids, mask = torch.zeros((2, t), dtype=torch.long), torch.zeros((2, t), dtype=torch.long)
  for i, p in enumerate(prompts):
    ids[i, t - len(p) :], mask[i, t - len(p) :] = torch.tensor(p), 1
  with torch.no_grad():
    want = ref.generate(
      input_ids=ids, attention_mask=mask, pixel_values=tiny_hf.to_torch_pixels(pixels),
      do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
    )  # fmt: skip
  np.testing.assert_array_equal(out.tokens, want[:, t:].numpy())
