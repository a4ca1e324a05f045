"""Model unit tests on the tiny variant: image slots, scan / remat equivalence, cache, dtypes."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmm_align.models import Llava, get_variant, init_cache, init_params
from lmm_align.models.llava import dummy_inputs


@pytest.fixture(scope="module")
def tiny():
  config = get_variant("tiny")
  return config, init_params(config, jax.random.key(0))


def _ids(config, rows_with_image, t=24, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, config.text.vocab_size, size=(len(rows_with_image), t)).astype(np.int32)
  for row, has_image in enumerate(rows_with_image):
    if has_image:
      ids[row, 2 : 2 + config.num_image_tokens] = config.image_token_id
  return ids


def test_row_aligned_image_slots_equal_flat_images(tiny):
  config, params = tiny
  model = Llava(config)
  ids = _ids(config, [True, False, True])
  pixels = np.random.default_rng(1).normal(size=(3, 32, 32, 3)).astype(np.float32)
  flat = model.apply({"params": params}, ids, pixel_values=pixels[[0, 2]])
  aligned = model.apply({"params": params}, ids, pixel_values=pixels[:, None])
  np.testing.assert_allclose(aligned.logits, flat.logits, atol=1e-6)
  broken = ids.copy()
  broken[0, 2] = 7  # 15 placeholders in row 0
  with pytest.raises(ValueError, match=r"per row \[15, 0, 16\] must be a multiple of 16"):
    model.apply({"params": params}, broken, pixel_values=pixels[:, None])


def _unstack(params, num_layers):
  """Scanned params -> the unrolled layout (layers_i)."""
  flat = flax.traverse_util.flatten_dict(params)
  out = {}
  for path, value in flat.items():
    if "layers" in path:
      k = path.index("layers")
      for i in range(num_layers):
        out[path[:k] + (f"layers_{i}",) + path[k + 1 :]] = value[i]
    else:
      out[path] = value
  return flax.traverse_util.unflatten_dict(out)


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scan_and_remat_give_the_same_loss_and_grads(tiny, remat):
  config, params = tiny
  ids = _ids(config, [True, False])
  pixels = np.zeros((2, 1, 32, 32, 3), np.float32)

  def loss(p, cfg):
    logits = Llava(cfg).apply({"params": p}, ids, pixel_values=pixels).logits
    return jnp.mean(
      jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0]
    )

  value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  ref_loss, ref_grads = value_and_grad(params, config)
  unrolled = config.with_runtime(scan_layers=False, remat_policy=remat)
  got_loss, got_grads = value_and_grad(_unstack(params, config.text.num_layers), unrolled)
  np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), _unstack(ref_grads, 2), got_grads
  )
  scanned = config.with_runtime(remat_policy=remat)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
    ref_grads,
    jax.grad(loss)(params, scanned),
  )


def test_chunked_decoding_with_cache_equals_full_forward(tiny):
  config, params = tiny
  apply = jax.jit(Llava(config).apply)
  ids = _ids(config, [True, True], t=30)
  mask = np.ones_like(ids)
  mask[1, :5] = 0  # left padding
  pixels = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype(np.float32)
  ids[1, :5] = 0
  ids[1, 2 : 2 + 16] = 7
  ids[1, 6 : 6 + 16] = config.image_token_id
  full = apply({"params": params}, ids, pixel_values=pixels, attention_mask=mask).logits
  cache = init_cache(config, 2, 40)
  out = apply(
    {"params": params}, ids[:, :22], pixel_values=pixels, attention_mask=mask[:, :22], cache=cache
  )
  assert config.runtime.scan_layers and out.cache.stacked
  # The sampler's form: prefill scanned, then decode unrolled over one buffer per layer.
  unrolled = config.with_runtime(scan_layers=False)
  apply_unrolled = jax.jit(Llava(unrolled).apply)
  unrolled_params = _unstack(params, config.text.num_layers)
  with pytest.raises(ValueError, match="per-layer KVCache"):
    apply_unrolled({"params": unrolled_params}, ids[:, 22:26], cache=out.cache)
  for scanned in (True, False):
    step_cache = out.cache if scanned else out.cache.unstacked()
    chunks = [out.logits]
    for start in range(22, 30, 4):
      chunk = ids[:, start : start + 4]
      if scanned:
        step = apply({"params": params}, chunk, cache=step_cache)
      else:
        step = apply_unrolled({"params": unrolled_params}, chunk, cache=step_cache)
      step_cache = step.cache
      chunks.append(step.logits)
    got = np.concatenate(chunks, axis=1)
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], np.asarray(full)[valid], atol=2e-5)
    assert int(step_cache.index) == 30 and step_cache.stacked == scanned


def test_bfloat16_params_and_compute(tiny):
  config, params = tiny
  bf16 = config.with_runtime(dtype="bfloat16", param_dtype="bfloat16")
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  ids = _ids(config, [True])
  out = Llava(bf16).apply({"params": p16}, ids, pixel_values=np.zeros((1, 32, 32, 3), np.float32))
  ref = Llava(config).apply(
    {"params": params}, ids, pixel_values=np.zeros((1, 32, 32, 3), np.float32)
  )
  assert out.logits.dtype == jnp.float32 and out.hidden_states.dtype == jnp.bfloat16
  assert float(jnp.max(jnp.abs(out.logits - ref.logits))) < 0.1
  assert {x.dtype for x in jax.tree.leaves(init_params(bf16, jax.random.key(0)))} == {
    jnp.dtype(jnp.bfloat16)
  }


def test_every_param_has_logical_axis_names():
  config = get_variant("tiny")
  boxed = jax.eval_shape(Llava(config).init, jax.random.key(0), *dummy_inputs(config))
  specs = flax.traverse_util.flatten_dict(flax.linen.get_partition_spec(boxed)["params"])
  shapes = flax.traverse_util.flatten_dict(flax.linen.unbox(boxed)["params"])
  assert specs.keys() == shapes.keys()
  for path, spec in specs.items():
    assert len(spec) == len(shapes[path].shape), path
    assert any(name is not None for name in spec) or shapes[path].ndim == 0, path
