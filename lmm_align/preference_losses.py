"""Pairwise preference losses: the Bradley-Terry reward model and the DPO family.

Every function is pure `jax.numpy`, jit-able, and takes per-example quantities [B] (rewards or
sequence log-probs of the chosen and rejected answers). Sequence log-probs come from
`sequence_logps` (summed, length-averaged, or RLHF-V's dense token weights) in float32.

The DPO losses are registered by name in `DPO_LOSSES`; a config picks one with `dpo.loss`.
All of them are functions of the same "logits" as TRL's `DPOTrainer`:

    h = (log pi(y_w) - log pi(y_l)) - (log ref(y_w) - log ref(y_l)),

so `h = 0` when the policy equals the reference (the loss is then log 2 for sigmoid: a
non-zero loss at step 0 is expected, RLAIF-V issue #6).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from lmm_align.losses import shifted_targets, token_logprobs

Array = jax.Array
DPOLossFn = Callable[[Array, Array, Array, Array, float, float], Array]


# ---------------------------------------------------------------------------------------------
# Sequence log-probs.
# ---------------------------------------------------------------------------------------------


def reduce_token_logps(
  token_logps: Array,
  mask: Array,
  average: bool = False,
  token_weights: Array | None = None,
) -> Array:
  """Per-row (weighted) sum or mean of per-token log-probs.

  With weights w_t (1 where `token_weights` is None) and mask m_t:

      sum:     sum_t w_t m_t log p_t
      average: sum_t w_t m_t log p_t / sum_t w_t m_t

  This is RLAIF-V's `compute_weighted_logp` (RLHF-V DDPO, arXiv 2312.00849 eq. 5: corrected
  segments weighted by gamma = `dpo_token_weight` = 3.0, the rest by 1). A row with no
  weighted tokens gives 0 (RLAIF-V would give NaN).

  Use this directly on cached per-token reference log-probs (RLAIF-V precomputes them once).

  Args:
    token_logps: [B, T] log-probs aligned with `mask` (e.g. from `token_logprobs`).
    mask: [B, T] bool or {0, 1}: positions that count.
    average: divide by the (weighted) token count.
    token_weights: optional [B, T] weights aligned with `token_logps`.

  Returns:
    float32 [B].
  """
  weights = mask.astype(jnp.float32)
  if token_weights is not None:
    weights = weights * token_weights.astype(jnp.float32)
  total = jnp.sum(jnp.where(weights != 0, token_logps.astype(jnp.float32) * weights, 0.0), -1)
  if not average:
    return total
  denominator = jnp.sum(weights, axis=-1)
  return jnp.where(denominator != 0, total / jnp.where(denominator != 0, denominator, 1.0), 0.0)


def sequence_logps(
  logits: Array,
  labels: Array,
  average: bool = False,
  token_weights: Array | None = None,
) -> Array:
  """Per-row log pi(y | x) of the labelled tokens, summed or length-averaged.

      log pi(y | x) = sum_t w_t log p(y_t | y_<t, x)            (average=False)
                    = sum_t w_t log p(...) / sum_t w_t          (average=True)

  RLAIF-V / LLaVA-Critic DPO use the sum (`dpo_use_average=False`); IPO (TRL) uses the mean.

  Args:
    logits: [B, T, V]; position t predicts labels[:, t + 1] (see `losses.shifted_targets`).
    labels: [B, T] int, IGNORE_INDEX (-100) where there is no answer token.
    average: length-average (weighted length when `token_weights` is given).
    token_weights: optional [B, T] per-token weights aligned with `labels`: token_weights[b, t]
      weighs the token labels[b, t] (RLHF-V dense weights; RLAIF-V's `token_weight` is
      `token_weights[:, 1:]`).

  Returns:
    float32 [B].
  """
  targets, mask = shifted_targets(labels)
  logps = token_logprobs(logits, targets)
  if token_weights is not None:
    token_weights = jnp.concatenate(
      [token_weights[:, 1:], jnp.zeros_like(token_weights[:, :1])], axis=1
    )
  return reduce_token_logps(logps, mask, average=average, token_weights=token_weights)


# ---------------------------------------------------------------------------------------------
# Bradley-Terry reward model.
# ---------------------------------------------------------------------------------------------


def bradley_terry_loss(
  chosen_rewards: Array,
  rejected_rewards: Array,
  centering_coef: float,
  centering: str = "abs_mean",
) -> tuple[Array, dict[str, Array]]:
  """Bradley-Terry reward-model loss with a reward-centering term.

      L = -mean_b log sigmoid(r_w - r_l) + c * C(r_w, r_l)

  with the centering term C chosen by `centering`:
    * "abs_mean" (LLaVA-RLHF `RewardModelTrainer.compute_loss`, c = 1e-3):
        C = |mean_b (r_w + r_l)|
    * "mean_square" (TRL `center_rewards_coefficient`, Eisenstein et al. 2023, c = 1e-2):
        C = mean_b (r_w + r_l)^2

  The BCE on r_1 - r_0 with label `choice` that LLaVA-RLHF writes equals the first term.
  Bradley & Terry (1952); Ouyang et al. (2022) arXiv 2203.02155 eq. 1.

  Args:
    chosen_rewards: [B] scalar rewards of the preferred answers.
    rejected_rewards: [B] scalar rewards of the other answers.
    centering_coef: c above (0 turns centering off).
    centering: "abs_mean" or "mean_square".

  Returns:
    (loss scalar, metrics: accuracy (strict r_w > r_l), margin, chosen/rejected reward means,
    centering term).
  """
  chosen = chosen_rewards.astype(jnp.float32)
  rejected = rejected_rewards.astype(jnp.float32)
  margins = chosen - rejected
  bt = -jnp.mean(jax.nn.log_sigmoid(margins))
  if centering == "abs_mean":
    center = jnp.abs(jnp.mean(chosen + rejected))
  elif centering == "mean_square":
    center = jnp.mean(jnp.square(chosen + rejected))
  else:
    raise ValueError(f"unknown centering {centering!r}; use 'abs_mean' or 'mean_square'")
  loss = bt + centering_coef * center
  metrics = {
    "loss": loss,
    "bt_loss": bt,
    "centering": center,
    "accuracy": jnp.mean((chosen > rejected).astype(jnp.float32)),
    "margin": jnp.mean(margins),
    "chosen_reward": jnp.mean(chosen),
    "rejected_reward": jnp.mean(rejected),
  }
  return loss, metrics


# ---------------------------------------------------------------------------------------------
# DPO family: f(pi_w, pi_l, ref_w, ref_l, beta, label_smoothing) -> per-example losses [B].
# ---------------------------------------------------------------------------------------------


def _dpo_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> Array:
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  return (f32(policy_chosen) - f32(policy_rejected)) - (f32(ref_chosen) - f32(ref_rejected))


def dpo_sigmoid(
  policy_chosen_logps: Array,
  policy_rejected_logps: Array,
  ref_chosen_logps: Array,
  ref_rejected_logps: Array,
  beta: float,
  label_smoothing: float = 0.0,
) -> Array:
  """DPO (Rafailov et al. 2023, arXiv 2305.18290 eq. 7): l = -log sigmoid(beta * h).

  `label_smoothing` is ignored (see `cdpo` / `robust`). RLAIF-V: beta = 0.1, summed log-probs.
  """
  del label_smoothing
  h = _dpo_logits(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
  return -jax.nn.log_sigmoid(beta * h)


def dpo_cdpo(
  policy_chosen_logps: Array,
  policy_rejected_logps: Array,
  ref_chosen_logps: Array,
  ref_rejected_logps: Array,
  beta: float,
  label_smoothing: float = 0.0,
) -> Array:
  """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"): labels flipped
  with probability eps, i.e. a label-smoothed BCE:

      l = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).

  This is TRL's `loss_type="sigmoid"` with `label_smoothing=eps`; eps = 0 gives DPO.
  """
  h = _dpo_logits(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
  eps = label_smoothing
  return -(1.0 - eps) * jax.nn.log_sigmoid(beta * h) - eps * jax.nn.log_sigmoid(-beta * h)


def dpo_robust(
  policy_chosen_logps: Array,
  policy_rejected_logps: Array,
  ref_chosen_logps: Array,
  ref_rejected_logps: Array,
  beta: float,
  label_smoothing: float = 0.0,
) -> Array:
  """Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409 eq. 7): an unbiased loss under
  preference noise of rate eps < 1/2:

      l = [-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)] / (1 - 2 eps).

  Same as TRL's `loss_type="robust"`; eps = 0 gives DPO. eps = 0.5 divides by zero.
  """
  h = _dpo_logits(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
  eps = label_smoothing
  numerator = -(1.0 - eps) * jax.nn.log_sigmoid(beta * h) + eps * jax.nn.log_sigmoid(-beta * h)
  return numerator / (1.0 - 2.0 * eps)


def dpo_hinge(
  policy_chosen_logps: Array,
  policy_rejected_logps: Array,
  ref_chosen_logps: Array,
  ref_rejected_logps: Array,
  beta: float,
  label_smoothing: float = 0.0,
) -> Array:
  """SLiC-style hinge on the DPO logits (Zhao et al. 2023, arXiv 2305.10425; Liu et al. 2023
  RSO, arXiv 2309.06657): l = max(0, 1 - beta h). As TRL's `loss_type="hinge"`."""
  del label_smoothing
  h = _dpo_logits(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
  return jax.nn.relu(1.0 - beta * h)


def dpo_ipo(
  policy_chosen_logps: Array,
  policy_rejected_logps: Array,
  ref_chosen_logps: Array,
  ref_rejected_logps: Array,
  beta: float,
  label_smoothing: float = 0.0,
) -> Array:
  """IPO (Azar et al. 2023, arXiv 2310.12036 eq. 17): l = (h - 1 / (2 beta))^2, where beta
  plays the role of the paper's tau. As TRL, feed length-averaged log-probs
  (`sequence_logps(..., average=True)`)."""
  del label_smoothing
  h = _dpo_logits(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
  return jnp.square(h - 1.0 / (2.0 * beta))


DPO_LOSSES: dict[str, DPOLossFn] = {
  "sigmoid": dpo_sigmoid,
  "cdpo": dpo_cdpo,
  "robust": dpo_robust,
  "hinge": dpo_hinge,
  "ipo": dpo_ipo,
}


def dpo_loss(
  name: str,
  policy_chosen_logps: Array,
  policy_rejected_logps: Array,
  ref_chosen_logps: Array,
  ref_rejected_logps: Array,
  beta: float,
  label_smoothing: float = 0.0,
  sft_weight: float = 0.0,
  chosen_nll: Array | None = None,
  dpo_weight: float = 1.0,
  sft_example_weights: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
  """Mean DPO-family loss plus an optional SFT term on the chosen answer.

      L = dpo_weight * mean_b l_name(b) + sft_weight * mean_b s_b nll_w(b)

  RLAIF-V (`LLaVA15DPOTrainer.compute_loss`) writes exactly this with `DPO_weight` = 1 and
  `SFT_weight` = 0 by default (environment variables), and nll_w = -log pi(y_w), the *same*
  sequence log-prob the DPO term uses (summed by default). That is the default here when
  `chosen_nll` is None; pass a per-example token-mean NLL [B] for the other convention.
  LLaVA-Critic's DPO: `dpo_alpha` = 1, `gamma` = 0, i.e. no SFT term.

  Implicit rewards (reported, never differentiated): r = beta (log pi - log ref).

  Args:
    name: a key of `DPO_LOSSES` (static).
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: [B].
    beta: DPO temperature (RLAIF-V / LLaVA-Critic 0.1; RLHF-V's code default 0.5).
    label_smoothing: eps for `cdpo` / `robust`; ignored by the others.
    sft_weight: weight of the SFT term.
    chosen_nll: optional [B] NLL of the chosen answers; defaults to -policy_chosen_logps.
    dpo_weight: weight of the preference term.
    sft_example_weights: optional [B] s_b (default 1): which chosen answers the SFT term
      imitates, e.g. only those no claim of which the labeler rejected.

  Returns:
    (loss scalar, metrics: loss parts, chosen/rejected implicit reward means, margin,
    accuracy (strict r_w > r_l), and the four mean log-probs).
  """
  if name not in DPO_LOSSES:
    raise ValueError(f"unknown DPO loss {name!r}; registered: {sorted(DPO_LOSSES)}")
  losses = DPO_LOSSES[name](
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    beta,
    label_smoothing,
  )
  preference = jnp.mean(losses)
  if chosen_nll is None:
    chosen_nll = -policy_chosen_logps
  chosen_nll = chosen_nll.astype(jnp.float32)
  if sft_example_weights is not None:
    chosen_nll = chosen_nll * sft_example_weights.astype(jnp.float32)
  sft = jnp.mean(chosen_nll)
  loss = dpo_weight * preference + sft_weight * sft

  f32 = lambda x: jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))
  chosen_rewards = beta * (f32(policy_chosen_logps) - f32(ref_chosen_logps))
  rejected_rewards = beta * (f32(policy_rejected_logps) - f32(ref_rejected_logps))
  metrics = {
    "loss": loss,
    "preference_loss": preference,
    "sft_loss": sft,
    "rewards/chosen": jnp.mean(chosen_rewards),
    "rewards/rejected": jnp.mean(rejected_rewards),
    "rewards/margin": jnp.mean(chosen_rewards - rejected_rewards),
    "rewards/accuracy": jnp.mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
    "logps/chosen": jnp.mean(f32(policy_chosen_logps)),
    "logps/rejected": jnp.mean(f32(policy_rejected_logps)),
    "logps/ref_chosen": jnp.mean(f32(ref_chosen_logps)),
    "logps/ref_rejected": jnp.mean(f32(ref_rejected_logps)),
  }
  return loss, metrics
