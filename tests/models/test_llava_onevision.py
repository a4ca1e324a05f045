"""LLaVA-OneVision against transformers' `LlavaOnevisionForConditionalGeneration`: a tiny random
headless SigLIP + Qwen2 (GQA) with `anyres_max_1`, so that large grids are bilinearly
downsampled, images of two aspect ratios and a text-only row in one left-padded batch -> equal
logits; the multi-image single-tile layout; export -> from_pretrained -> equal again; config
round trips, the 0.5B / 7B / 72B variants, and bad configs."""

from __future__ import annotations

import json

import flax
import jax
import numpy as np
import pytest
import tiny_hf
import torch
import transformers
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file

from lmm_align import hf, sharding
from lmm_align.hf import CheckpointError
from lmm_align.models import RuntimeConfig, anyres, from_hf_config, get_variant, to_hf_config
from lmm_align.models.llava import Llava, dummy_inputs
from lmm_align.models.variants import get_vision_variant
from lmm_align.sampling import SamplingSettings, generate
from lmm_align.sharding import DEFAULT_RULES, check_rules_cover
from lmm_align.trainers.state import param_shardings

# 40 x 64 (wide) and 60 x 44 (tall) fill 2 x 2 grids whose unpadded 6 x 8 / 8 x 6 maps are
# downsampled by sqrt(48 / 16) to 3 x 4 / 4 x 3; row 2 has no image; 20 x 64 keeps its
# unpadded 2 x 8 map (ratio 1, under the 1.1 threshold).
SIZES = [(40, 64), (60, 44), (0, 0), (20, 64)]


@pytest.fixture(scope="module")
def ov_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("llava_onevision")
  return folder, tiny_hf.save_tiny_llava_onevision(folder)


def _our_logits(model, params, ids, mask, pixels, sizes=None):
  out = model.apply({"params": params}, ids.astype(np.int32), pixel_values=pixels,
                    image_sizes=sizes, attention_mask=mask)  # fmt: skip
  return np.asarray(out.logits)


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
def test_logits_match_transformers_with_downsampling(ov_folder, scan):
  folder, ref = ov_folder
  model, params = hf.load_pretrained(folder, runtime=RuntimeConfig(scan_layers=scan))
  c = model.config
  assert c.family == "llava_onevision" and c.vision_aspect_ratio == "anyres_max_1"
  assert c.vision.tower == "siglip" and not c.vision.use_head and c.text.model_type == "qwen2"
  assert c.video_token_id == tiny_hf.VIDEO_TOKEN and c.text.num_kv_heads == 2
  shapes = [anyres.packed_grid_shape(s, c.packing)[1] for s in SIZES if s[0]]
  assert shapes == [(3, 4), (4, 3), (2, 8)]
  ids, mask, pixels, sizes = tiny_hf.anyres_batch(c, SIZES)
  counts = [int(n) for n in (ids == tiny_hf.IMAGE_TOKEN).sum(1)]
  assert counts == [16 + 3 * 5, 16 + 4 * 4, 0, 16 + 2 * 9]
  valid = mask.astype(bool)
  np.testing.assert_allclose(
    _our_logits(model, params, ids, mask, pixels, sizes)[valid],
    tiny_hf.hf_anyres_logits(ref, ids, mask, pixels, sizes)[valid],
    atol=1e-4,
    rtol=0,
  )


def test_single_tile_images_match_the_multi_image_layout(ov_folder):
  """Two images in one row, each one tile (P features + image_newline): transformers'
  `batch_num_images=[2]` path, ours given pixel_values [N, H, W, 3]."""
  folder, ref = ov_folder
  model, params = hf.load_pretrained(folder)
  c = model.config
  assert c.num_image_tokens == 17
  rng = np.random.default_rng(3)
  row = [
    1,
    9,
    *[tiny_hf.IMAGE_TOKEN] * 17,
    11,
    *[tiny_hf.IMAGE_TOKEN] * 17,
    *rng.integers(5, 290, 4),
  ]
  ids, mask = np.array([row]), np.ones((1, len(row)), np.int64)
  tiles = rng.normal(size=(2, c.packing.max_tiles_per_image, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    want = ref(
      input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
      pixel_values=torch.from_numpy(np.ascontiguousarray(tiles.transpose(0, 1, 4, 2, 3))),
      image_sizes=torch.tensor([[40, 64], [60, 44]]), batch_num_images=torch.tensor([2]),
    ).logits.numpy()  # fmt: skip
  np.testing.assert_allclose(
    _our_logits(model, params, ids, mask, tiles[:, 0]), want, atol=1e-4, rtol=0
  )


def test_export_loads_in_transformers_with_equal_logits(ov_folder, tmp_path):
  folder, ref = ov_folder
  model, params = hf.load_pretrained(folder)
  hf.save_pretrained(model, params, tmp_path / "out")
  written = json.loads((tmp_path / "out" / "config.json").read_text())
  assert written["model_type"] == "llava_onevision"
  assert written["vision_aspect_ratio"] == "anyres_max_1"
  assert written["video_token_index"] == tiny_hf.VIDEO_TOKEN
  assert written["vision_config"]["vision_use_head"] is False
  assert "image_newline" in load_file(tmp_path / "out" / "model.safetensors")
  reloaded, info = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(
    tmp_path / "out", output_loading_info=True
  )
  assert not info["missing_keys"] and not info["unexpected_keys"]
  ref_state, new_state = ref.state_dict(), reloaded.eval().state_dict()
  assert set(ref_state) == set(new_state)
  for key in ref_state:
    np.testing.assert_array_equal(new_state[key].numpy(), ref_state[key].numpy(), err_msg=key)
  ids, mask, pixels, sizes = tiny_hf.anyres_batch(model.config, SIZES, seed=2)
  np.testing.assert_array_equal(
    tiny_hf.hf_anyres_logits(reloaded, ids, mask, pixels, sizes),
    tiny_hf.hf_anyres_logits(ref, ids, mask, pixels, sizes),
  )
  _, params2 = hf.load_pretrained(tmp_path / "out")
  jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_variants_and_config_round_trip():
  tiny = get_variant("tiny-llava-onevision")
  assert from_hf_config(to_hf_config(tiny)) == tiny
  tower = get_vision_variant("siglip-so400m-14-384")
  for name, qwen2 in [("0.5b", "qwen2-0.5b"), ("7b", "qwen2-7b"), ("72b", "qwen2-72b")]:
    c = get_variant(f"llava-onevision-{name}")
    assert c.text == get_variant(qwen2).text
    assert c.vision.num_layers == tower.num_layers - 1 and not c.vision.use_head
    assert c.packing.side == 27 and c.packing.max_num_tiles == 9
    assert c.packing.max_tiles_per_image == 37  # the base tile + 6 x 6
    assert from_hf_config(to_hf_config(c)) == c
  # Abstract init at full size: every parameter has a sharding rule, image_newline is "embed".
  for name, low, high in [("0.5b", 0.89e9, 0.90e9), ("72b", 73.1e9, 73.3e9)]:
    c = get_variant(f"llava-onevision-{name}")
    boxed = jax.eval_shape(Llava(c).init, jax.random.key(0), *dummy_inputs(c))
    check_rules_cover(boxed, DEFAULT_RULES)
    assert flax.linen.get_partition_spec(boxed)["params"]["image_newline"] == P("embed")
    n = sum(x.size for x in jax.tree.leaves(flax.linen.unbox(boxed)))
    assert low < n < high, (name, n)  # the checkpoints' published 0.89B / 73.2B
  # A 1152 x 1152 image: a 3 x 3 grid, 81 x 81 map, under 1.1**2 x 9 tiles: not downsampled.
  seven = get_variant("llava-onevision-7b")
  assert seven.image_tokens((1152, 1152)) == 729 + 81 * 82
  # 2304 x 2304: 6 x 6 tiles, 162 x 162 -> ratio 2 -> 81 x 81.
  assert seven.image_tokens((2304, 2304)) == 729 + 81 * 82


def test_bad_configs_name_the_field(ov_folder, tmp_path):
  folder, _ = ov_folder
  d = json.loads((folder / "config.json").read_text())
  for name, change, match in [
    ("aspect", {"vision_aspect_ratio": "anyres"}, "vision_aspect_ratio 'anyres'"),
    ("strategy", {"vision_feature_select_strategy": "default"}, "15 features per tile"),
    ("family", {"model_type": "qwen2_vl"}, "model_type 'qwen2_vl' is not supported"),
  ]:
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.json").write_text(json.dumps({**d, **change}))
    with pytest.raises(CheckpointError, match=rf"{name}/config.json: .*{match}"):
      hf.load_pretrained(tmp_path / name)


def test_greedy_generation_matches_transformers(ov_folder):
  """The KV-cached sampler with tiles and image_sizes vs `generate`: two downsampled images of
  different aspect ratios and a text-only row, left-padded; on one device, data-parallel and
  model-sharded (the pack plan rides with its rows, 3 rows topped up to whole groups)."""
  folder, ref = ov_folder
  model, params = hf.load_pretrained(folder)
  ids, mask, pixels, sizes = tiny_hf.anyres_batch(model.config, SIZES[:3], seed=4)
  prompts = [row[m.astype(bool)].tolist() for row, m in zip(ids, mask)]
  new = 8
  settings = SamplingSettings(temperature=0.0, max_new_tokens=new, stop_token_ids=())
  out = generate(model, params, prompts, pixels, settings=settings, rng=None, image_sizes=sizes)
  has_image = sizes[:, 0] > 0
  with torch.no_grad():
    want = ref.generate(
      input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
      pixel_values=torch.from_numpy(np.ascontiguousarray(pixels[has_image].transpose(0, 1, 4, 2, 3))),
      image_sizes=torch.from_numpy(sizes[has_image]), do_sample=False, max_new_tokens=new,
      min_new_tokens=new, pad_token_id=0,
    )  # fmt: skip
  np.testing.assert_array_equal(out.tokens, want[:, ids.shape[1] :].numpy())
  for mesh_sizes in [(2, 1, 1), (2, 2, 2)]:
    mesh = sharding.make_mesh(mesh_sizes, jax.devices()[: int(np.prod(mesh_sizes))])
    with sharding.activation_sharding(mesh, sharding.DEFAULT_RULES):
      sharded = jax.device_put(params, param_shardings(model, mesh, sharding.DEFAULT_RULES))
      split = generate(
        model, sharded, prompts, pixels, settings=settings, rng=None, image_sizes=sizes, mesh=mesh
      )
    np.testing.assert_array_equal(split.tokens, out.tokens, err_msg=str(mesh_sizes))
  short = [p[:-1] if i == 0 else p for i, p in enumerate(prompts)]  # one text token fewer: fine
  generate(model, params, short, pixels, settings=settings, rng=None, image_sizes=sizes)
  wrong = [[t for t in prompts[0] if t != tiny_hf.IMAGE_TOKEN][:3] + prompts[0][3:], *prompts[1:]]
  with pytest.raises(ValueError, match="placeholders per row"):
    generate(model, params, wrong, pixels, settings=settings, rng=None, image_sizes=sizes)
  with pytest.raises(ValueError, match="need image_sizes"):
    generate(model, params, prompts, pixels, settings=settings, rng=None)
