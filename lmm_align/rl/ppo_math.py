"""The arithmetic of PPO for language models: KL penalties, reward shaping, GAE, whitening,
the clipped policy and value losses, and entropy.

Shapes: B rollouts, T response positions, V vocabulary. Responses are *right-padded*;
`mask[b, t]` is true on response tokens (EOS included). Everything is pure jax.numpy and
jit-able; string options are static.

LLaVA-RLHF (Sun et al. 2023, arXiv 2309.14525; `RLHF/models/ppo_trainer.py`) differs from
TRL in a few places; each difference is an explicit argument here:

  * KL: `kl_estimator="k1_clamped"` (their "k1" is clamp(logp - ref_logp, min=0)), coef 0.1.
  * Score position: `score_position="last_column"` (they add the score to the last column of
    the padded response, not at EOS). That only reaches the response through GAE run over
    *all* columns: pass `mask=ones` to `gae_advantages` (which they do; pad positions have
    log-prob 0 under policy and reference there, so KL is 0 and rewards are 0 on padding).
  * Reward scale: `reward_scale=10.0` (their `whiten_rewards=False` branch multiplies the
    shaped rewards, KL included, by 10 before GAE). gamma = lam = 1.
  * Whitening: advantages whitened with shift_mean=True, *biased* std over the *whole*
    rollout batch including padding: `masked_whiten(adv, ones, unbiased=False)`.
  * Loss reduction: `.mean()` over all response positions, padding included (padding carries
    no gradient): `mean_over_padding=True` in the policy and value losses.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def masked_mean(x: Array, mask: Array, axis: int | None = None) -> Array:
  """sum(x * mask) / sum(mask) over `axis` (all axes when None); 0 where the mask is empty."""
  mask = mask.astype(jnp.float32)
  total = jnp.sum(jnp.where(mask != 0, x.astype(jnp.float32) * mask, 0.0), axis=axis)
  count = jnp.sum(mask, axis=axis)
  return total / jnp.maximum(count, 1e-8)


def masked_var(x: Array, mask: Array, unbiased: bool = True) -> Array:
  """Variance of the masked entries of x (scalar).

      var = sum m (x - mu)^2 / sum m,   times n / (n - 1) when unbiased (Bessel; TRL default).

  LLaVA-RLHF (`whiten`) uses the biased estimator (`std(unbiased=False)`).
  """
  mean = masked_mean(x, mask)
  var = masked_mean(jnp.square(x.astype(jnp.float32) - mean), mask)
  if unbiased:
    n = jnp.sum(mask.astype(jnp.float32))
    var = var * n / jnp.maximum(n - 1.0, 1.0)
  return var


def masked_whiten(
  x: Array,
  mask: Array,
  shift_mean: bool = True,
  unbiased: bool = True,
  eps: float = 1e-8,
) -> Array:
  """Normalise x with the mean and variance of its masked entries (TRL `masked_whiten`).

      w = (x - mu) / sqrt(var + eps);   w + mu  when shift_mean is False

  (The shift_mean=False form adds the mean back, as both TRL and LLaVA-RLHF do.) LLaVA-RLHF
  writes (x - mu) / (std + eps); the two differ by O(eps). For its advantages use
  `mask=ones, unbiased=False` (statistics over the whole padded rollout batch).

  Args:
    x: [B, T] values.
    mask: [B, T] entries that define the statistics.
    shift_mean: keep the result zero-mean (True) or add the mean back (False).
    unbiased: Bessel's correction on the variance (TRL: True; LLaVA-RLHF: False).
    eps: variance floor.

  Returns:
    float32 [B, T]; entries outside the mask are transformed the same way (not zeroed).
  """
  x = x.astype(jnp.float32)
  mean = masked_mean(x, mask)
  var = masked_var(x, mask, unbiased=unbiased)
  whitened = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    whitened = whitened + mean
  return whitened


# ---------------------------------------------------------------------------------------------
# KL penalty estimators, per token: KL(pi || ref) ~ E_{y ~ pi}[k(y)] (Schulman 2020,
# "Approximating KL divergence", http://joschu.net/blog/kl-approx.html).
# ---------------------------------------------------------------------------------------------


def kl_k1(logp: Array, ref_logp: Array) -> Array:
  """k1 = log pi - log ref (unbiased, can be negative). TRL's `kl_penalty="kl"`."""
  return logp.astype(jnp.float32) - ref_logp.astype(jnp.float32)


def kl_k1_clamped(logp: Array, ref_logp: Array) -> Array:
  """max(log pi - log ref, 0): LLaVA-RLHF's `kl_approximator="k1"` (its default)."""
  return jnp.maximum(kl_k1(logp, ref_logp), 0.0)


def kl_k2(logp: Array, ref_logp: Array) -> Array:
  """k2 = (log pi - log ref)^2 / 2 (biased, low variance). TRL's `kl_penalty="mse"`."""
  return 0.5 * jnp.square(kl_k1(logp, ref_logp))


def kl_k3(logp: Array, ref_logp: Array) -> Array:
  """k3 = (r - 1) - log r with r = ref / pi = exp(log ref - log pi): unbiased and >= 0.
  LLaVA-RLHF's `kl_approximator="k3"`."""
  log_r = ref_logp.astype(jnp.float32) - logp.astype(jnp.float32)
  return jnp.expm1(log_r) - log_r


KL_ESTIMATORS: dict[str, Callable[[Array, Array], Array]] = {
  "k1": kl_k1,
  "k1_clamped": kl_k1_clamped,
  "k2": kl_k2,
  "k3": kl_k3,
}


# ---------------------------------------------------------------------------------------------
# Rewards and advantages.
# ---------------------------------------------------------------------------------------------


def leave_one_out_scores(scores: Array, group_size: int) -> Array:
  """Each sequence score minus the mean score of the other samples of its prompt (RLOO,
  Ahmadian et al. 2024). `scores` [B] holds `group_size` consecutive samples per prompt.

  A per-prompt baseline removes what the prompt alone decides (in the shapes world, how many
  objects there are to recall), which the value model would otherwise have to learn from the
  image before the advantages carry the response's own effect."""
  if group_size < 2 or scores.shape[0] % group_size:
    raise ValueError(f"{scores.shape[0]} scores do not split into groups of {group_size} >= 2")
  groups = scores.reshape(-1, group_size)
  others = (groups.sum(axis=1, keepdims=True) - groups) / (group_size - 1)
  return (groups - others).reshape(scores.shape)


def adaptive_kl_coef(
  kl_coef: float, kl: float, target: float, horizon: float, num_samples: int
) -> float:
  """The next KL coefficient of Ziegler et al. (2019, arXiv 1909.08593)'s proportional
  controller, as TRL's `AdaptiveKLController`:

      e = clip(kl / target - 1, -0.2, 0.2);   beta <- beta * (1 + e * num_samples / horizon)

  `kl` is the mean sequence KL of the rollouts just scored, `num_samples` their count. A host
  float (it is state carried between iterations, not part of a step)."""
  if target <= 0 or horizon <= 0:
    raise ValueError(f"KL target {target} and horizon {horizon} must be positive")
  error = min(max(kl / target - 1.0, -0.2), 0.2)
  return kl_coef * (1.0 + error * num_samples / horizon)


def last_token_index(mask: Array) -> Array:
  """Index of the last true entry per row of mask [B, T] (-1 for an empty row)."""
  positions = jnp.arange(mask.shape[-1])
  return jnp.max(jnp.where(mask.astype(bool), positions, -1), axis=-1)


def token_rewards(
  score: Array,
  kl: Array,
  mask: Array,
  kl_coef: float,
  score_position: str = "eos",
  reward_scale: float = 1.0,
  dense: Array | None = None,
) -> Array:
  """Per-token shaped rewards (Ziegler et al. 2019, arXiv 1909.08593; Ouyang et al. 2022):

      r_t = reward_scale * (-kl_coef * kl_t * m_t + [t == t*] * score + dense_t * m_t)

  with t* the last response token (`score_position="eos"`, TRL) or the last column T - 1 of
  the padded response (`"last_column"`, LLaVA-RLHF). LLaVA-RLHF: kl_coef = 0.1, k1 clamped at
  0, reward_scale = 10 (their unwhitened branch scales KL and score alike), and `score` already
  holds RM score + stop-token penalty + length/correctness bonuses.

  Args:
    score: [B] sequence-level reward.
    kl: [B, T] per-token KL estimate (see `KL_ESTIMATORS`).
    mask: [B, T] response tokens (right padding).
    kl_coef: KL penalty coefficient beta.
    score_position: "eos" or "last_column" (static).
    reward_scale: multiplies the shaped rewards (1 for TRL; 10 for LLaVA-RLHF).
    dense: [B, T] rewards placed inside the response (segment increments,
      `rewards.segment_rewards`), or None.

  Returns:
    float32 [B, T].
  """
  T = kl.shape[-1]
  if score_position == "eos":
    index = last_token_index(mask)
  elif score_position == "last_column":
    index = jnp.full(score.shape, T - 1)
  else:
    raise ValueError(f"unknown score_position {score_position!r}; use 'eos' or 'last_column'")
  penalty = -kl_coef * jnp.where(mask.astype(bool), kl.astype(jnp.float32), 0.0)
  placed = jax.nn.one_hot(index, T, dtype=jnp.float32) * score.astype(jnp.float32)[:, None]
  if dense is not None:
    placed = placed + jnp.where(mask.astype(bool), dense.astype(jnp.float32), 0.0)
  return reward_scale * (penalty + placed)


def gae_advantages(
  rewards: Array,
  values: Array,
  mask: Array,
  gamma: float,
  lam: float,
) -> tuple[Array, Array]:
  """Generalised advantage estimation (Schulman et al. 2016, arXiv 1506.02438), a reverse scan:

      delta_t = r_t + gamma * m_{t+1} V_{t+1} - V_t
      A_t     = m_t * (delta_t + gamma * lam * m_{t+1} A_{t+1}),   A_T = V_T = 0
      R_t     = m_t * (A_t + V_t)

  With right padding the episode ends at the last true position of `mask`, so values and
  rewards on padding never leak into the response. LLaVA-RLHF runs GAE over all columns
  (mask = ones) with gamma = lam = 1, where A_t = sum_{k >= t} r_k - V_t.

  Args:
    rewards: [B, T] per-token rewards (`token_rewards`).
    values: [B, T] value estimates V(s_t) from the rollout.
    mask: [B, T] response tokens.
    gamma: discount.
    lam: GAE lambda.

  Returns:
    (advantages [B, T], returns [B, T]), float32, zero outside the mask; not whitened.
  """
  m = mask.astype(jnp.float32)
  r = rewards.astype(jnp.float32)
  v = values.astype(jnp.float32)
  next_m = jnp.concatenate([m[:, 1:], jnp.zeros_like(m[:, :1])], axis=1)
  next_v = jnp.concatenate([v[:, 1:], jnp.zeros_like(v[:, :1])], axis=1) * next_m
  deltas = r + gamma * next_v - v

  def step(next_advantage, inputs):
    delta_t, m_t, next_m_t = inputs
    advantage = m_t * (delta_t + gamma * lam * next_m_t * next_advantage)
    return advantage, advantage

  time_major = lambda x: jnp.swapaxes(x, 0, 1)
  _, advantages = jax.lax.scan(
    step,
    jnp.zeros(r.shape[:1], jnp.float32),
    (time_major(deltas), time_major(m), time_major(next_m)),
    reverse=True,
  )
  advantages = time_major(advantages)
  return advantages, m * (advantages + v)


# ---------------------------------------------------------------------------------------------
# Losses.
# ---------------------------------------------------------------------------------------------


def _reduce(x: Array, mask: Array, mean_over_padding: bool) -> Array:
  if mean_over_padding:
    return jnp.mean(jnp.where(mask.astype(bool), x, 0.0))
  return masked_mean(x, mask)


def ppo_policy_loss(
  logp: Array,
  old_logp: Array,
  advantages: Array,
  mask: Array,
  clip_eps: float,
  mean_over_padding: bool = False,
) -> tuple[Array, dict[str, Array]]:
  """PPO clipped surrogate (Schulman et al. 2017, arXiv 1707.06347 eq. 7), per token:

      rho_t = exp(log pi_t - log pi_old_t)
      l_t   = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))
      L     = sum_t m_t l_t / sum_t m_t      (or / (B T) when mean_over_padding)

  Metrics: clipfrac = mean[-A clip(rho) > -A rho] (the clipped branch is active),
  approx_kl = mean (log pi - log pi_old)^2 / 2, as TRL and LLaVA-RLHF log them.
  LLaVA-RLHF: clip_eps = 0.2, mean over all positions (`mean_over_padding=True`; their padding
  terms are the constant -A_t, here 0: the gradient is the same, the logged value is not).

  Args:
    logp: [B, T] current log-probs of the sampled tokens (differentiated).
    old_logp: [B, T] log-probs at rollout time.
    advantages: [B, T] (typically whitened).
    mask: [B, T] response tokens.
    clip_eps: epsilon.
    mean_over_padding: divide by B * T instead of the token count.

  Returns:
    (loss scalar, metrics: clipfrac, approx_kl, ratio).
  """
  logp = logp.astype(jnp.float32)
  old_logp = jax.lax.stop_gradient(old_logp.astype(jnp.float32))
  advantages = jax.lax.stop_gradient(advantages.astype(jnp.float32))
  log_ratio = jnp.where(mask.astype(bool), logp - old_logp, 0.0)
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  loss = _reduce(jnp.maximum(unclipped, clipped), mask, mean_over_padding)
  metrics = {
    "policy_loss": loss,
    "clipfrac": jax.lax.stop_gradient(masked_mean(clipped > unclipped, mask)),
    "approx_kl": jax.lax.stop_gradient(0.5 * masked_mean(jnp.square(log_ratio), mask)),
    "ratio": jax.lax.stop_gradient(masked_mean(ratio, mask)),
  }
  return loss, metrics


def ppo_value_loss(
  values: Array,
  old_values: Array,
  returns: Array,
  mask: Array,
  clip_range_value: float,
  mean_over_padding: bool = False,
) -> tuple[Array, dict[str, Array]]:
  """Clipped value loss (PPO2 baselines; TRL; LLaVA-RLHF `compute_value_loss`):

      V^clip = clip(V, V_old - c, V_old + c)
      L      = 0.5 * mean_t max((V - R)^2, (V^clip - R)^2)

  The caller multiplies by `vf_coef` (LLaVA-RLHF: 0.1, c = 0.2, mean over all positions).

  Args:
    values: [B, T] current value predictions (differentiated).
    old_values: [B, T] values at rollout time.
    returns: [B, T] GAE returns.
    mask: [B, T] response tokens.
    clip_range_value: c.
    mean_over_padding: divide by B * T instead of the token count.

  Returns:
    (loss scalar, metrics: value_clipfrac, value_error = mean (V - R)^2).
  """
  values = values.astype(jnp.float32)
  old_values = jax.lax.stop_gradient(old_values.astype(jnp.float32))
  returns = jax.lax.stop_gradient(returns.astype(jnp.float32))
  clipped_values = jnp.clip(values, old_values - clip_range_value, old_values + clip_range_value)
  unclipped_loss = jnp.square(values - returns)
  clipped_loss = jnp.square(clipped_values - returns)
  loss = 0.5 * _reduce(jnp.maximum(unclipped_loss, clipped_loss), mask, mean_over_padding)
  metrics = {
    "value_loss": loss,
    "value_clipfrac": jax.lax.stop_gradient(masked_mean(clipped_loss > unclipped_loss, mask)),
    "value_error": jax.lax.stop_gradient(masked_mean(unclipped_loss, mask)),
  }
  return loss, metrics


def entropy_from_logits(logits: Array) -> Array:
  """Entropy of softmax(logits) in float32: H = logsumexp(z) - sum_v softmax(z)_v z_v.

  Args:
    logits: [..., V].

  Returns:
    float32 [...].
  """
  logits = logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  # where(): a -inf logit (a banned token) has probability 0 and contributes 0, not NaN.
  expected = jnp.sum(jnp.where(probs > 0, probs * logits, 0.0), axis=-1)
  return jax.nn.logsumexp(logits, axis=-1) - expected
