"""Loading places each param on its devices as soon as it is complete, and a param read twice
(the same tensor in two shards) is an error that names the tensors."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import tiny_hf
from safetensors.numpy import load_file, save_file

from lmm_align import hf
from lmm_align.hf import CheckpointError
from lmm_align.hf import checkpoint as checkpoint_lib
from lmm_align.models import RuntimeConfig


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("llava")
  tiny_hf.save_tiny_llava(folder)
  return folder


def _sharded(folder, out, shards):
  """The folder's tensors written as the given shards [(file name, keys)] with their index."""
  tensors = load_file(str(folder / "model.safetensors"))
  out.mkdir()
  (out / "config.json").write_text((folder / "config.json").read_text())
  weight_map = {}
  for name, keys in shards:
    save_file({k: tensors[k] for k in keys}, str(out / name), metadata={"format": "pt"})
    weight_map.update({k: name for k in keys})
  index = {"metadata": {}, "weight_map": weight_map}
  (out / "model.safetensors.index.json").write_text(json.dumps(index))
  return out


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
def test_params_are_placed_while_reading(folder, monkeypatch, scan):
  """Unrolled, every param is placed right after its tensor is read; scanned, a stacked param
  when its last layer is read: the host never holds the whole model. Values equal the load."""
  reads, placed_after = [0], []
  iter_tensors, place = checkpoint_lib._iter_tensors, checkpoint_lib.place_on_devices

  def counting_iter(*args):
    for item in iter_tensors(*args):
      reads[0] += 1
      yield item

  def recording_place(value, placement):
    placed_after.append(reads[0])
    return place(value, placement)

  monkeypatch.setattr(checkpoint_lib, "_iter_tensors", counting_iter)
  monkeypatch.setattr(checkpoint_lib, "place_on_devices", recording_place)
  model, params = hf.load_pretrained(folder, runtime=RuntimeConfig(scan_layers=scan))
  total = reads[0]
  num_params = len(jax.tree.leaves(params))
  assert len(placed_after) == num_params
  if not scan:
    assert placed_after == list(range(1, total + 1))  # one param per tensor, placed at once
  else:
    assert num_params < total  # stacked layers: several tensors per param
    assert placed_after[0] < total  # the first params went out before the last tensor
  monkeypatch.undo()
  _, reference = hf.load_pretrained(folder, runtime=RuntimeConfig(scan_layers=scan))
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(reference), strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_a_tensor_in_two_shards_is_named(folder, tmp_path):
  keys = sorted(load_file(str(folder / "model.safetensors")))
  repeated = next(k for k in keys if "embed_tokens" in k)
  out = _sharded(
    folder, tmp_path / "twice", [("a.safetensors", keys), ("b.safetensors", [repeated])]
  )
  with pytest.raises(CheckpointError, match=rf"already read: \['{repeated} \(b.safetensors\)'\]"):
    hf.load_pretrained(out)
