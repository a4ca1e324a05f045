"""Preference losses against hand-written numpy / math references (loops, not vector copies)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmm_align.losses import IGNORE_INDEX
from lmm_align.preference_losses import (
  DPO_LOSSES,
  bradley_terry_loss,
  dpo_loss,
  reduce_token_logps,
  sequence_logps,
)


def _log_sigmoid(x: float) -> float:
  return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _labels_and_logits(seed=0, B=3, T=7, V=11):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(B, T, V)).astype(np.float32) * 2.0
  labels = rng.integers(0, V, size=(B, T))
  # Row 0: prompt of 2 then answer; row 1: prompt 3, answer 2, right padding; row 2: answer only
  # after 1 prompt token and a padded tail of 3.
  labels[0, :2] = IGNORE_INDEX
  labels[1, :3] = IGNORE_INDEX
  labels[1, 5:] = IGNORE_INDEX
  labels[2, :1] = IGNORE_INDEX
  labels[2, 4:] = IGNORE_INDEX
  weights = rng.uniform(0.5, 3.0, size=(B, T)).astype(np.float32)
  return logits, labels, weights


def _np_sequence_logps(logits, labels, average=False, weights=None):
  B, T, _ = logits.shape
  out = np.zeros(B)
  for b in range(B):
    total, count = 0.0, 0.0
    for t in range(1, T):  # label t is predicted by logits at t - 1
      if labels[b, t] == IGNORE_INDEX:
        continue
      row = logits[b, t - 1].astype(np.float64)
      logp = row[labels[b, t]] - (np.log(np.sum(np.exp(row - row.max()))) + row.max())
      w = 1.0 if weights is None else float(weights[b, t])
      total += w * logp
      count += w
    out[b] = total / count if average else total
  return out


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_sequence_logps_against_loop(average, weighted):
  logits, labels, weights = _labels_and_logits()
  w = weights if weighted else None
  got = sequence_logps(
    jnp.asarray(logits), jnp.asarray(labels), average, None if w is None else jnp.asarray(w)
  )
  np.testing.assert_allclose(
    np.asarray(got), _np_sequence_logps(logits, labels, average, w), rtol=1e-5, atol=1e-5
  )


def test_sequence_logps_unit_weights_equal_unweighted_and_bf16_logits():
  logits, labels, _ = _labels_and_logits(seed=1)
  ones = jnp.ones(labels.shape)
  for average in (False, True):
    np.testing.assert_allclose(
      np.asarray(sequence_logps(jnp.asarray(logits), jnp.asarray(labels), average, ones)),
      np.asarray(sequence_logps(jnp.asarray(logits), jnp.asarray(labels), average)),
      rtol=1e-6,
    )
  got = sequence_logps(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(labels))
  assert got.dtype == jnp.float32


def test_rlhf_v_weighted_average_is_ddpo_normaliser():
  # RLHF-V DDPO: (sum_u log p + g * sum_c log p) / (N_u + g * N_c).
  token_logps = jnp.array([[-1.0, -2.0, -3.0, -4.0, 0.0]])
  mask = jnp.array([[1, 1, 1, 1, 0]])
  gamma = 3.0
  weights = jnp.array([[1.0, gamma, gamma, 1.0, gamma]])  # the padded weight must not count
  expected = (-1.0 - 4.0 + gamma * (-2.0 - 3.0)) / (2 + 2 * gamma)
  got = reduce_token_logps(token_logps, mask, average=True, token_weights=weights)
  np.testing.assert_allclose(float(got[0]), expected, rtol=1e-6)
  got_sum = reduce_token_logps(token_logps, mask, average=False, token_weights=weights)
  np.testing.assert_allclose(float(got_sum[0]), -1.0 - 4.0 + gamma * (-2.0 - 3.0), rtol=1e-6)


def test_reduce_token_logps_empty_row_is_zero_not_nan():
  token_logps = jnp.array([[-1.0, -2.0], [-5.0, -6.0]])
  mask = jnp.array([[True, True], [False, False]])
  for average in (False, True):
    got = np.asarray(reduce_token_logps(token_logps, mask, average=average))
    assert np.all(np.isfinite(got)) and got[1] == 0.0


# --- Bradley-Terry -------------------------------------------------------------------------


@pytest.mark.parametrize("centering", ["abs_mean", "mean_square"])
def test_bradley_terry_by_hand(centering):
  chosen = [1.5, -0.2, 0.3, 2.0]
  rejected = [0.5, 0.4, 0.3, -1.0]
  coef = 1e-3 if centering == "abs_mean" else 1e-2
  n = len(chosen)
  bt = -sum(_log_sigmoid(c - r) for c, r in zip(chosen, rejected)) / n
  sums = [c + r for c, r in zip(chosen, rejected)]
  center = abs(sum(sums) / n) if centering == "abs_mean" else sum(s * s for s in sums) / n
  loss, metrics = bradley_terry_loss(jnp.array(chosen), jnp.array(rejected), coef, centering)
  np.testing.assert_allclose(float(loss), bt + coef * center, rtol=1e-6)
  np.testing.assert_allclose(float(metrics["centering"]), center, rtol=1e-6)
  # Strict accuracy: the tie (0.3, 0.3) is not counted as correct.
  np.testing.assert_allclose(float(metrics["accuracy"]), 2 / 4)
  np.testing.assert_allclose(
    float(metrics["margin"]), sum(c - r for c, r in zip(chosen, rejected)) / n, rtol=1e-6
  )


def test_bradley_terry_llava_rlhf_bce_form_and_centering_gradient():
  # LLaVA-RLHF writes BCE(r1 - r0, choice) + 1e-3 |mean(r1 + r0)|; with choice = 1 and
  # (r1, r0) = (chosen, rejected) that is our loss; the centering pulls mean rewards to 0.
  chosen, rejected = jnp.array([3.0, 4.0]), jnp.array([2.0, 1.0])
  loss, _ = bradley_terry_loss(chosen, rejected, 1e-3)
  logits = np.array([1.0, 3.0])
  bce = np.mean(np.log1p(np.exp(-logits)))
  np.testing.assert_allclose(float(loss), bce + 1e-3 * abs(np.mean([5.0, 5.0])), rtol=1e-6)
  grad = jax.grad(lambda c, r: bradley_terry_loss(c, r, 1.0)[0], argnums=(0, 1))(chosen, rejected)
  # With coef 1 and positive sums the centering term adds +1/B to both gradients.
  sig = 1 / (1 + np.exp(logits))
  np.testing.assert_allclose(np.asarray(grad[0]), -sig / 2 + 0.5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad[1]), sig / 2 + 0.5, rtol=1e-5)
  with pytest.raises(ValueError):
    bradley_terry_loss(chosen, rejected, 1e-3, "square")


# --- DPO family ----------------------------------------------------------------------------


def _np_dpo(name, pc, pr, rc, rr, beta, eps):
  out = []
  for i in range(len(pc)):
    h = (pc[i] - pr[i]) - (rc[i] - rr[i])
    if name == "sigmoid":
      out.append(-_log_sigmoid(beta * h))
    elif name == "cdpo":
      out.append(-(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h))
    elif name == "robust":
      out.append(
        (-(1 - eps) * _log_sigmoid(beta * h) + eps * _log_sigmoid(-beta * h)) / (1 - 2 * eps)
      )
    elif name == "hinge":
      out.append(max(0.0, 1 - beta * h))
    elif name == "ipo":
      out.append((h - 1 / (2 * beta)) ** 2)
  return np.array(out)


LOGPS = dict(
  pc=[-10.0, -25.5, -3.2, -40.0],
  pr=[-12.0, -20.0, -3.0, -41.0],
  rc=[-11.0, -24.0, -3.5, -39.0],
  rr=[-11.5, -22.0, -2.5, -42.0],
)


def test_registered_names():
  assert set(DPO_LOSSES) == {"sigmoid", "cdpo", "robust", "hinge", "ipo"}


@pytest.mark.parametrize("name", sorted(DPO_LOSSES))
@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.2)])
def test_dpo_losses_against_formulas(name, beta, eps):
  args = [jnp.array(LOGPS[k]) for k in ("pc", "pr", "rc", "rr")]
  got = DPO_LOSSES[name](*args, beta, eps)
  expected = _np_dpo(name, *(LOGPS[k] for k in ("pc", "pr", "rc", "rr")), beta, eps)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)


def test_sigmoid_policy_equal_reference_is_log2():
  logps = jnp.array([-3.0, -50.0, -7.5])
  other = jnp.array([-4.0, -10.0, -1.0])
  loss, metrics = dpo_loss("sigmoid", logps, other, logps, other, beta=0.1)
  np.testing.assert_allclose(float(loss), math.log(2.0), rtol=1e-6)
  assert float(metrics["rewards/accuracy"]) == 0.0  # zero margins are not "correct"
  np.testing.assert_allclose(float(metrics["rewards/margin"]), 0.0, atol=1e-7)


@pytest.mark.parametrize("name", ["cdpo", "robust"])
def test_label_smoothed_losses_reduce_to_sigmoid_at_eps0(name):
  args = [jnp.array(LOGPS[k]) for k in ("pc", "pr", "rc", "rr")]
  np.testing.assert_allclose(
    np.asarray(DPO_LOSSES[name](*args, 0.3, 0.0)),
    np.asarray(DPO_LOSSES["sigmoid"](*args, 0.3, 0.0)),
    rtol=1e-6,
  )


def test_robust_is_unbiased_under_label_noise():
  # Chowdhury et al.: E_noise[robust loss] equals the clean DPO loss. With flip probability eps
  # the expectation is (1 - eps) l(h) + eps l(-h).
  args = [jnp.array(LOGPS[k]) for k in ("pc", "pr", "rc", "rr")]
  flipped = [args[1], args[0], args[3], args[2]]
  eps, beta = 0.2, 0.4
  robust = functools.partial(DPO_LOSSES["robust"], beta=beta, label_smoothing=eps)
  expectation = (1 - eps) * robust(*args) + eps * robust(*flipped)
  np.testing.assert_allclose(
    np.asarray(expectation), np.asarray(DPO_LOSSES["sigmoid"](*args, beta, 0.0)), rtol=1e-5
  )


def test_ipo_minimum_at_half_inverse_beta():
  beta = 0.25
  target = 1 / (2 * beta)  # h = 2
  loss = DPO_LOSSES["ipo"](
    jnp.array([target]), jnp.array([0.0]), jnp.array([0.0]), jnp.array([0.0]), beta, 0.0
  )
  np.testing.assert_allclose(float(loss[0]), 0.0, atol=1e-7)
  g = jax.grad(
    lambda x: DPO_LOSSES["ipo"](x, jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), beta, 0.0)[0]
  )
  np.testing.assert_allclose(float(g(jnp.array([target + 1.0]))[0]), 2.0, rtol=1e-6)


def test_dpo_loss_wrapper_metrics_and_sft_term():
  beta = 0.1
  pc, pr, rc, rr = (LOGPS[k] for k in ("pc", "pr", "rc", "rr"))
  args = [jnp.array(x) for x in (pc, pr, rc, rr)]
  n = len(pc)
  per = _np_dpo("sigmoid", pc, pr, rc, rr, beta, 0.0)
  # RLAIF-V: loss = DPO_weight * mean(losses) - SFT_weight * mean(policy_win_logp).
  loss, metrics = dpo_loss("sigmoid", *args, beta=beta, sft_weight=0.5)
  np.testing.assert_allclose(float(loss), per.mean() + 0.5 * (-sum(pc) / n), rtol=1e-6)
  chosen_r = [beta * (pc[i] - rc[i]) for i in range(n)]
  rejected_r = [beta * (pr[i] - rr[i]) for i in range(n)]
  np.testing.assert_allclose(float(metrics["rewards/chosen"]), sum(chosen_r) / n, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["rewards/rejected"]), sum(rejected_r) / n, rtol=1e-5)
  np.testing.assert_allclose(
    float(metrics["rewards/margin"]),
    sum(c - r for c, r in zip(chosen_r, rejected_r)) / n,
    rtol=1e-5,
  )
  accuracy = sum(c > r for c, r in zip(chosen_r, rejected_r)) / n
  np.testing.assert_allclose(float(metrics["rewards/accuracy"]), accuracy)
  np.testing.assert_allclose(float(metrics["preference_loss"]), per.mean(), rtol=1e-6)

  nll = jnp.array([1.0, 2.0, 3.0, 4.0])
  loss, metrics = dpo_loss(
    "sigmoid", *args, beta=beta, sft_weight=0.5, chosen_nll=nll, dpo_weight=2.0
  )
  np.testing.assert_allclose(float(loss), 2.0 * per.mean() + 0.5 * 2.5, rtol=1e-6)
  np.testing.assert_allclose(float(metrics["sft_loss"]), 2.5)

  # Per-example SFT weights: the term imitates only the weighted chosen answers (still / B).
  loss, metrics = dpo_loss(
    "sigmoid", *args, beta=beta, sft_weight=0.5, chosen_nll=nll,
    sft_example_weights=jnp.array([1.0, 0.0, 0.0, 1.0]),
  )  # fmt: skip
  np.testing.assert_allclose(float(metrics["sft_loss"]), (1.0 + 4.0) / 4)
  np.testing.assert_allclose(float(loss), per.mean() + 0.5 * 1.25, rtol=1e-6)

  with pytest.raises(ValueError):
    dpo_loss("kto", *args, beta=beta)


def test_dpo_loss_jits_and_rewards_carry_no_gradient():
  args = [jnp.array(LOGPS[k]) for k in ("pc", "pr", "rc", "rr")]
  for name in DPO_LOSSES:
    fn = jax.jit(functools.partial(dpo_loss, name, beta=0.2, label_smoothing=0.1))
    loss, metrics = fn(*args)
    eager, _ = dpo_loss(name, *args, beta=0.2, label_smoothing=0.1)
    np.testing.assert_allclose(float(loss), float(eager), rtol=1e-6)
  # Gradient of the sigmoid loss w.r.t. the policy chosen logps, by hand: -beta sigma(-beta h) / B.
  beta = 0.2
  grad = jax.grad(lambda pc: dpo_loss("sigmoid", pc, *args[1:], beta=beta)[0])(args[0])
  pc, pr, rc, rr = (LOGPS[k] for k in ("pc", "pr", "rc", "rr"))
  for i in range(4):
    h = (pc[i] - pr[i]) - (rc[i] - rr[i])
    expected = -beta / (1 + math.exp(beta * h)) / 4
    np.testing.assert_allclose(float(grad[i]), expected, rtol=1e-5)


def test_rlhf_v_dense_weights_mark_the_changed_answer_tokens():
  from lmm_align.data.preference import PreferencePair, dense_token_weights

  ignore = -100
  # prompt [1, 2] then answers: chosen "5 6 7 8", rejected "5 9 7 8 4"
  chosen = np.array([1, 2, 5, 6, 7, 8])
  rejected = np.array([1, 2, 5, 9, 7, 8, 4])
  pair = PreferencePair(
    "p", chosen, np.where(np.arange(6) >= 2, chosen, ignore),
    rejected, np.where(np.arange(7) >= 2, rejected, ignore),
  )  # fmt: skip
  w_c, w_r = dense_token_weights(pair, 3.0)
  np.testing.assert_array_equal(w_c, [1, 1, 1, 3, 1, 1])
  np.testing.assert_array_equal(w_r, [1, 1, 1, 3, 1, 1, 3])
  # The weighted log-prob is sum_t w_t log p_t over answer tokens (RLAIF-V compute_weighted_logp).
  logps = np.log(np.linspace(0.1, 0.9, 6))[None]
  mask = (pair.chosen_labels != ignore)[None]
  from lmm_align.preference_losses import reduce_token_logps

  got = reduce_token_logps(
    jnp.asarray(logps), jnp.asarray(mask), token_weights=jnp.asarray(w_c[None])
  )
  np.testing.assert_allclose(got, [(logps[0] * w_c * mask[0]).sum()], rtol=1e-6)
