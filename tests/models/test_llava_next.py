"""LLaVA-NeXT against transformers' `LlavaNextForConditionalGeneration`: a tiny random CLIP +
LLaMA (GQA) with three pinpoint grids, images of two aspect ratios and a text-only row in one
left-padded batch -> equal logits; jitted with a pack plan; export -> from_pretrained -> equal
again; config round trips, the 34B labeler's sizes, and bad folders."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import tiny_hf
import transformers
from safetensors.numpy import load_file, save_file

from lmm_align import hf
from lmm_align.hf import CheckpointError
from lmm_align.models import RuntimeConfig, anyres, from_hf_config, get_variant, to_hf_config
from lmm_align.models.llava import Llava, dummy_inputs

# Wide -> the 1 x 2 grid, tall -> 2 x 1, near-square -> 2 x 2, each unpadded (one map row or
# column cut from each side); row 2 has no image.
SIZES = [(20, 64), (64, 18), (0, 0), (60, 44)]
CASES = {
  "gqa_scan": dict(num_kv_heads=2, scan=True),
  "layer_list_mqa_unrolled": dict(num_kv_heads=1, vision_feature_layer=[-3, -1], scan=False),
}


@pytest.fixture(scope="module")
def next_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("llava_next")
  return folder, tiny_hf.save_tiny_llava_next(folder)


def _our_logits(model, params, ids, mask, pixels, sizes):
  out = model.apply({"params": params}, ids.astype(np.int32), pixel_values=pixels,
                    image_sizes=sizes, attention_mask=mask)  # fmt: skip
  return np.asarray(out.logits)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
  kwargs = dict(CASES[case])
  scan = kwargs.pop("scan")
  ref = tiny_hf.save_tiny_llava_next(tmp_path, **kwargs)
  model, params = hf.load_pretrained(tmp_path, runtime=RuntimeConfig(scan_layers=scan))
  c = model.config
  assert c.family == "llava_next" and c.vision.tower == "clip" and c.text.model_type == "llama"
  assert c.image_grid_pinpoints == tuple(map(tuple, tiny_hf.NEXT_PINPOINTS))
  assert params["image_newline"].shape == (c.text.hidden_size,)
  grids = {anyres.grid_shape(s, c.packing) for s in SIZES if s[0]}
  assert grids == {(1, 2), (2, 1), (2, 2)}
  ids, mask, pixels, sizes = tiny_hf.anyres_batch(c, SIZES)
  # Placeholders as the processor counts them: 16 base features + unpadded rows x (cols + 1):
  # 20 x 64 -> a 4 x 8 map, 20 * 8 / 64 = 2.5 -> 2 rows kept (1 cut each side) -> 2 x 9.
  assert [int(n) for n in (ids == tiny_hf.IMAGE_TOKEN).sum(1)] == [
    16 + 2 * 9,
    16 + 8 * 3,
    0,
    16 + 8 * 7,
  ]
  valid = mask.astype(bool)
  np.testing.assert_allclose(
    _our_logits(model, params, ids, mask, pixels, sizes)[valid],
    tiny_hf.hf_anyres_logits(ref, ids, mask, pixels, sizes)[valid],
    atol=1e-4,
    rtol=0,
  )


def test_jitted_with_a_pack_plan_and_placeholder_check(next_folder):
  folder, _ = next_folder
  model, params = hf.load_pretrained(folder)
  c = model.config
  ids, mask, pixels, sizes = tiny_hf.anyres_batch(c, SIZES, seed=1)
  eager = _our_logits(model, params, ids, mask, pixels, sizes)
  # A bucket longer than any image: the plan is data, the shapes are (tiles, L).
  plan = anyres.pack_plan([tuple(s) for s in sizes], c.packing, max_tokens=96).as_arrays()
  step = jax.jit(
    lambda p, i, x, m, pl: (
      model.apply({"params": p}, i, pixel_values=x, attention_mask=m, pack_plan=pl).logits
    )
  )
  jitted = np.asarray(step(params, ids.astype(np.int32), pixels, mask, plan))
  np.testing.assert_allclose(jitted, eager, atol=1e-5, rtol=0)
  bad = ids.copy()
  bad[0, np.argmax(bad[0] == tiny_hf.IMAGE_TOKEN)] = 7  # one placeholder short in row 0
  with pytest.raises(ValueError, match=r"placeholders per row \[33, 40, 0, 72\]"):
    _our_logits(model, params, bad, mask, pixels, sizes)
  with pytest.raises(ValueError, match="image_sizes"):
    model.apply({"params": params}, ids.astype(np.int32), pixel_values=pixels)


def test_export_loads_in_transformers_with_equal_logits(next_folder, tmp_path):
  folder, ref = next_folder
  model, params = hf.load_pretrained(folder)
  hf.save_pretrained(model, params, tmp_path / "out")
  written = json.loads((tmp_path / "out" / "config.json").read_text())
  assert written["model_type"] == "llava_next"
  assert written["image_grid_pinpoints"] == tiny_hf.NEXT_PINPOINTS
  assert "image_newline" in load_file(tmp_path / "out" / "model.safetensors")
  reloaded, info = transformers.LlavaNextForConditionalGeneration.from_pretrained(
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


def test_config_round_trip_and_the_34b_labeler():
  c = get_variant("tiny-llava-next")
  again = from_hf_config(to_hf_config(c))
  assert again == c and again.family == "llava_next"
  big = get_variant("llava-next-34b")
  d = to_hf_config(big)
  assert d["architectures"] == ["LlavaNextForConditionalGeneration"]
  assert d["image_seq_length"] == 576 and d["text_config"]["num_key_value_heads"] == 8
  assert from_hf_config(d) == big
  # 576 base features + the unpadded 2 x 2 grid of a 672 x 672 image: 48 rows of 48 + newline.
  assert big.image_tokens((672, 672)) == 576 + 48 * 49
  shapes = jax.eval_shape(Llava(big).init, jax.random.key(0), *dummy_inputs(big))["params"]
  n = sum(x.size for x in jax.tree.leaves(shapes))
  assert 34.5e9 < n < 35.0e9, n  # Yi-34B (34.4B) + CLIP-L (0.30B) + projector (0.06B)
  assert shapes["image_newline"].value.shape == (7168,)


def test_bad_folders_name_the_problem(next_folder, tmp_path):
  folder, _ = next_folder
  d = json.loads((folder / "config.json").read_text())
  (tmp_path / "video").mkdir()
  (tmp_path / "video" / "config.json").write_text(
    json.dumps({**d, "model_type": "llava_next_video"})
  )
  with pytest.raises(CheckpointError, match=r"video/config.json: .*'llava_next_video'"):
    hf.load_pretrained(tmp_path / "video")
  (tmp_path / "pins").mkdir()
  (tmp_path / "pins" / "config.json").write_text(
    json.dumps({**d, "image_grid_pinpoints": [[32, 48]]})
  )
  with pytest.raises(CheckpointError, match=r"image_grid_pinpoints entry \[32, 48\]"):
    hf.load_pretrained(tmp_path / "pins")
  tensors = load_file(folder / "model.safetensors")
  for name, change in {"no_newline": None, "short_newline": tensors["image_newline"][:-1]}.items():
    out = tmp_path / name
    out.mkdir()
    (out / "config.json").write_text((folder / "config.json").read_text())
    changed = {k: v for k, v in tensors.items() if k != "image_newline"}
    if change is not None:
      changed["image_newline"] = change
    save_file(changed, str(out / "model.safetensors"))
    match = "missing 1 tensor.*image_newline" if change is None else "mis-shaped.*image_newline"
    with pytest.raises(CheckpointError, match=match):
      hf.load_pretrained(out)
