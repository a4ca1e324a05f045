"""The KV-cache sampler: greedy parity with an uncached loop, HF-exact logit warping, stop tokens,
limits, reproducible keys, raw logprobs and one compilation per bucket."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from lmm_align import sampling, sharding
from lmm_align.models import Llava, get_variant, init_params
from lmm_align.models.llava import init_cache
from lmm_align.sampling import SamplingSettings, bucket_length, generate, warp_logits
from lmm_align.trainers.state import param_shardings

NEW = 8


@pytest.fixture(scope="module")
def setup():
  """Tiny model, its params, and three prompts: one with an image, two text-only of different
  lengths (so the batch is left-padded)."""
  config = get_variant("tiny")
  params = init_params(config, jax.random.key(0))
  rs = np.random.RandomState(0)
  image_prompt = (
    [1, 7] + [config.image_token_id] * config.num_image_tokens + rs.randint(5, 500, 5).tolist()
  )
  prompts = [
    image_prompt,
    [1] + rs.randint(5, 500, 9).tolist(),
    [1] + rs.randint(5, 500, 2).tolist(),
  ]
  pixels = rs.rand(1, 32, 32, 3).astype(np.float32)
  return config, params, prompts, pixels


@pytest.fixture(scope="module")
def greedy_out(setup):
  config, params, prompts, pixels = setup
  settings = SamplingSettings(temperature=0.0, max_new_tokens=NEW, stop_token_ids=())
  return generate(config, params, prompts, pixels, settings=settings, rng=None)


def _teacher_forced_logits(config, params, prompts, pixels, continuations):
  """float32[B, L, V] logits of prompt + continuation, right-padded, one uncached forward."""
  seqs = [list(p) + list(c) for p, c in zip(prompts, continuations)]
  length = max(map(len, seqs))
  ids = np.zeros((len(seqs), length), np.int32)
  mask = np.zeros_like(ids)
  for i, s in enumerate(seqs):
    ids[i, : len(s)], mask[i, : len(s)] = s, 1
  return (
    Llava(config)
    .apply({"params": params}, jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask))
    .logits
  )


def test_greedy_matches_uncached_loop(setup, greedy_out):
  """Token for token against re-running the full forward (no cache, right padding) each step."""
  config, params, prompts, pixels = setup
  model = Llava(config)
  length = max(map(len, prompts)) + NEW
  ids = np.zeros((len(prompts), length), np.int32)
  mask = np.zeros_like(ids)
  for i, p in enumerate(prompts):
    ids[i, : len(p)], mask[i, : len(p)] = p, 1
  forward = jax.jit(lambda ids, mask: model.apply({"params": params}, ids, pixels, mask).logits)
  ends = np.array([len(p) for p in prompts])
  expected = []
  for _ in range(NEW):
    logits = np.asarray(forward(ids, mask))
    token = logits[np.arange(len(prompts)), ends - 1].argmax(-1)
    ids[np.arange(len(prompts)), ends], mask[np.arange(len(prompts)), ends] = token, 1
    ends += 1
    expected.append(token)
  np.testing.assert_array_equal(greedy_out.tokens, np.stack(expected, 1))
  np.testing.assert_array_equal(greedy_out.lengths, [NEW] * 3)
  assert not greedy_out.stopped.any()


def test_logprobs_are_raw_model_logprobs(setup):
  """Sampled with temperature and top-k, the recorded logprobs are the temperature-1 model's."""
  config, params, prompts, pixels = setup
  settings = SamplingSettings(temperature=0.7, top_k=5, max_new_tokens=NEW, stop_token_ids=())
  out = generate(config, params, prompts, pixels, settings=settings, rng=jax.random.key(3))
  logits = _teacher_forced_logits(config, params, prompts, pixels, out.tokens)
  for i, p in enumerate(prompts):
    step_logits = logits[i, len(p) - 1 : len(p) - 1 + NEW]
    expected = jnp.take_along_axis(jax.nn.log_softmax(step_logits), out.tokens[i][:, None], -1)[
      :, 0
    ]
    np.testing.assert_allclose(out.logprobs[i], expected, atol=1e-4)
    top5 = np.argsort(-np.asarray(step_logits), -1)[:, :5]
    assert all(t in row for t, row in zip(out.tokens[i], top5)), "a token outside the top-k"


def test_sampling_reproducible_per_key(setup):
  config, params, prompts, pixels = setup
  settings = SamplingSettings(temperature=1.0, max_new_tokens=NEW, stop_token_ids=())
  run = lambda seed: generate(
    config, params, prompts, pixels, settings=settings, rng=jax.random.key(seed)
  )
  a, b, c = run(0), run(0), run(1)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.logprobs, b.logprobs)
  assert (a.tokens != c.tokens).any()


@pytest.mark.parametrize(
  "settings", [dict(temperature=1e-7), dict(temperature=1.0, top_k=1)], ids=["cold", "top_k_1"]
)
def test_degenerate_sampling_is_greedy(setup, greedy_out, settings):
  config, params, prompts, pixels = setup
  settings = SamplingSettings(max_new_tokens=NEW, stop_token_ids=(), **settings)
  out = generate(config, params, prompts, pixels, settings=settings, rng=jax.random.key(5))
  np.testing.assert_array_equal(out.tokens, greedy_out.tokens)
  np.testing.assert_allclose(out.logprobs, greedy_out.logprobs, atol=1e-5)


@pytest.mark.parametrize(
  "temperature,top_k,top_p",
  [(1.0, 0, 0.3), (1.0, 0, 0.9), (0.5, 0, 0.75), (1.0, 4, 1.0), (1.5, 6, 0.5), (1.0, 0, 1e-3)],
)
def test_warp_logits_matches_hf(temperature, top_k, top_p):
  """Same kept set (and values) as transformers' temperature -> TopK -> TopP warpers."""
  rs = np.random.RandomState(0)
  logits = np.stack(
    [rs.randn(50) * 2, rs.randn(50) * 0.3, np.linspace(-3, 3, 50), rs.randn(50) * 8]
  ).astype(np.float32)
  ours = np.asarray(warp_logits(jnp.asarray(logits), temperature, top_k, top_p))
  scores = torch.from_numpy(logits) / temperature
  if top_k:
    scores = TopKLogitsWarper(top_k)(None, scores)
  if top_p < 1.0:
    scores = TopPLogitsWarper(top_p)(None, scores)
  theirs = scores.numpy()
  np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))
  np.testing.assert_allclose(ours[~np.isinf(ours)], theirs[~np.isinf(theirs)], rtol=1e-6)
  assert (~np.isinf(ours)).sum(-1).min() >= 1


def test_top_p_keeps_smallest_nucleus():
  """A hand-computed case: probs .5 .3 .15 .05; p=.8 keeps the first two, p=.81 three."""
  logits = jnp.log(jnp.asarray([[0.15, 0.5, 0.05, 0.3]]))
  kept = lambda p: np.flatnonzero(np.isfinite(np.asarray(warp_logits(logits, top_p=p)))[0]).tolist()
  assert kept(0.79) == [1, 3]
  assert kept(0.81) == [0, 1, 3]
  assert kept(0.1) == [1]


def test_stop_tokens_end_rows_independently(setup, greedy_out):
  """Stop ids taken from the greedy run: each row ends at its first stop id, then emits pad."""
  config, params, prompts, pixels = setup
  stops = (int(greedy_out.tokens[0, 2]), int(greedy_out.tokens[1, 4]))
  settings = SamplingSettings(temperature=0.0, max_new_tokens=NEW, stop_token_ids=stops)
  out = generate(config, params, prompts, pixels, settings=settings, rng=None, pad_id=0)
  for i in range(3):
    hits = np.flatnonzero(np.isin(greedy_out.tokens[i], stops))
    length = hits[0] + 1 if len(hits) else NEW
    assert out.lengths[i] == length and out.stopped[i] == bool(len(hits))
    np.testing.assert_array_equal(out.tokens[i, :length], greedy_out.tokens[i, :length])
    assert (out.tokens[i, length:] == 0).all() and (out.logprobs[i, length:] == 0).all()
  assert out.lengths[0] <= 3 and out.stopped[:2].all()
  assert out.token_lists(strip_stop=True)[0] == greedy_out.tokens[0, : out.lengths[0] - 1].tolist()
  assert out.token_lists(strip_stop=False)[0] == greedy_out.tokens[0, : out.lengths[0]].tolist()
  # Per-row stop sets: only row 1 can stop.
  per_row = generate(
    config, params, prompts, pixels, settings=settings, rng=None, row_stop_token_ids=[(), stops, ()]
  )
  assert per_row.lengths[0] == NEW and per_row.lengths[1] == out.lengths[1]


def test_max_new_tokens_respected(setup, greedy_out):
  config, params, prompts, pixels = setup
  short = SamplingSettings(temperature=0.0, max_new_tokens=3, stop_token_ids=())
  out = generate(config, params, prompts, pixels, settings=short, rng=None)
  assert out.tokens.shape == (3, 3) and (out.lengths == 3).all()
  np.testing.assert_array_equal(out.tokens, greedy_out.tokens[:, :3])
  settings = SamplingSettings(temperature=0.0, max_new_tokens=NEW, stop_token_ids=())
  out = generate(
    config,
    params,
    prompts,
    pixels,
    settings=settings,
    rng=None,
    row_max_new_tokens=[2, NEW, 0],
    pad_id=0,
  )
  np.testing.assert_array_equal(out.lengths, [2, NEW, 0])
  assert not out.stopped.any()
  np.testing.assert_array_equal(out.tokens[0, :2], greedy_out.tokens[0, :2])
  assert (out.tokens[0, 2:] == 0).all() and (out.tokens[2] == 0).all()


def test_padded_array_input(setup, greedy_out):
  """A right-padded array + mask gives the same result as the ragged lists."""
  config, params, prompts, pixels = setup
  ids = np.zeros((3, 30), np.int32)
  mask = np.zeros_like(ids)
  for i, p in enumerate(prompts):
    ids[i, : len(p)], mask[i, : len(p)] = p, 1
  settings = SamplingSettings(temperature=0.0, max_new_tokens=NEW, stop_token_ids=())
  out = generate(config, params, ids, pixels, settings=settings, rng=None, attention_mask=mask)
  np.testing.assert_array_equal(out.tokens, greedy_out.tokens)


def test_image_token_check(setup):
  config, params, prompts, pixels = setup
  settings = SamplingSettings(temperature=0.0, max_new_tokens=2)
  with pytest.raises(ValueError, match="image placeholder"):
    generate(config, params, prompts, None, settings=settings, rng=None)


def test_bucket_length():
  assert [bucket_length(n) for n in (1, 16, 17, 64, 65)] == [16, 16, 32, 64, 128]
  assert bucket_length(20, buckets=(24, 48)) == 24
  with pytest.raises(ValueError):
    bucket_length(49, buckets=(24, 48))


def test_no_recompile_within_bucket(setup):
  """Prompts of lengths 3 and 11 share bucket 16: the second call reuses the compilation."""
  config, params, _, _ = setup
  settings = SamplingSettings(temperature=0.9, top_p=0.9, max_new_tokens=4)
  run = lambda prompts, seed: generate(
    config, params, prompts, settings=settings, rng=jax.random.key(seed)
  )
  run([[1, 5, 6], [1, 8]], 0)
  size = sampling.jit_decode._cache_size()
  run([[1] + list(range(10, 20)), [1, 9, 9, 9]], 1)
  run([[1, 2]] * 2, 2)
  assert sampling.jit_decode._cache_size() == size
  run([[1] * 17, [1]], 3)  # bucket 32: one new compilation
  assert sampling.jit_decode._cache_size() == size + 1


def test_scanned_decode_and_row_aligned_images(setup, greedy_out):
  """The scanned decode loop (unroll_layers=False) and [B, I, H, W, 3] images give the same tokens."""
  config, params, prompts, pixels = setup
  settings = SamplingSettings(temperature=0.0, max_new_tokens=NEW, stop_token_ids=())
  scanned = generate(
    config, params, prompts, pixels, settings=settings, rng=None, unroll_layers=False
  )
  np.testing.assert_array_equal(scanned.tokens, greedy_out.tokens)
  row_aligned = np.zeros((3, 1, *pixels.shape[1:]), np.float32)
  row_aligned[0, 0] = pixels[0]
  out = generate(config, params, prompts, row_aligned, settings=settings, rng=None)
  np.testing.assert_array_equal(out.tokens, greedy_out.tokens)


@pytest.mark.parametrize(
  "mesh_sizes", [(4, 1, 1), (2, 2, 1), (2, 1, 2)], ids=["data4", "data2_fsdp2", "data2_tensor2"]
)
def test_data_parallel_sampling_equals_one_device(setup, mesh_sizes):
  """Split over the mesh's data axis (3 rows topped up to whole groups with copies of the last,
  the image row's pixels made row-aligned, params sharded by the rules over fsdp / tensor),
  every row samples what it samples on one device: its draws depend only on its own key. Stop
  tokens end rows per group."""
  config, params, prompts, pixels = setup
  prompts = prompts[1:] + prompts[:1]  # the image row last: the top-up copies it
  mesh = sharding.make_mesh(mesh_sizes, jax.devices()[: np.prod(mesh_sizes)])
  settings = SamplingSettings(temperature=1.0, top_k=20, max_new_tokens=NEW)
  one_device = generate(config, params, prompts, pixels, settings=settings, rng=jax.random.key(7))
  # A stop id that some row emits early, so groups leave their loops at different steps.
  stop = int(one_device.tokens[1, 1])
  settings = dataclasses.replace(settings, stop_token_ids=(stop,))
  one_device = generate(config, params, prompts, pixels, settings=settings, rng=jax.random.key(7))
  assert one_device.stopped.any() and not one_device.stopped.all()
  with sharding.activation_sharding(mesh, sharding.DEFAULT_RULES):
    sharded = jax.device_put(params, param_shardings(Llava(config), mesh, sharding.DEFAULT_RULES))
    split = generate(
      config, sharded, prompts, pixels, settings=settings, rng=jax.random.key(7), mesh=mesh
    )
  for name in ("tokens", "lengths", "stopped"):
    np.testing.assert_array_equal(getattr(split, name), getattr(one_device, name), err_msg=name)
  np.testing.assert_allclose(split.logprobs, one_device.logprobs, atol=1e-5)


def test_row_keys_do_not_depend_on_batch_size():
  keys = jax.random.key_data(sampling.row_keys(jax.random.key(3), 5))
  np.testing.assert_array_equal(
    jax.random.key_data(sampling.row_keys(jax.random.key(3), 3)), keys[:3]
  )
  assert len({tuple(np.asarray(k).tolist()) for k in keys}) == 5


def test_model_sharded_sampling_equals_one_device(setup):
  """A 2x2x2 mesh (fsdp and tensor both 2): params sharded over fsdp x tensor, the KV cache over
  the kv heads, rows over data x fsdp (3 rows topped up to 4); greedy and sampled tokens and
  log-probs equal one device's."""
  config, params, prompts, pixels = setup
  prompts = prompts[1:] + prompts[:1]  # the image row last: the top-up copies it
  mesh = sharding.make_mesh((2, 2, 2))
  settings = SamplingSettings(temperature=1.0, top_k=20, max_new_tokens=NEW)
  one_device = generate(config, params, prompts, pixels, settings=settings, rng=jax.random.key(7))
  with sharding.activation_sharding(mesh, sharding.DEFAULT_RULES):
    shards = param_shardings(Llava(config), mesh, sharding.DEFAULT_RULES)
    sharded = jax.device_put(params, shards)
    split = generate(
      config, sharded, prompts, pixels, settings=settings, rng=jax.random.key(7), mesh=mesh
    )
    # The cache the loop carries: rows over data x fsdp, kv heads over tensor.
    cache = jax.jit(lambda: sampling.shard_cache(init_cache(config, 4, 8)))()
  for name in ("tokens", "lengths", "stopped"):
    np.testing.assert_array_equal(getattr(split, name), getattr(one_device, name), err_msg=name)
  np.testing.assert_allclose(split.logprobs, one_device.logprobs, atol=1e-5)
  embed = shards["language_model"]["embed_tokens"]["embedding"].spec
  assert set(embed) == {"fsdp", "tensor"}, embed  # the params are model-sharded
  for buffer in jax.tree.leaves((cache.key, cache.value)):
    spec = tuple(buffer.sharding.spec) + (None,) * buffer.ndim
    rows, kv_heads = buffer.ndim - 4, buffer.ndim - 3
    assert spec[rows] == ("data", "fsdp") and spec[kv_heads] == "tensor", buffer.sharding.spec


def test_data_parallel_text_only_rows(setup):
  """No images (pixel_values None) splits as well: 3 text rows over 2 groups."""
  config, params, prompts, _ = setup
  text_prompts = prompts[1:] + [[1, 9, 8, 7]]
  settings = SamplingSettings(temperature=0.0, max_new_tokens=4, stop_token_ids=())
  one_device = generate(config, params, text_prompts, None, settings=settings, rng=None)
  split = generate(
    config, params, text_prompts, None, settings=settings, rng=None,
    mesh=sharding.make_mesh((2, 1, 1), jax.devices()[:2]),
  )  # fmt: skip
  np.testing.assert_array_equal(split.tokens, one_device.tokens)
