"""The iterative loop's models loaded and run model-sharded (issue #23): a tiny random LLaVA
folder loaded onto the fake 8-device CPU mesh takes the shardings the logical rules give, holds
the values of a one-device load, and labels, samples and judges as one device does."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

from configs.shapes import iterative_dpo as shapes_iterative_dpo
from lmm_align import hf, inference, sampling, sharding
from lmm_align.data import conversation
from lmm_align.data.images import ImageProcessorConfig
from lmm_align.data.tokenizer import train_bpe_tokenizer
from lmm_align.judges.base import JudgeRequest
from lmm_align.models import Llava, get_variant, init_params
from lmm_align.trainers import iterative
from lmm_align.trainers.state import param_shardings

TEMPLATE = "vicuna_v1"
QUESTIONS = ["Is there a red circle?", "Is the square blue?", "Is there a cat?", "Is it round?"]
VOCAB = 320
MESH_SIZES = (1, 4, 2)  # fsdp 4 x tensor 2: the model-sharded paths


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """A tiny random LLaVA exported as an HF folder: weights, a BPE tokenizer in which
  " yes" / " Yes" / " no" / " No" are single tokens, preprocessor_config.json."""
  tmpl = conversation.get_template(TEMPLATE)
  answers = [f"USER: Is it? ASSISTANT: {w}" for w in [" yes", " Yes", " no", " No"] * 30]
  tokenizer = train_bpe_tokenizer([tmpl.system, *QUESTIONS, *answers], VOCAB)
  # The vocabulary the tokenizer's (320): every id the model can emit decodes to text.
  tiny = get_variant("tiny")
  config = dataclasses.replace(tiny, text=dataclasses.replace(tiny.text, vocab_size=VOCAB))
  assert len(tokenizer) == VOCAB
  out = tmp_path_factory.mktemp("sharded_loop") / "llava"
  hf.save_pretrained(
    Llava(config), init_params(config, jax.random.key(3)), out, tokenizer=tokenizer
  )
  processor = ImageProcessorConfig(size=32, crop_size=32).to_hf_dict()
  (out / "preprocessor_config.json").write_text(json.dumps(processor))
  return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  """Two random pictures (PIL) and their PNG paths."""
  root = tmp_path_factory.mktemp("sharded_loop_images")
  rs = np.random.RandomState(0)
  pictures = [Image.fromarray(rs.randint(0, 255, (40, 32, 3), np.uint8)) for _ in range(2)]
  paths = []
  for i, picture in enumerate(pictures):
    picture.save(root / f"{i}.png")
    paths.append(root / f"{i}.png")
  return pictures, paths


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh(MESH_SIZES)


@pytest.fixture(scope="module")
def one_device(folder):
  return inference.load_model_folder(str(folder), template=TEMPLATE)


@pytest.fixture(scope="module")
def sharded(folder, mesh):
  return inference.load_model_folder(str(folder), template=TEMPLATE, mesh=mesh)


def loop_config(sizes=MESH_SIZES, dtype="float32"):
  """The loop's config with its models on a mesh of the 8 fake devices."""
  config = shapes_iterative_dpo.get_config("runlocal")
  config.data.template = TEMPLATE
  config.inference.dtype = dtype
  config.mesh.sizes, config.mesh.num_devices = sizes, 0
  f = config.feedback
  f.yes_words, f.no_words, f.question_suffix, f.batch_size = ("yes", "Yes"), ("no", "No"), "", 4
  return config


def _flat(tree):
  return {jax.tree_util.keystr(path): x for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_each_param_goes_to_the_shards_the_rules_give(sharded, mesh):
  expected = _flat(param_shardings(sharded.model, mesh, sharding.DEFAULT_RULES))
  params = _flat(sharded.params)
  assert params.keys() == expected.keys()
  for path, x in params.items():
    assert isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh, path
    assert x.sharding.spec == expected[path].spec, path
  lm = sharded.params["language_model"]
  # The embedding [V, D]: vocab over tensor, the model dimension over fsdp; each device holds
  # an eighth of it, never the whole table.
  embedding = lm["embed_tokens"]["embedding"]
  assert embedding.sharding.spec == PartitionSpec("tensor", "fsdp")
  assert embedding.shape == (VOCAB, 64)
  assert {s.data.shape for s in embedding.addressable_shards} == {(VOCAB // 2, 16)}
  # A scanned MLP kernel [layers, D, F]: D over fsdp, F over tensor.
  gate = lm["layers"]["gate_proj"]["kernel"]
  assert gate.sharding.spec == PartitionSpec(None, "fsdp", "tensor")
  assert {s.data.shape for s in gate.addressable_shards} == {(2, 16, 64)}
  assert sharded.mesh is mesh


def test_sharded_values_equal_the_one_device_load(sharded, one_device):
  assert one_device.mesh is None
  single, split = _flat(one_device.params), _flat(sharded.params)
  assert single.keys() == split.keys()
  for path, x in single.items():
    assert len(x.sharding.device_set) == 1, path
    np.testing.assert_array_equal(np.asarray(split[path]), np.asarray(x), err_msg=path)


def test_bfloat16_load_is_the_float32_values_rounded(folder, mesh, one_device):
  loaded = inference.load_model_folder(str(folder), template=TEMPLATE, dtype="bfloat16", mesh=mesh)
  assert loaded.model.config.runtime.dtype == "bfloat16"
  single = _flat(one_device.params)
  for path, x in _flat(loaded.params).items():
    assert x.dtype == jax.numpy.bfloat16, path
    expected = np.asarray(single[path]).astype(jax.numpy.bfloat16)
    np.testing.assert_array_equal(np.asarray(x), expected, err_msg=path)


@pytest.mark.parametrize("sizes", [MESH_SIZES, (2, 2, 2)], ids=["1x4x2", "2x2x2"])
def test_the_loop_labeler_scores_on_sharded_params_as_on_one_device(
  folder, one_device, images, sizes
):
  config = loop_config(sizes)
  labeler_model = iterative.loop_model(config, str(folder))
  assert dict(labeler_model.mesh.shape) == dict(zip(sharding.MESH_AXES, sizes))
  labeler = iterative.yes_no_labeler(config, labeler_model)
  assert labeler.mesh is labeler_model.mesh
  pictures = images[0]
  asked = [pictures[0], pictures[1], None, pictures[0], pictures[1]]
  questions = [*QUESTIONS, QUESTIONS[0]]  # 5 questions: a second, short batch of 4 rows
  scores = labeler.score(questions, asked)
  reference = iterative.yes_no_labeler(config, one_device).score(questions, asked)
  np.testing.assert_allclose(scores.p_yes, reference.p_yes, rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(scores.p_no, reference.p_no, rtol=1e-5, atol=1e-9)
  np.testing.assert_array_equal(scores.rejected, reference.rejected)
  assert not np.allclose(scores.p_yes[0], scores.p_yes[1])  # the questions are told apart


def test_greedy_sampling_on_sharded_params_equals_one_device(sharded, one_device, mesh):
  config = sharded.model.config
  rs = np.random.default_rng(1)
  prompts = [rs.integers(5, 300, size=n).tolist() for n in (7, 12, 3)]
  settings = sampling.SamplingSettings(temperature=0.0, max_new_tokens=8, stop_token_ids=())
  single = sampling.generate(config, one_device.params, prompts, settings=settings, rng=None)
  with sharding.activation_sharding(mesh, sharding.DEFAULT_RULES):
    split = sampling.generate(
      config, sharded.params, prompts, settings=settings, rng=None, mesh=mesh
    )
  np.testing.assert_array_equal(split.tokens, single.tokens)
  np.testing.assert_array_equal(split.lengths, [8, 8, 8])
  np.testing.assert_allclose(split.logprobs, single.logprobs, rtol=1e-5, atol=1e-5)


def test_the_loop_samples_candidates_with_the_sharded_policy(folder, one_device, images, tmp_path):
  config = loop_config()
  config.sampling.temperature, config.sampling.max_new_tokens = 0.0, 6
  policy = iterative.loop_model(config, str(folder))
  assert policy.mesh is not None
  prompts_dir = tmp_path / "prompts"
  prompts_dir.mkdir()
  records = [
    {"id": "a", "question": QUESTIONS[0], "image": str(images[1][0])},
    {"id": "b", "question": QUESTIONS[1], "image": None},
  ]
  (prompts_dir / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  out = {}
  for name, model in (("sharded", policy), ("one_device", one_device)):
    (tmp_path / name).mkdir()
    out[name] = iterative.sample_candidates(config, 1, model, prompts_dir, tmp_path / name)
  assert len(out["sharded"]) == 2 * config.sampling.num_samples
  strip = lambda rs: [(r["id"], r["response"], r["num_tokens"], r["stopped"]) for r in rs]
  assert strip(out["sharded"]) == strip(out["one_device"])
  assert any(r["num_tokens"] > 0 for r in out["sharded"])


def test_the_critic_judges_on_sharded_params_as_on_one_device(folder, images):
  config = loop_config()
  config.feedback.critic, config.feedback.critic_max_tokens = str(folder), 6
  judge = iterative.critic_judge(config)
  assert judge.mesh is not None
  requests = [
    JudgeRequest(QUESTIONS[0], image=str(images[1][0]), max_tokens=6),
    JudgeRequest(QUESTIONS[2], max_tokens=4),
  ]
  one_device = loop_config((1, 1, 1))
  one_device.mesh.num_devices = 1
  one_device.feedback.critic, one_device.feedback.critic_max_tokens = str(folder), 6
  reference = iterative.critic_judge(one_device)
  assert reference.mesh is None
  replies, expected = judge.complete(requests), reference.complete(requests)
  assert all(r.ok for r in replies)
  assert all(r.text for r in replies)  # a few words each, not an empty reply
  assert [r.text for r in replies] == [r.text for r in expected]


def test_the_models_config_is_checked_naming_the_field(monkeypatch):
  config = loop_config()
  iterative.check_models_config(config)
  config.inference.dtype = "bf16"
  with pytest.raises(ValueError, match=r"inference\.dtype='bf16': use one of"):
    iterative.check_models_config(config)
  config = loop_config((3, 1, 1))
  with pytest.raises(ValueError, match=r"mesh\.sizes=\(3, 1, 1\)"):
    iterative.check_models_config(config)
  config = loop_config((2, 2, 2))
  config.feedback.batch_size = 6
  with pytest.raises(ValueError, match=r"feedback\.batch_size=6 must be a multiple .* 4"):
    iterative.check_models_config(config)
  config.feedback.kind = "critic"  # the critic's sampler tops its rows up itself
  iterative.check_models_config(config)
  config = loop_config()
  config.mesh.num_devices = 16
  with pytest.raises(ValueError, match=r"mesh\.num_devices=16"):
    iterative.check_models_config(config)
  # A multi-process run samples and labels on a mesh over its hosts too
  # (test_multiprocess_sampling.py): its mesh is checked as one process's.
  config = loop_config()
  with monkeypatch.context() as patch:
    patch.setattr(jax, "process_count", lambda: 2)
    iterative.check_models_config(config)
    config.feedback.batch_size = 6
    with pytest.raises(ValueError, match=r"feedback\.batch_size=6 .* data x fsdp size 4"):
      iterative.check_models_config(config)
  # The loop checks them before it loads anything.
  config = loop_config()
  config.init_from, config.inference.dtype = "/nonexistent", "int8"
  with pytest.raises(ValueError, match=r"inference\.dtype='int8'"):
    iterative.check_config(config)


def test_the_recipes_shard_their_models_in_bfloat16():
  from configs.llava_critic import iterative_dpo as critic_loop
  from configs.rlaifv import iterative as rlaifv_loop

  # The LLaVA-Critic loop's 72B critic takes tensor = 4 (its 8 KV heads; see its plan).
  recipes = (
    (rlaifv_loop.get_config(), (1, -1, 2)),
    (critic_loop.get_config("model=72b"), (1, -1, 4)),
  )
  for config, mesh in recipes:
    assert config.inference.dtype == "bfloat16"
    assert tuple(config.mesh.sizes) == tuple(config.train.mesh.sizes) == mesh
    assert config.mesh.num_devices == 0
    iterative.check_models_config(config)  # (1, 4, 2) on the 8 fake devices
  assert shapes_iterative_dpo.get_config().inference.dtype == "float32"
  assert rlaifv_loop.get_config("runlocal").mesh.num_devices == 1
