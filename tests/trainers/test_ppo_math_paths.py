"""PPO's advantage path in both configurations (LLaVA-RLHF's quirks, textbook) against numpy."""

from __future__ import annotations

import ml_collections
import numpy as np

from configs.llava_rlhf import ppo as llava_rlhf_ppo
from configs.shapes import ppo as shapes_ppo
from lmm_align.trainers.ppo import advantages_and_returns


def _rollout(seed=0, b=3, n=6):
  rng = np.random.default_rng(seed)
  lengths = np.array([6, 3, 1])[:b]
  mask = (np.arange(n)[None] < lengths[:, None]).astype(np.float32)
  old = rng.normal(-2, 0.5, (b, n)).astype(np.float32) * mask
  ref = rng.normal(-2, 0.5, (b, n)).astype(np.float32) * mask
  values = rng.normal(0, 1, (b, n)).astype(np.float32)
  scores = rng.normal(0, 2, (b,)).astype(np.float32)
  return old, ref, values, scores, mask


def _numpy_gae(shaped, values, last, gamma, lam):
  """GAE by its definition, token by token, each row ending at its last response token."""
  adv = np.zeros(shaped.shape)
  for i in range(shaped.shape[0]):
    running = 0.0
    for t in reversed(range(last[i] + 1)):
      next_v = values[i, t + 1] if t < last[i] else 0.0
      running = shaped[i, t] + gamma * next_v - values[i, t] + gamma * lam * running
      adv[i, t] = running
  return adv


def test_llava_rlhf_quirks_match_a_numpy_transcription():
  ppo = llava_rlhf_ppo.get_config().ppo
  old, ref, values, scores, mask = _rollout()
  out = advantages_and_returns(old, ref, values, scores, mask, ppo)
  # Transcribed from the published ppo_trainer: clamp(k1, 0), score on the last column,
  # x10, GAE(1, 1) over every column, whiten over everything with the biased std.
  shaped = -0.1 * np.maximum(old - ref, 0) * mask
  shaped[:, -1] += scores
  shaped *= 10.0
  adv = np.cumsum(shaped[:, ::-1], axis=1)[:, ::-1] - values
  returns = adv + values
  whitened = (adv - adv.mean()) / np.sqrt(adv.var() + 1e-8)
  np.testing.assert_allclose(out["returns"], returns, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["advantages"], whitened, rtol=1e-4, atol=1e-4)


def test_textbook_path_scores_at_eos_and_discounts_within_the_response():
  ppo: ml_collections.ConfigDict = shapes_ppo.ppo_config()
  old, ref, values, scores, mask = _rollout(1)
  out = advantages_and_returns(old, ref, values, scores, mask, ppo)
  b, n = mask.shape
  shaped = -ppo.kl_coef * (old - ref) * mask
  last = mask.sum(1).astype(int) - 1
  shaped[np.arange(b), last] += scores
  adv = _numpy_gae(shaped, values, last, ppo.gamma, ppo.lam)
  returns = (adv + values) * mask
  real = adv[mask > 0]
  whitened = (adv - real.mean()) / np.sqrt(real.var(ddof=1) + 1e-8)
  np.testing.assert_allclose(out["returns"], returns, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    np.where(mask > 0, out["advantages"], 0), np.where(mask > 0, whitened, 0), rtol=1e-4, atol=1e-4
  )
  np.testing.assert_allclose(out["kl_per_sequence"], ((old - ref) * mask).sum(1), rtol=1e-5)


def test_dense_segment_rewards_enter_gae_where_they_were_earned():
  """ppo.dense_reward=segments: increments inside the response join the KL penalty and the
  end score in the per-token rewards, r_t = -beta * kl_t + dense_t + [t = last] * score."""
  ppo: ml_collections.ConfigDict = shapes_ppo.ppo_config(lam=0.9)
  old, ref, values, scores, mask = _rollout(2)
  b, n = mask.shape
  dense = np.zeros((b, n), np.float32)
  dense[0, [1, 4]] = [0.5, -1.0]
  dense[1, 0] = 2.0
  dense[2, 3] = 7.0  # past row 2's single token: masked out
  out = advantages_and_returns(old, ref, values, scores, mask, ppo, dense)
  shaped = -ppo.kl_coef * (old - ref) * mask + dense * mask
  last = mask.sum(1).astype(int) - 1
  shaped[np.arange(b), last] += scores
  adv = _numpy_gae(shaped, values, last, ppo.gamma, ppo.lam)
  np.testing.assert_allclose(out["returns"], (adv + values) * mask, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["shaped_reward_sum"], shaped.sum(1), rtol=1e-5, atol=1e-5)
  sparse = advantages_and_returns(old, ref, values, scores, mask, ppo)
  assert not np.allclose(sparse["returns"], out["returns"])


def test_response_logps_are_taken_under_the_sampling_temperature():
  """log softmax(logits / T) at each response token, against numpy; T = 1 is the plain one."""
  import jax
  import jax.numpy as jnp

  from lmm_align.models.llava import Llava, dummy_inputs
  from lmm_align.models.variants import get_variant
  from lmm_align.trainers.ppo import response_logps

  model = Llava(get_variant("tiny"))
  ids, pixels = dummy_inputs(model.config, batch=2)
  n = 3
  ids = ids.at[:, -n:].set(jnp.array([[5, 6, 7], [8, 9, 10]]))
  variables = model.init(jax.random.key(0), ids, pixel_values=pixels)
  mask = np.array([[1, 1, 1], [1, 1, 0]], np.int32)
  batch = {
    "input_ids": ids,
    "pixel_values": pixels,
    "attention_mask": jnp.ones_like(ids),
    "response_mask": mask,
  }
  logits = np.asarray(model.apply(variables, ids, pixel_values=pixels).logits, np.float64)
  for temperature in (1.0, 0.7):
    scaled = logits[:, -n - 1 : -1] / temperature
    logp = scaled - np.log(np.exp(scaled - scaled.max(-1, keepdims=True)).sum(-1, keepdims=True))
    logp -= scaled.max(-1, keepdims=True)
    expected = np.take_along_axis(logp, np.asarray(ids[:, -n:])[..., None], -1)[..., 0] * mask
    got = response_logps(model, variables, batch, temperature)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4)
