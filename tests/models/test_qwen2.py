"""The Qwen2 decoder against transformers' `Qwen2ForCausalLM`: logits on a left-padded batch
(GQA, MQA, tied and untied, scan on and off), the export round trip, greedy generation with our
KV-cached sampler token for token, the published sizes, and bad folders."""

from __future__ import annotations

import json

import flax
import jax
import numpy as np
import pytest
import tiny_hf
import torch
import transformers
from jax.sharding import PartitionSpec
from safetensors.numpy import load_file, save_file

from lmm_align import hf
from lmm_align.hf import CheckpointError, name_map
from lmm_align.models import Llava, RuntimeConfig, get_variant, to_hf_config
from lmm_align.models.llava import dummy_inputs
from lmm_align.sampling import SamplingSettings, generate
from lmm_align.sharding import DEFAULT_RULES, logical_shardings, make_mesh


def _batch(seed: int = 0):
  """Three rows of different lengths, left-padded with 0; the last row a single token."""
  rng = np.random.default_rng(seed)
  rows = [[1, *rng.integers(5, 290, 13)], [1, *rng.integers(5, 290, 6)], [1]]
  t = max(map(len, rows))
  ids, mask = np.zeros((3, t), np.int64), np.zeros((3, t), np.int64)
  for i, row in enumerate(rows):
    ids[i, t - len(row) :], mask[i, t - len(row) :] = row, 1
  return ids, mask


def _hf_logits(model, ids, mask):
  positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)
  with torch.no_grad():
    return model(
      input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
      position_ids=torch.from_numpy(positions),
    ).logits.numpy()  # fmt: skip


def _our_logits(model, params, ids, mask):
  out = model.apply({"params": params}, ids.astype(np.int32), attention_mask=mask)
  return np.asarray(out.logits)


CASES = {
  "gqa_scan": dict(num_kv_heads=2, tie=False, scan=True),
  "gqa_unrolled": dict(num_kv_heads=2, tie=False, scan=False),
  "mqa_tied": dict(num_kv_heads=1, tie=True, scan=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
  kwargs = dict(CASES[case])
  scan = kwargs.pop("scan")
  ref = tiny_hf.save_tiny_qwen2(tmp_path, **kwargs)
  model, params = hf.load_pretrained(tmp_path, runtime=RuntimeConfig(scan_layers=scan))
  t = model.config.text
  assert (t.model_type, t.qkv_bias, t.rope_theta) == ("qwen2", True, 1_000_000.0)
  assert t.tie_word_embeddings == kwargs["tie"] and t.num_kv_heads == kwargs["num_kv_heads"]
  layer = params["language_model"]["layers" if scan else "layers_0"]
  assert "bias" in layer["k_proj"] and "bias" not in layer["o_proj"]
  ids, mask = _batch()
  valid = mask.astype(bool)
  np.testing.assert_allclose(
    _our_logits(model, params, ids, mask)[valid], _hf_logits(ref, ids, mask)[valid], atol=1e-4
  )


@pytest.fixture(scope="module")
def qwen2_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("qwen2")
  return folder, tiny_hf.save_tiny_qwen2(folder)


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
def test_export_round_trip(tmp_path, qwen2_folder, scan):
  folder, ref = qwen2_folder
  model, params = hf.load_pretrained(folder, runtime=RuntimeConfig(scan_layers=scan))
  hf.save_pretrained(model, params, tmp_path)
  written = json.loads((tmp_path / "config.json").read_text())
  assert written["model_type"] == "qwen2" and written["architectures"] == ["Qwen2ForCausalLM"]
  assert written["use_sliding_window"] is False and "attention_bias" not in written
  reloaded = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path).eval()
  ref_state, new_state = ref.state_dict(), reloaded.state_dict()
  assert set(ref_state) == set(new_state)
  for key in ref_state:
    np.testing.assert_array_equal(new_state[key].numpy(), ref_state[key].numpy(), err_msg=key)
  ids, mask = _batch(1)
  np.testing.assert_array_equal(_hf_logits(reloaded, ids, mask), _hf_logits(ref, ids, mask))
  _, params2 = hf.load_pretrained(tmp_path, runtime=RuntimeConfig(scan_layers=scan))
  jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_greedy_generation_matches_transformers(qwen2_folder):
  folder, ref = qwen2_folder
  model, params = hf.load_pretrained(folder)
  new = 12
  rng = np.random.RandomState(0)
  prompts = [[1, *rng.randint(3, 299, 9).tolist()], [1, *rng.randint(3, 299, 4).tolist()]]
  settings = SamplingSettings(temperature=0.0, max_new_tokens=new, stop_token_ids=())
  out = generate(model, params, prompts, None, settings=settings, rng=None)

  t = max(map(len, prompts))
  ids, mask = torch.zeros((2, t), dtype=torch.long), torch.zeros((2, t), dtype=torch.long)
  for i, p in enumerate(prompts):
    ids[i, t - len(p) :], mask[i, t - len(p) :] = torch.tensor(p), 1
  with torch.no_grad():
    want = ref.generate(
      input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
      min_new_tokens=new, pad_token_id=0, return_dict_in_generate=True, output_logits=True,
    )  # fmt: skip
  np.testing.assert_array_equal(out.tokens, want.sequences[:, t:].numpy())
  logprobs = torch.stack(want.logits, 1).log_softmax(-1)
  logprobs = logprobs.gather(-1, torch.tensor(out.tokens).long()[..., None])[..., 0]
  np.testing.assert_allclose(out.logprobs, logprobs.numpy(), atol=1e-4)


@pytest.mark.parametrize("name", ["qwen2-0.5b", "qwen2-7b", "qwen2-72b"])
def test_published_sizes_match_transformers_modules(name):
  """Every tensor of the variant, by the name map, has the shape transformers' Qwen2ForCausalLM
  (built from our exported config.json on the meta device) gives it; no weights are made."""
  config = get_variant(name)
  abstract = jax.eval_shape(Llava(config).init, jax.random.key(0), *dummy_inputs(config))
  ours = flax.traverse_util.flatten_dict(flax.linen.unbox(abstract["params"]))
  hf_config = transformers.Qwen2Config(**to_hf_config(config))
  with torch.device("meta"):
    ref = transformers.Qwen2ForCausalLM(hf_config)
  want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  if config.text.tie_word_embeddings:
    del want["lm_head.weight"]  # the same tensor as embed_tokens
  mapped = {}
  for rule in name_map.rules_for(config):
    for layer in range(config.text.num_layers) if rule.layered else [None]:
      path, index = name_map.our_path(rule.ours, layer, scan=True)
      shape = ours[path].shape[1:] if index is not None else ours[path].shape
      key = rule.hf.replace("{i}", str(layer)) if layer is not None else rule.hf
      mapped[name_map.export_key(key, text_only=True)] = name_map.hf_shape(rule.transform, shape)
  assert mapped == want
  num_params = sum(int(np.prod(v.shape)) for v in ours.values())
  assert num_params == sum(p.numel() for p in ref.parameters())
  # The Qwen2 report's sizes: 0.49B, 7.62B, 72.7B.
  assert round(num_params / 1e9, 2 if name != "qwen2-72b" else 1) == {
    "qwen2-0.5b": 0.49, "qwen2-7b": 7.62, "qwen2-72b": 72.7
  }[name]  # fmt: skip


def test_bad_folders_are_named(tmp_path, qwen2_folder):
  folder, _ = qwen2_folder
  config = json.loads((folder / "config.json").read_text())
  tensors = load_file(str(folder / "model.safetensors"))

  def write(name, cfg, weights):
    out = tmp_path / name
    out.mkdir()
    (out / "config.json").write_text(json.dumps(cfg))
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out

  with pytest.raises(CheckpointError, match=r"mistral/config\.json.*model_type 'mistral'"):
    hf.load_pretrained(write("mistral", dict(config, model_type="mistral"), tensors))
  sliding = dict(config, use_sliding_window=True, sliding_window=8)
  with pytest.raises(CheckpointError, match=r"sliding/config\.json.*use_sliding_window"):
    hf.load_pretrained(write("sliding", sliding, tensors))
  no_field = {k: v for k, v in config.items() if k != "num_attention_heads"}
  with pytest.raises(
    CheckpointError, match=r"no_field/config\.json: no field 'num_attention_heads'"
  ):
    hf.load_pretrained(write("no_field", no_field, tensors))
  key = "model.layers.1.self_attn.v_proj.bias"
  missing = {k: v for k, v in tensors.items() if k != key}
  with pytest.raises(
    CheckpointError, match=r"missing 1 tensor.*language_model/layers/v_proj/bias\[layer 1\]"
  ):
    hf.load_pretrained(write("missing", config, missing))
  bad = dict(tensors, **{key: np.zeros(33, np.float32)})
  with pytest.raises(CheckpointError, match=r"mis-shaped.*v_proj\.bias.*\(33,\), expected \(32,\)"):
    hf.load_pretrained(write("shape", config, bad))
  # A LLaMA folder carrying Qwen2's biases: the biases are tensors LLaMA has no place for.
  with pytest.raises(CheckpointError, match=r"unexpected 6 tensor.*q_proj\.bias"):
    hf.load_pretrained(write("llama", dict(config, model_type="llama"), tensors))


def test_72b_shards_on_a_fsdp_tensor_mesh():
  """Qwen2-72B initialised abstractly on the fake 8-device mesh: every param has a sharding,
  the q/k/v biases split their heads over `tensor` like their kernels, and each device's share
  of the weights is an eighth."""
  config = get_variant("qwen2-72b", param_dtype="bfloat16")
  boxed = jax.eval_shape(Llava(config).init, jax.random.key(0), *dummy_inputs(config))
  mesh = make_mesh((1, 2, 4))
  shardings = logical_shardings(boxed["params"], mesh, DEFAULT_RULES)
  layer = shardings["language_model"]["layers"]
  assert layer["q_proj"]["bias"].spec == PartitionSpec(None, "tensor", None)
  assert layer["k_proj"]["kernel"].spec == PartitionSpec(None, "fsdp", "tensor", None)
  shapes = flax.traverse_util.flatten_dict(flax.linen.unbox(boxed["params"]))
  flat = flax.traverse_util.flatten_dict(shardings)
  total = sum(int(np.prod(s.shape)) for s in shapes.values())
  per_device = sum(int(np.prod(flat[p].shard_shape(s.shape))) for p, s in shapes.items())
  assert per_device < total / 8 * 1.001
