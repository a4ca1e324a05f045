"""Bad checkpoint folders and key layouts: clear errors that name the tensors, or a clean load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tiny_hf
import torch
from safetensors.numpy import load_file, save_file

from lmm_align import hf
from lmm_align.hf import CheckpointError


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  folder = tmp_path_factory.mktemp("llava")
  tiny_hf.save_tiny_llava(folder)
  return (
    folder,
    load_file(str(folder / "model.safetensors")),
    json.loads((folder / "config.json").read_text()),
  )


def _write(folder, tensors, config):
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(json.dumps(config))
  save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
  return folder


def _rename(tensors, old_prefix, new_prefix):
  return {
    (new_prefix + k[len(old_prefix) :] if k.startswith(old_prefix) else k): v
    for k, v in tensors.items()
  }


@pytest.mark.parametrize("layout", ["hub", "in_memory"])
def test_other_key_layouts_load_to_the_same_params(tmp_path, saved, layout):
  folder, tensors, config = saved
  _, reference = hf.load_pretrained(folder)
  if layout == "hub":
    renamed = _rename(tensors, "vision_tower.", "vision_tower.vision_model.")
  else:
    renamed = _rename(tensors, "vision_tower.", "model.vision_tower.")
    renamed = _rename(renamed, "multi_modal_projector.", "model.multi_modal_projector.")
    renamed = _rename(renamed, "language_model.model.", "model.language_model.")
    renamed = _rename(renamed, "language_model.lm_head.", "lm_head.")
  assert set(renamed) != set(tensors)
  _, params = hf.load_pretrained(_write(tmp_path, renamed, config))
  flat_a, flat_b = _flatten(reference), _flatten(params)
  assert flat_a.keys() == flat_b.keys()
  for k in flat_a:
    np.testing.assert_array_equal(flat_a[k], flat_b[k])


def _flatten(params):
  import flax

  return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params).items()}


def test_missing_tensor_is_named(tmp_path, saved):
  _, tensors, config = saved
  key = "language_model.model.layers.1.self_attn.k_proj.weight"
  broken = {k: v for k, v in tensors.items() if k != key}
  with pytest.raises(
    CheckpointError, match=r"missing 1 tensor.*language_model/layers/k_proj/kernel\[layer 1\]"
  ):
    hf.load_pretrained(_write(tmp_path, broken, config))


def test_wrong_shape_is_named(tmp_path, saved):
  _, tensors, config = saved
  key = "multi_modal_projector.linear_1.weight"
  broken = dict(tensors)
  broken[key] = np.zeros((64, 31), np.float32)
  with pytest.raises(
    CheckpointError,
    match=r"mis-shaped.*multi_modal_projector\.linear_1\.weight.*\(64, 31\), expected \(64, 32\)",
  ):
    hf.load_pretrained(_write(tmp_path, broken, config))


def test_unexpected_tensor_is_named(tmp_path, saved):
  _, tensors, config = saved
  broken = dict(
    tensors, **{"language_model.model.layers.0.self_attn.rope_bias": np.zeros(3, np.float32)}
  )
  with pytest.raises(CheckpointError, match=r"unexpected 1 tensor.*rope_bias"):
    hf.load_pretrained(_write(tmp_path, broken, config))


def test_extra_layer_is_unexpected(tmp_path, saved):
  _, tensors, config = saved
  extra = {
    k.replace("layers.1.", "layers.7."): v
    for k, v in tensors.items()
    if "language_model.model.layers.1." in k
  }
  with pytest.raises(CheckpointError, match=r"layers\.7\..*beyond"):
    hf.load_pretrained(_write(tmp_path, {**tensors, **extra}, config))


def test_pickle_only_folder_is_refused_with_a_conversion_hint(tmp_path, saved):
  _, tensors, config = saved
  (tmp_path / "config.json").write_text(json.dumps(config))
  torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, tmp_path / "pytorch_model.bin")
  with pytest.raises(
    CheckpointError, match=r"pytorch_model\.bin.*never unpickles.*save_pretrained"
  ):
    hf.load_pretrained(tmp_path)
  # Opt-in path: torch.load(weights_only=True) only.
  _, params = hf.load_pretrained(tmp_path, allow_torch_bin=True)
  _, reference = hf.load_pretrained(saved[0])
  for k, v in _flatten(reference).items():
    np.testing.assert_array_equal(_flatten(params)[k], v)


@pytest.mark.parametrize(
  "setup, message",
  [
    (lambda p: None, "has no config.json"),
    (  # a family we do not load: refused by name
      lambda p: (p / "config.json").write_text(json.dumps({"model_type": "llava_next_video"})),
      "model_type 'llava_next_video'",
    ),
    (  # a family we load, but its config lacks a field: the field and the family named
      lambda p: (p / "config.json").write_text(json.dumps({"model_type": "llava_next"})),
      "no field 'text_config' \\(model_type 'llava_next'\\)",
    ),
  ],
)
def test_bad_folders(tmp_path, setup, message):
  setup(tmp_path)
  with pytest.raises(ValueError, match=message):
    hf.load_pretrained(tmp_path)
  with pytest.raises(CheckpointError, match="is not a directory"):
    hf.load_pretrained(tmp_path / "absent")


def test_image_token_count_mismatch_is_an_error(saved):
  folder, _, _ = saved
  model, params = hf.load_pretrained(folder)
  ids = np.array(
    [[1] + [tiny_hf.IMAGE_TOKEN] * 17 + [5, 6]], np.int32
  )  # 17 placeholders, one image needs 16
  with pytest.raises(ValueError, match=r"17 image placeholder tokens.*1 image\(s\) x 16"):
    model.apply({"params": params}, ids, pixel_values=tiny_hf.random_pixels(1))
  with pytest.raises(ValueError, match=r"17 image placeholder tokens.*0 image\(s\)"):
    model.apply({"params": params}, ids, pixel_values=None)
