"""PPO arithmetic against hand loops in numpy (per row, per time step)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmm_align.rl import ppo_math

LENGTHS = [5, 2, 7, 1]  # right padding in a T = 7 batch
T = 7


def _mask(lengths=LENGTHS, t=T):
  mask = np.zeros((len(lengths), t), bool)
  for b, n in enumerate(lengths):
    mask[b, :n] = True
  return mask


# --- KL estimators -------------------------------------------------------------------------


def test_kl_estimators_by_hand():
  logp = [-0.5, -2.0, -1.0, -3.0]
  ref = [-1.0, -1.5, -1.0, -0.1]
  expected = {"k1": [], "k1_clamped": [], "k2": [], "k3": []}
  for a, r in zip(logp, ref):
    expected["k1"].append(a - r)
    expected["k1_clamped"].append(max(a - r, 0.0))
    expected["k2"].append(0.5 * (a - r) ** 2)
    expected["k3"].append(math.exp(r - a) - 1 - (r - a))
  assert set(ppo_math.KL_ESTIMATORS) == set(expected)
  for name, fn in ppo_math.KL_ESTIMATORS.items():
    got = fn(jnp.array(logp), jnp.array(ref))
    np.testing.assert_allclose(np.asarray(got), expected[name], rtol=1e-6, atol=1e-7)
  assert np.all(np.asarray(ppo_math.kl_k3(jnp.array(logp), jnp.array(ref))) >= 0)


# --- token rewards -------------------------------------------------------------------------


@pytest.mark.parametrize("score_position", ["eos", "last_column"])
@pytest.mark.parametrize("reward_scale", [1.0, 10.0])
def test_token_rewards_against_loop(score_position, reward_scale):
  rng = np.random.default_rng(0)
  mask = _mask()
  kl = rng.normal(size=mask.shape).astype(np.float32)
  score = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
  kl_coef = 0.1
  expected = np.zeros(mask.shape)
  for b in range(mask.shape[0]):
    for t in range(T):
      if mask[b, t]:
        expected[b, t] -= kl_coef * kl[b, t]
    position = LENGTHS[b] - 1 if score_position == "eos" else T - 1
    expected[b, position] += score[b]
  expected *= reward_scale
  got = ppo_math.token_rewards(
    jnp.asarray(score), jnp.asarray(kl), jnp.asarray(mask), kl_coef, score_position, reward_scale
  )
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-6)


def test_token_rewards_empty_row_drops_score_and_bad_position_raises():
  mask = jnp.array([[False, False, False]])
  got = ppo_math.token_rewards(jnp.array([5.0]), jnp.ones((1, 3)), mask, 0.1)
  np.testing.assert_array_equal(np.asarray(got), 0.0)
  with pytest.raises(ValueError):
    ppo_math.token_rewards(jnp.array([5.0]), jnp.ones((1, 3)), mask, 0.1, "first")


def test_adaptive_kl_coef_by_hand():
  # Ziegler et al.: beta * (1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon).
  assert ppo_math.adaptive_kl_coef(0.1, 7.5, 6.0, 10000, 64) == pytest.approx(
    0.1 * (1 + 0.2 * 64 / 10000)
  )  # 1.25 - 1 = 0.25, clipped to 0.2
  assert ppo_math.adaptive_kl_coef(0.1, 6.6, 6.0, 100, 50) == pytest.approx(0.1 * 1.05)
  assert ppo_math.adaptive_kl_coef(0.1, 5.4, 6.0, 100, 50) == pytest.approx(0.1 * 0.95)
  assert ppo_math.adaptive_kl_coef(0.2, 0.0, 6.0, 64, 64) == pytest.approx(0.2 * 0.8)
  assert ppo_math.adaptive_kl_coef(0.2, 6.0, 6.0, 64, 64) == pytest.approx(0.2)
  for target, horizon in ((0.0, 100), (6.0, 0)):
    with pytest.raises(ValueError, match="positive"):
      ppo_math.adaptive_kl_coef(0.1, 1.0, target, horizon, 8)


# --- GAE -----------------------------------------------------------------------------------


def _np_gae(rewards, values, lengths, gamma, lam):
  adv = np.zeros_like(rewards, dtype=np.float64)
  for b, n in enumerate(lengths):
    last = 0.0
    for t in reversed(range(n)):
      next_value = values[b, t + 1] if t + 1 < n else 0.0
      delta = rewards[b, t] + gamma * next_value - values[b, t]
      last = delta + gamma * lam * last
      adv[b, t] = last
  returns = np.zeros_like(adv)
  for b, n in enumerate(lengths):
    for t in range(n):
      returns[b, t] = adv[b, t] + values[b, t]
  return adv, returns


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0)])
def test_gae_against_hand_loop_with_right_padding(gamma, lam):
  rng = np.random.default_rng(1)
  mask = _mask()
  rewards = rng.normal(size=mask.shape).astype(np.float32)
  values = rng.normal(size=mask.shape).astype(np.float32)
  # Garbage on padding must not leak into the response.
  rewards[~mask] = 100.0
  values[~mask] = -100.0
  adv, ret = ppo_math.gae_advantages(
    jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam
  )
  expected_adv, expected_ret = _np_gae(rewards, values, LENGTHS, gamma, lam)
  np.testing.assert_allclose(np.asarray(adv), expected_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ret), expected_ret, rtol=1e-5, atol=1e-5)


def test_gae_jits():
  mask = jnp.asarray(_mask())
  rewards = jnp.ones(mask.shape)
  fn = jax.jit(ppo_math.gae_advantages, static_argnums=(3, 4))
  adv, _ = fn(rewards, jnp.zeros(mask.shape), mask, 1.0, 1.0)
  # gamma = lam = 1, zero values: A_t = number of remaining tokens.
  np.testing.assert_allclose(np.asarray(adv)[0, :5], [5, 4, 3, 2, 1])


def test_llava_rlhf_last_column_with_unmasked_gae_matches_eos_at_gamma_lam_1():
  # LLaVA-RLHF puts the score on the last padded column and runs GAE over every column; at
  # gamma = lam = 1 this gives the same advantages on response tokens as scoring at EOS with a
  # masked GAE, whatever the values on padding are.
  rng = np.random.default_rng(2)
  mask = _mask()
  kl = rng.normal(size=mask.shape).astype(np.float32)
  values = rng.normal(size=mask.shape).astype(np.float32)
  score = jnp.array([1.0, -2.0, 0.5, 3.0])
  ones = jnp.ones(mask.shape, bool)
  last_column = ppo_math.token_rewards(
    score, jnp.asarray(kl), jnp.asarray(mask), 0.1, "last_column", 10.0
  )
  eos = ppo_math.token_rewards(score, jnp.asarray(kl), jnp.asarray(mask), 0.1, "eos", 10.0)
  adv_llava, _ = ppo_math.gae_advantages(last_column, jnp.asarray(values), ones, 1.0, 1.0)
  adv_eos, _ = ppo_math.gae_advantages(eos, jnp.asarray(values), jnp.asarray(mask), 1.0, 1.0)
  np.testing.assert_allclose(
    np.asarray(adv_llava)[mask], np.asarray(adv_eos)[mask], rtol=1e-5, atol=1e-5
  )


# --- whitening -----------------------------------------------------------------------------


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_against_numpy(unbiased, shift_mean):
  rng = np.random.default_rng(3)
  mask = _mask()
  x = (rng.normal(size=mask.shape) * 3 + 2).astype(np.float32)
  x[~mask] = 1e4  # padding must not affect the statistics
  values = [float(x[b, t]) for b in range(mask.shape[0]) for t in range(T) if mask[b, t]]
  n = len(values)
  mean = sum(values) / n
  var = sum((v - mean) ** 2 for v in values) / (n - 1 if unbiased else n)
  expected = (x.astype(np.float64) - mean) / math.sqrt(var + 1e-8)
  if not shift_mean:
    expected = expected + mean
  got = ppo_math.masked_whiten(
    jnp.asarray(x), jnp.asarray(mask), shift_mean=shift_mean, unbiased=unbiased
  )
  np.testing.assert_allclose(np.asarray(got)[mask], expected[mask], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    np.var(np.asarray(got)[mask], ddof=1 if unbiased else 0), 1.0, rtol=1e-4
  )


def test_masked_mean_and_var_match_numpy_ddof():
  rng = np.random.default_rng(4)
  mask = _mask()
  x = rng.normal(size=mask.shape).astype(np.float32)
  np.testing.assert_allclose(
    float(ppo_math.masked_mean(jnp.asarray(x), jnp.asarray(mask))), x[mask].mean(), rtol=1e-5
  )
  np.testing.assert_allclose(
    float(ppo_math.masked_var(jnp.asarray(x), jnp.asarray(mask))),
    np.var(x[mask], ddof=1),
    rtol=1e-5,
  )
  np.testing.assert_allclose(
    float(ppo_math.masked_var(jnp.asarray(x), jnp.asarray(mask), unbiased=False)),
    np.var(x[mask]),
    rtol=1e-5,
  )
  per_row = ppo_math.masked_mean(jnp.asarray(x), jnp.asarray(mask), axis=-1)
  for b, n in enumerate(LENGTHS):
    np.testing.assert_allclose(float(per_row[b]), sum(x[b, :n]) / n, rtol=1e-5)


# --- policy and value losses ---------------------------------------------------------------


def test_ppo_policy_loss_by_hand_inside_and_outside_the_clip_range():
  eps = 0.2
  # (log ratio, advantage): ratio inside the range; above it with A > 0 (clipped); above it with
  # A < 0 (not clipped: the pessimistic bound keeps the unclipped term); below it with A < 0
  # (clipped); below with A > 0 (not clipped); then a padded position with garbage.
  log_ratios = [0.1, math.log(1.5), math.log(1.5), math.log(0.5), math.log(0.5), 3.0]
  advantages = [1.0, 2.0, -1.0, -3.0, 0.5, 9.0]
  mask = [1, 1, 1, 1, 1, 0]
  old = [-1.0, -2.0, -0.5, -1.5, -3.0, 0.0]
  logp = [o + lr for o, lr in zip(old, log_ratios)]
  per_token, clipped_flags = [], []
  for lr, a in zip(log_ratios[:5], advantages[:5]):
    ratio = math.exp(lr)
    unclipped = -a * ratio
    clipped = -a * min(max(ratio, 1 - eps), 1 + eps)
    per_token.append(max(unclipped, clipped))
    clipped_flags.append(clipped > unclipped)
  assert clipped_flags == [False, True, False, True, False]
  args = [jnp.array([x]) for x in (logp, old, advantages, mask)]
  loss, metrics = ppo_math.ppo_policy_loss(*args, eps)
  np.testing.assert_allclose(float(loss), sum(per_token) / 5, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["clipfrac"]), 2 / 5)
  np.testing.assert_allclose(
    float(metrics["approx_kl"]), 0.5 * sum(lr**2 for lr in log_ratios[:5]) / 5, rtol=1e-5
  )

  # Clipped tokens carry no gradient; the others get -A * ratio / n.
  grad = jax.grad(lambda lp: ppo_math.ppo_policy_loss(lp, *args[1:], eps)[0])(args[0])[0]
  for i in range(5):
    expected = 0.0 if clipped_flags[i] else -advantages[i] * math.exp(log_ratios[i]) / 5
    np.testing.assert_allclose(float(grad[i]), expected, rtol=1e-5, atol=1e-7)
  assert float(grad[5]) == 0.0

  # LLaVA-RLHF reduction: mean over every position (here 6), padding adding nothing.
  loss_all, _ = ppo_math.ppo_policy_loss(*args, eps, mean_over_padding=True)
  np.testing.assert_allclose(float(loss_all), sum(per_token) / 6, rtol=1e-5)


def test_ppo_value_loss_by_hand():
  c = 0.2
  values = [1.0, 1.5, 0.0, -1.0, 4.0]
  old = [1.1, 1.0, 0.5, -1.0, 0.0]
  returns = [2.0, 0.0, 0.6, -2.0, 0.0]
  mask = [1, 1, 1, 1, 0]
  terms, flags = [], []
  for v, o, r in zip(values[:4], old[:4], returns[:4]):
    vc = min(max(v, o - c), o + c)
    terms.append(max((v - r) ** 2, (vc - r) ** 2))
    flags.append((vc - r) ** 2 > (v - r) ** 2)
  args = [jnp.array([x]) for x in (values, old, returns, mask)]
  loss, metrics = ppo_math.ppo_value_loss(*args, c)
  np.testing.assert_allclose(float(loss), 0.5 * sum(terms) / 4, rtol=1e-6)
  np.testing.assert_allclose(float(metrics["value_clipfrac"]), sum(flags) / 4)
  np.testing.assert_allclose(
    float(metrics["value_error"]),
    sum((v - r) ** 2 for v, r in zip(values[:4], returns[:4])) / 4,
    rtol=1e-6,
  )
  loss_all, _ = ppo_math.ppo_value_loss(*args, c, mean_over_padding=True)
  np.testing.assert_allclose(float(loss_all), 0.5 * sum(terms) / 5, rtol=1e-6)


# --- entropy -------------------------------------------------------------------------------


def test_entropy_from_logits_against_loop():
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(2, 3, 6)).astype(np.float32) * 3
  logits[1, 2, :4] = -np.inf  # banned tokens: probability 0, no NaN
  got = np.asarray(
    ppo_math.entropy_from_logits(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
  )
  got32 = np.asarray(ppo_math.entropy_from_logits(jnp.asarray(logits)))
  for b in range(2):
    for t in range(3):
      row = logits[b, t].astype(np.float64)
      finite = row[np.isfinite(row)]
      p = np.exp(finite - finite.max())
      p /= p.sum()
      h = -sum(pi * math.log(pi) for pi in p if pi > 0)
      np.testing.assert_allclose(got32[b, t], h, rtol=1e-5, atol=1e-6)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(
    float(ppo_math.entropy_from_logits(jnp.zeros((4,)))), math.log(4), rtol=1e-6
  )


def test_leave_one_out_scores_by_hand():
  scores = np.array([1.0, 2.0, 6.0, -1.0, 0.0, 4.0], np.float32)  # two prompts, 3 samples each
  got = ppo_math.leave_one_out_scores(jnp.asarray(scores), 3)
  want = [1 - (2 + 6) / 2, 2 - (1 + 6) / 2, 6 - (1 + 2) / 2, -1 - 4 / 2, 0 - 3 / 2, 4 - (-1) / 2]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(got.reshape(2, 3).sum(1), [0.0, 0.0], atol=1e-6)  # K/(K-1) x centred
  with pytest.raises(ValueError, match="groups of 4"):
    ppo_math.leave_one_out_scores(jnp.asarray(scores), 4)
  with pytest.raises(ValueError, match="groups of 1"):
    ppo_math.leave_one_out_scores(jnp.asarray(scores), 1)
