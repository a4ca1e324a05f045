"""PPO for vision-language models (LLaVA-RLHF, Sun et al. 2023, arXiv 2309.14525).

Four roles, laid out so that they fit together like LLaVA-RLHF's:
  policy     the SFT model (`init_from`), trained: its LoRA adapters over a frozen base, or
             all its params
  reference  the frozen starting policy: the same base *without* the policy's adapters (LoRA),
             or a frozen copy (full fine-tune); never in the optimizer state
  reward     a reward model exported by `lmm-align export` of a reward run (HF backbone + head,
             fact-augmented or vanilla), frozen
  value      started from the reward model with a zero-initialised head: LoRA adapters over the
             reward model's frozen backbone (adapters start at zero, so the value backbone *is*
             the reward model at step 0), or a trainable copy of it

One iteration: sample responses to a batch of prompts (the KV-cached sampler; first question of
each conversation), cut them (stop token, optionally the published '?' quirk), score them with
the reward model on `query + response + evaluation prompt with the image's facts` plus the
symbolic rewards (lmm_align.rl.rewards), compute old / reference log-probs and values, shape
per-token rewards with the KL penalty, GAE, whiten, then `noptepochs` passes of clipped policy
and value updates over minibatches. The update step is pure, (state, batch, frozen) -> (state,
metrics), jitted once with shardings; every rollout tensor has one fixed shape
[B, query_len + max_new_tokens], so nothing recompiles. Iteration i's prompts and sampling key
are functions of (seed, i): a restarted run resumes exactly.

Anyres policies (LLaVA-NeXT / OneVision): each prompt's image placeholders are the count its
tiles pack into (`anyres.num_image_tokens`, never truncated: a prompt longer than query_len is
dropped), and the rollout carries its tiles (pixel_values [B, tiles, H, W, 3], tiles from
data.tile_buckets, so one program per bucket serves the run), image_sizes [B, 2] and the pack
plan (`pack_plan.*`, a token budget of query_len) through the sampler, the policy, reference,
value and reward-model passes and the update. The reward and value models read the policy's
rows, so they must process images as the policy does (`check_reward_model_images`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lmm_align import optim, sampling, sharding
from lmm_align.data import conversation, pipeline, preference_sources, sources
from lmm_align.data.anyres import AnyresImageConfig, choose_tile_bucket
from lmm_align.data.images import preprocess_image
from lmm_align.evals import registry as eval_registry
from lmm_align.hf.reward import RewardModel, load_reward_model
from lmm_align.losses import token_logprobs
from lmm_align.models.heads import ScalarHead
from lmm_align.models.llava import Llava
from lmm_align.models.lora import merge_lora, model_variables
from lmm_align.rl import oracles, ppo_math, rewards
from lmm_align.rl.scoring import hidden_or_logits, query_ids, reward_scores
from lmm_align.trainers import export, loop, modelling, registry, run_setup
from lmm_align.trainers import state as state_lib

# --------------------------------------------------------------------------------------------
# Forward passes over a rollout batch: input_ids [B, Q + N] = left-padded query (Q columns)
# then the right-padded response (N columns); response_mask [B, N].
# --------------------------------------------------------------------------------------------


def response_logps(
  model: Llava, variables: dict, batch: dict, temperature: float = 1.0
) -> jax.Array:
  """log pi(response token t | query, response_<t): float32 [B, N], 0 off the response.

  pi is the distribution the rollouts were sampled from, softmax(logits / temperature), so
  that the ratios and the KL penalty refer to it at any sampling temperature (TRL does the
  same; top-k / top-p truncation is not modelled)."""
  n = batch["response_mask"].shape[1]
  logits = hidden_or_logits(model, variables, batch, True).logits[:, -n - 1 : -1]
  if temperature != 1.0:
    logits = logits.astype(jnp.float32) / temperature
  logp = token_logprobs(logits, batch["input_ids"][:, -n:])
  return jnp.where(batch["response_mask"] > 0, logp, 0.0)


def response_values(
  model: Llava, head: ScalarHead, variables: dict, head_params: Any, batch: dict
) -> jax.Array:
  """V(state before response token t): the head on the hidden state that predicts token t."""
  n = batch["response_mask"].shape[1]
  hidden = hidden_or_logits(model, variables, batch, False).hidden_states
  return head.apply({"params": head_params}, hidden[:, -n - 1 : -1])


# --------------------------------------------------------------------------------------------
# Advantages and the update step.
# --------------------------------------------------------------------------------------------


def advantages_and_returns(
  old_logps: jax.Array,
  ref_logps: jax.Array,
  values: jax.Array,
  scores: jax.Array,
  mask: jax.Array,
  ppo: ml_collections.ConfigDict,
  dense: jax.Array | None = None,
  kl_coef: jax.Array | float | None = None,
) -> dict[str, jax.Array]:
  """Per-token shaped rewards -> GAE -> whitened advantages (see lmm_align.rl.ppo_math).
  `scores` sit at the score position; `dense` [B, N] (segment increments) where they were
  earned; `kl_coef` the iteration's coefficient (ppo.kl_coef when None; adaptive runs pass
  the controller's, traced, so a new value does not recompile).

  LLaVA-RLHF: k1 clamped at 0, coef 0.1, score on the last column, rewards x10 (no
  whitening), GAE over all columns with gamma = lam = 1, advantages whitened over the whole
  batch (padding included, biased std).
  """
  kl = ppo_math.KL_ESTIMATORS[ppo.kl_estimator](old_logps, ref_logps) * mask
  shaped = ppo_math.token_rewards(
    scores,
    kl,
    mask,
    ppo.kl_coef if kl_coef is None else kl_coef,
    ppo.score_position,
    1.0 if ppo.whiten_rewards else ppo.reward_scale,
    dense,
  )
  if ppo.whiten_rewards:
    shaped = ppo_math.masked_whiten(shaped, mask, shift_mean=False)
  everywhere = jnp.ones_like(mask)
  gae_mask = everywhere if ppo.score_position == "last_column" else mask
  adv, returns = ppo_math.gae_advantages(shaped, values, gae_mask, ppo.gamma, ppo.lam)
  whiten_mask = everywhere if ppo.mean_over_padding else mask
  adv = ppo_math.masked_whiten(
    adv, whiten_mask, shift_mean=True, unbiased=not ppo.mean_over_padding
  )
  return {
    "advantages": adv,
    "returns": returns,
    "kl_per_sequence": jnp.sum(kl, axis=1),
    "shaped_reward_sum": jnp.sum(shaped * gae_mask, axis=1),
  }


def ppo_train_step(
  state: state_lib.TrainState,
  batch: dict[str, jax.Array],
  frozen: dict[str, Any],
  *,
  policy_model: Llava,
  value_model: Llava,
  value_head: ScalarHead,
  tx: optax.GradientTransformation,
  trainable: tuple[str, ...],
  ppo: ml_collections.ConfigDict,
  state_dtype: str,
  grad_accum_steps: int = 1,
) -> tuple[state_lib.TrainState, dict[str, jax.Array]]:
  """One minibatch update of policy and value: L = L_clip + vf_coef * L_value.

  state.params = {"policy": ..., "value": {"backbone": ..., "head": ...}};
  frozen = {"policy_base": LoRA base or None, "value_base": LoRA base or None, ...}.
  grad_accum_steps > 1 runs the minibatch as that many micro-batches (each device keeps its
  own rows) and sums their gradients, each micro-batch's losses weighted by its share of the
  minibatch's averaging count (response tokens, or every column with ppo.mean_over_padding)
  and its token-mean metrics by its share of the response tokens, so the update and the
  metrics are the whole minibatch's.
  """
  trainable_params, frozen_params = optim.split_trainable(state.params, trainable)
  tokens = jnp.maximum(jnp.sum(batch["response_mask"]), 1).astype(jnp.float32)
  columns = jnp.asarray(batch["response_mask"].size, jnp.float32)

  def micro_step(grads, micro):
    mask = micro["response_mask"]
    token_share = jnp.sum(mask).astype(jnp.float32) / tokens
    weight = mask.size / columns if ppo.mean_over_padding else token_share

    def loss_fn(params):
      p = optim.merge_params(params, frozen_params)
      policy_vars = model_variables(p["policy"], frozen["policy_base"])
      logp = response_logps(policy_model, policy_vars, micro, ppo.temperature)
      values = response_values(
        value_model,
        value_head,
        model_variables(p["value"]["backbone"], frozen["value_base"]),
        p["value"]["head"],
        micro,
      )
      pg, pg_metrics = ppo_math.ppo_policy_loss(
        logp, micro["old_logps"], micro["advantages"], mask, ppo.clip_eps, ppo.mean_over_padding
      )
      vf, vf_metrics = ppo_math.ppo_value_loss(
        values, micro["old_values"], micro["returns"], mask, ppo.clip_value,
        ppo.mean_over_padding,
      )  # fmt: skip
      loss = pg + ppo.vf_coef * vf
      metrics = {"loss": loss, **pg_metrics, "value_loss": vf, **vf_metrics}
      losses = ("loss", "policy_loss", "value_loss")
      metrics = {k: (weight if k in losses else token_share) * m for k, m in metrics.items()}
      return weight * loss, metrics

    (_, metrics), micro_grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable_params)
    return jax.tree.map(jnp.add, grads, micro_grads), metrics

  def split(x):  # [G, ...] -> [accum, G / accum, ...], each device's rows in every micro-batch
    x = x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps, *x.shape[1:])
    return jnp.moveaxis(x, 1, 0)

  zeros = jax.tree.map(jnp.zeros_like, trainable_params)
  grads, metrics = jax.lax.scan(micro_step, zeros, jax.tree.map(split, batch))
  metrics = jax.tree.map(lambda m: jnp.sum(m, axis=0), metrics)
  new_state = state_lib.apply_gradients(
    state, grads, tx, trainable_params, frozen_params, state_dtype
  )
  return new_state, state_lib.with_step_metrics(metrics, grads, batch)


# --------------------------------------------------------------------------------------------
# Prompts.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Prompt:
  record_id: str
  question: str
  input_ids: np.ndarray
  image: Any
  caption_type: int
  length_bonus: float
  facts: list[str]
  rationale: str | None
  # The record's fields that the oracles read (`rl.oracles`), e.g. {"scene": ...}.
  truth: dict[str, Any] = dataclasses.field(default_factory=dict)
  # Anyres: the image's (height, width), for its tiles and pack plan; None otherwise.
  image_size: tuple[int, int] | None = None


class PromptData:
  """Encoded RL prompts; iteration i's prompts are a pure function of (seed, i)."""

  def __init__(self, prompts: Sequence[Prompt], seed: int, stats: Counter):
    if not prompts:
      raise ValueError(f"no RL prompt left: {dict(stats)}")
    self.prompts = list(prompts)
    self.seed = seed
    self.stats = stats

  def __len__(self) -> int:
    return len(self.prompts)

  def batch(self, iteration: int, size: int) -> list[Prompt]:
    per_epoch = len(self) // size
    if per_epoch == 0:
      raise ValueError(f"rollout batch {size} is larger than the prompt set ({len(self)})")
    epoch, position = divmod(iteration, per_epoch)
    order = np.random.default_rng([self.seed, epoch]).permutation(len(self))
    return [self.prompts[i] for i in order[position * size : (position + 1) * size]]

  def fingerprint(self) -> dict[str, Any]:
    return {"num_prompts": len(self), "seed": self.seed}


def prompt_records(config: ml_collections.ConfigDict) -> tuple[list[dict], Counter]:
  """The configured RL prompts, from any "prompts" source of `lmm_align.data.registry`
  (shapes_prompts with ppo.yes_no_fraction, llava_rlhf_prompts, rlaifv_jsonl, prompts_jsonl),
  and the skipped counts."""
  from lmm_align.data import registry as data_registry

  return data_registry.read("prompts", config.data, yes_no_fraction=config.ppo.yes_no_fraction)


def reward_rows(
  prompts: Sequence[Prompt],
  rows: Sequence[int],
  responses: Sequence[Sequence[int]],
  rm: RewardModel,
  tokenizer: Any,
  template,
  rng: np.random.Generator,
) -> list[list[int]]:
  """Token ids the reward model scores for each response to prompts[rows[i]]: the query as the
  RM reads it (the policy's, or with the facts under the question), the response, the request.
  Each prompt's facts are shuffled once (one `rng` draw per prompt, in order), so the prefixes
  of one response, and the samples of one prompt, share an order."""
  from lmm_align.data import reward_data

  queries, suffixes = [], []
  for p in prompts:
    question, suffix = reward_data.reward_texts(
      p.question, rm.prompt, p.facts, rng, fact_augmented=rm.fact_augmented,
      facts_position=rm.facts_position, rationale=p.rationale, lead_in=rm.fact_lead_in,
    )  # fmt: skip
    same = question == p.question
    # Re-encoded with the facts, the image keeps the prompt's placeholder count (anyres: packed).
    image_tokens = int(np.sum(p.input_ids == rm.model.config.image_token_id)) or None
    queries.append(
      list(p.input_ids) if same
      else list(query_ids(question, p.image is not None, p.record_id, tokenizer, template,
                          rm.model.config, image_tokens))
    )  # fmt: skip
    suffixes.append(reward_data.suffix_ids(suffix, tokenizer, template))
  return [queries[b] + list(r) + suffixes[b] for b, r in zip(rows, responses)]


def prompt_data(
  config, tokenizer: Any, model_config, tiling: pipeline.AnyresTiling | None = None
) -> PromptData:
  """Records -> prompts ending with the assistant's turn; longer than ppo.query_len: dropped
  and counted (LLaVA-RLHF drops them too). With anyres `tiling` each image's placeholders are
  the count its tiles pack into (the image is read once for its size); an image needing more
  tiles than data.tile_buckets allow is dropped (`dropped_too_many_tiles`)."""
  records, stats = prompt_records(config)
  tmpl = conversation.get_template(config.data.template)
  oracle = None if config.ppo.reward_source == "model" else oracles.get(config.ppo.reward_source)
  truth_fields = {f for o in oracles.all_oracles() for f in o.fields}
  prompts = []
  for r in records:
    image = preference_sources.image_source(r.get("image"))
    image_size, image_tokens = None, None
    if tiling is not None and image is not None:
      image_size, image_tokens = tiling.placeholders(image, None)
      if image_tokens is None:
        stats["dropped_too_many_tiles"] += 1
        continue
    ids = query_ids(r["question"], r.get("image") is not None, str(r["id"]), tokenizer, tmpl,
                    model_config, image_tokens)  # fmt: skip
    if len(ids) > config.ppo.query_len:
      stats["dropped_query_too_long"] += 1
      continue
    if config.ppo.fact_augmented and not r.get("facts"):
      if config.data.on_error != "skip":
        raise ValueError(f"RL prompt {r['id']!r}, field 'facts': none, and the RM reads facts")
      stats["skipped_no_facts"] += 1
      continue
    missing = [f for f in (oracle.fields if oracle else ()) if not r.get(f)]
    if missing:
      if config.data.on_error != "skip":
        raise ValueError(
          f"RL prompt {r['id']!r}, field {missing[0]!r}: none, and ppo.reward_source="
          f"{oracle.name} scores against it"
        )
      stats[f"skipped_no_{missing[0]}"] += 1
      continue
    prompts.append(
      Prompt(
        str(r["id"]), r["question"], np.asarray(ids, np.int32), image,
        int(r.get("caption_type", rewards.GENERAL)), float(r.get("length_bonus", 1.0)),
        list(r.get("facts") or []), r.get("rationale"),
        {f: r[f] for f in truth_fields if r.get(f) is not None}, image_size,
      )
    )  # fmt: skip
    stats["kept"] += 1
  return PromptData(prompts, config.seed, stats)


# --------------------------------------------------------------------------------------------
# Rollouts.
# --------------------------------------------------------------------------------------------


def right_pad(
  rows: Sequence[Sequence[int]], length: int, pad: int
) -> tuple[np.ndarray, np.ndarray]:
  """Token-id rows right-padded to `length`: (ids, attention mask), both int32 [rows, length]."""
  ids = np.full((len(rows), length), pad, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    ids[i, : len(row)] = row
    mask[i, : len(row)] = 1
  return ids, mask


def forward_chunks(fn: Callable[[dict], Any], batch: dict, size: int, mesh=None) -> np.ndarray:
  """fn over row chunks of `size` (one compiled shape), concatenated on the host. A short last
  chunk is filled with copies of its first row (and their outputs dropped), so a row count
  that varies by call (scored prefixes) compiles nothing new. With a mesh each chunk is laid
  out as a global batch over it."""
  n = len(batch["input_ids"])
  out = []
  for start in range(0, n, size):
    chunk = {k: v[start : start + size] for k, v in batch.items()}
    short = size - len(chunk["input_ids"])
    if short:
      chunk = {k: np.concatenate([v, np.repeat(v[:1], short, 0)]) for k, v in chunk.items()}
    if mesh is not None:
      chunk = sharding.global_batch_from_local(chunk, mesh)
    out.append(np.asarray(jax.device_get(fn(chunk))))
  return np.concatenate(out)[:n]


class Rollouts:
  """The rollout side of PPO: sampling, scoring and the per-token quantities, all jitted."""

  def __init__(
    self,
    config,
    tokenizer,
    policy_model,
    value_model,
    value_head,
    rm,
    image_config,
    mesh,
    tiling: pipeline.AnyresTiling | None = None,
  ):
    """image_config: a single-image processor, or None (text only, or anyres: `tiling`)."""
    self.config, self.ppo = config, config.ppo
    self.tiling = tiling
    self.tokenizer = tokenizer
    self.policy_model = policy_model
    self.plain_policy = Llava(policy_model.config.with_runtime(lora=None))
    self.value_model, self.value_head = value_model, value_head
    self.rm: RewardModel = rm
    self.rm_head = ScalarHead()
    self.template = conversation.get_template(config.data.template)
    self.image_config = image_config
    self.mesh = mesh
    # An answer ends at the template's end token (eos, or e.g. ChatML's <|im_end|>).
    self.stop_ids = conversation.answer_stop_ids(tokenizer, self.template)
    self.settings = sampling.SamplingSettings(
      temperature=self.ppo.temperature, top_p=self.ppo.top_p, top_k=self.ppo.top_k,
      max_new_tokens=self.ppo.max_new_tokens, stop_token_ids=self.stop_ids,
    )  # fmt: skip
    self.cut_ids = tuple(
      i
      for i, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
      if self.ppo.truncate_at_question_mark and tok is not None and tok.endswith("?")
    )
    self.symbolic = rewards.SymbolicRewardConfig(
      correct_coef=self.ppo.correct_coef, length_coef=self.ppo.length_coef,
      stop_penalty=self.ppo.stop_penalty, relative_stop_penalty=self.ppo.relative_stop_penalty,
      reward_bias=self.ppo.reward_bias,
    )  # fmt: skip
    lora = policy_model.config.runtime.lora
    self._merge = jax.jit(lambda base, adapters: merge_lora(base, adapters, lora))
    self._logps = jax.jit(
      lambda v, b: response_logps(plain_or(policy_model, v), v, b, self.ppo.temperature)
    )
    self._values = jax.jit(lambda v, h, b: response_values(value_model, value_head, v, h, b))
    self._scores = jax.jit(lambda p, h, b: reward_scores(rm.model, self.rm_head, p, h, b))
    self._advantages = jax.jit(
      lambda o, r, v, s, m, d, c: advantages_and_returns(o, r, v, s, m, self.ppo, d, c)
    )
    self.separator_ids = rewards.separator_token_ids(tokenizer, self.ppo.segment_separators)

  def sampling_params(self, params: dict, frozen: dict) -> Any:
    if frozen["policy_base"] is None:
      return params["policy"]
    return self._merge(frozen["policy_base"], params["policy"])

  def _pixels(self, prompts: Sequence[Prompt]) -> np.ndarray | None:
    if self.image_config is None:
      return None
    images = []
    for p in prompts:
      image = p.image() if callable(p.image) else p.image
      if image is None:
        raise ValueError(f"RL prompt {p.record_id!r} has no image for a vision model")
      images.append(preprocess_image(image, self.image_config))
    return np.stack(images)[:, None]

  def _image_fields(self, prompts: Sequence[Prompt]) -> dict[str, np.ndarray]:
    """The rollout rows' image fields: pixel_values [B, 1, H, W, 3] (single-image models), or
    an anyres batch's (`pipeline.anyres_batch_shapes`: tiles from data.tile_buckets, the pack
    plan's token budget query_len, which holds any kept prompt's image); {} for text only. A
    prompt's consecutive samples share its tiles, which are cut once."""
    if self.tiling is None:
      pixels = self._pixels(prompts)
      return {} if pixels is None else {"pixel_values": pixels}
    slot: dict[int, int] = {}
    rows = np.array([slot.setdefault(id(p), len(slot)) for p in prompts])
    unique = list({id(p): p for p in prompts}.values())
    sizes = np.array([p.image_size or (0, 0) for p in unique], np.int32).reshape(-1, 2)
    tiles = choose_tile_bucket(self.tiling.tile_counts(sizes), self.tiling.tile_buckets)
    images = [(p.record_id, p.image if p.image_size else None) for p in unique]
    fields = pipeline.tiled_fields(images, sizes, self.tiling, self.ppo.query_len, tiles)
    return {k: v[rows] for k, v in fields.items()}

  def collect(
    self,
    params: dict,
    frozen: dict,
    prompts: Sequence[Prompt],
    rng: jax.Array,
    iteration: int,
    kl_coef: float,
  ) -> tuple[dict[str, np.ndarray], dict[str, float], list[str]]:
    """(rollout batch for the update, metrics, response texts) of one iteration; `kl_coef`
    is the KL penalty's coefficient for this iteration."""
    ppo, tok = self.ppo, self.tokenizer
    timings = {}
    t0 = time.perf_counter()
    images = self._image_fields(prompts)
    pixels = images.get("pixel_values")
    if pixels is not None and self.tiling is None:
      pixels = pixels[:, 0]  # one image per row, in placeholder order
    out = sampling.generate(
      self.plain_policy, self.sampling_params(params, frozen), [p.input_ids for p in prompts],
      pixels, settings=self.settings, rng=rng, pad_id=tok.pad_token_id,
      buckets=(ppo.query_len,), image_sizes=images.get("image_sizes"),
    )  # fmt: skip
    cut = [
      rewards.truncate_response(row[:n], self.stop_ids, self.cut_ids)
      for row, n in zip(np.asarray(out.tokens), np.asarray(out.lengths))
    ]
    texts = [self._decode(c.tokens) for c in cut]
    timings["time/rollout"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    q_ids, q_mask = sampling.left_pad(
      [p.input_ids for p in prompts], ppo.query_len, tok.pad_token_id
    )
    r_ids, r_mask = right_pad([c.tokens for c in cut], ppo.max_new_tokens, tok.pad_token_id)
    batch = {
      "input_ids": np.concatenate([q_ids, r_ids], 1),
      "attention_mask": np.concatenate([q_mask, r_mask], 1),
      "response_mask": r_mask,
    }
    batch.update(images)
    size = ppo.forward_batch_size
    policy_vars = model_variables(params["policy"], frozen["policy_base"])
    ref_vars = {
      "params": frozen["reference"] if frozen["reference"] is not None else frozen["policy_base"]
    }
    value_vars = model_variables(params["value"]["backbone"], frozen["value_base"])
    old_logps = forward_chunks(lambda b: self._logps(policy_vars, b), batch, size, self.mesh)
    ref_logps = forward_chunks(lambda b: self._logps(ref_vars, b), batch, size, self.mesh)
    values = forward_chunks(
      lambda b: self._values(value_vars, params["value"]["head"], b), batch, size, self.mesh
    )
    responses = [c.tokens for c in cut]
    if ppo.dense_reward == "segments":
      # Every prefix that ends a segment is scored; the last prefix is the whole response.
      ends = [rewards.segment_ends(r, self.separator_ids) for r in responses]
      rows = [b for b, e in enumerate(ends) for _ in e]
      prefixes = [responses[b][: t + 1] for b, e in enumerate(ends) for t in e]
    else:
      ends, rows, prefixes = None, list(range(len(cut))), responses
    flat = self._model_or_oracle_scores(
      prompts, rows, prefixes, images, iteration, texts if ends is None else None
    )
    dense = np.zeros(r_mask.shape, np.float32)
    if ends is None:
      rm_scores = flat
    else:
      splits = np.cumsum([len(e) for e in ends])[:-1]
      per_row = np.split(flat, splits)
      rm_scores = np.array([s[-1] for s in per_row], np.float32)
      dense = rewards.segment_rewards(per_row, ends, ppo.max_new_tokens)
      timings["reward/segments"] = float(np.mean([len(e) for e in ends]))
    parts = rewards.sequence_scores(
      rm_scores, texts, r_mask.sum(1), np.array([c.has_stop for c in cut]),
      np.array([p.caption_type for p in prompts]), np.array([p.length_bonus for p in prompts]),
      ppo.max_new_tokens, self.symbolic,
    )  # fmt: skip
    timings["time/scoring"] = time.perf_counter() - t1
    scores = parts["score"]
    if ppo.prompt_baseline:
      scores = np.asarray(ppo_math.leave_one_out_scores(scores, ppo.samples_per_prompt))
    # What the segments did not already pay (symbolic terms, the baseline) goes at the end.
    adv = jax.device_get(
      self._advantages(
        old_logps,
        ref_logps,
        values,
        scores - dense.sum(1),
        r_mask.astype(np.float32),
        dense,
        np.float32(kl_coef),
      )
    )
    batch.update(
      old_logps=old_logps.astype(np.float32), old_values=values.astype(np.float32),
      advantages=np.asarray(adv["advantages"]), returns=np.asarray(adv["returns"]),
    )  # fmt: skip
    metrics = {
      "reward/score": float(parts["score"].mean()),
      "reward/rm": float(parts["rm_score"].mean()),
      "reward/correct": float(parts["correct"].mean()),
      "reward/missing_stop": float(parts["missing_stop"].mean()),
      "kl": float(np.mean(adv["kl_per_sequence"])),
      "kl_coef": float(kl_coef),
      "response_tokens": float(r_mask.sum(1).mean()),
      **timings,
    }
    monitor = oracles.monitor_for(prompts) if ppo.reward_source == "model" else None
    if monitor is not None:
      metrics.update(
        oracles.monitor(monitor, prompts, texts, parts["rm_score"], ppo, ppo.samples_per_prompt)
      )
    return batch, metrics, texts

  def _decode(self, tokens: Sequence[int]) -> str:
    """A response's text: its tokens without the stop token."""
    return self.tokenizer.decode(
      [t for t in tokens if t not in self.stop_ids], skip_special_tokens=True
    )

  def _model_or_oracle_scores(
    self,
    prompts,
    rows: Sequence[int],
    responses: Sequence[Sequence[int]],
    images: dict[str, np.ndarray],
    iteration,
    texts: Sequence[str] | None = None,
  ) -> np.ndarray:
    """The score of each response (token ids) to prompts[rows[i]]: [len(responses)], by the
    reward model or the oracle ppo.reward_source names. `images`: the prompts' image fields
    (`_image_fields`). `texts`: the responses already decoded, when the caller has them (an
    oracle reads text)."""
    if self.ppo.reward_source != "model":
      if texts is None:
        texts = [self._decode(r) for r in responses]
      oracle = oracles.get(self.ppo.reward_source)
      return oracles.score(oracle, [prompts[b] for b in rows], texts, self.ppo)
    return self._score(prompts, rows, responses, images, iteration)

  def _score(self, prompts, rows, responses, images, iteration: int) -> np.ndarray:
    """RM(query + response + evaluation prompt): facts shuffled per prompt and iteration
    (the prefixes of one response share its order, so their differences carry no shuffle)."""
    rng = np.random.default_rng([self.config.seed, iteration, 17])
    ids_rows = reward_rows(prompts, rows, responses, self.rm, self.tokenizer, self.template, rng)
    length = sampling.bucket_length(max(len(r) for r in ids_rows), tuple(self.ppo.reward_buckets))
    ids, mask = right_pad(ids_rows, length, self.tokenizer.pad_token_id)
    batch = {"input_ids": ids, "attention_mask": mask}
    # The reward model reads each row's prompt image: its tiles and plan (anyres) as well.
    batch.update({k: v[np.asarray(rows)] for k, v in images.items()})
    return forward_chunks(
      lambda b: self._scores(self.rm.backbone, self.rm.head, b),
      batch, self.ppo.forward_batch_size, self.mesh,
    )  # fmt: skip


def plain_or(model: Llava, variables: dict) -> Llava:
  """The model to apply `variables` with: the LoRA model when they carry adapters."""
  return model if "lora" in variables else Llava(model.config.with_runtime(lora=None))


# --------------------------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------------------------


def build_state(
  config, policy_model, value_model, value_head, rm: RewardModel, mesh, rules, source
):
  """(state, shardings, tx, frozen, frozen shardings) before any workdir restore."""
  p_shards = state_lib.param_shardings(policy_model, mesh, rules)
  initial = modelling.initial_params(policy_model, config, source, None, p_shards)
  frozen = {"policy_base": None, "reference": None, "value_base": None}
  frozen_shards = dict(frozen)
  if policy_model.config.runtime.lora is None:
    # The reference is a frozen copy of the starting policy (with LoRA: the base itself).
    frozen["reference"], frozen_shards["reference"] = initial, p_shards
    initial = jax.tree.map(jnp.copy, initial)
  policy, p_shards, frozen["policy_base"], frozen_shards["policy_base"] = modelling.with_lora_split(
    policy_model, initial, p_shards, mesh, rules, jax.random.key(config.seed)
  )
  v_shards = state_lib.param_shardings(value_model, mesh, rules)
  rm_backbone = jax.device_put(
    rm.backbone, state_lib.param_shardings(Llava(rm.model.config), mesh, rules)
  )
  if value_model.config.runtime.lora is None:
    rm_backbone = jax.tree.map(jnp.copy, rm_backbone)  # trained: a copy, the RM stays as is
  value_backbone, v_shards, frozen["value_base"], frozen_shards["value_base"] = (
    modelling.with_lora_split(
      value_model, rm_backbone, v_shards, mesh, rules, jax.random.key(config.seed + 1)
    )
  )
  head, h_shards = state_lib.init_head(
    value_head, value_model.config.text.hidden_size, mesh, rules, jax.random.key(config.seed + 2)
  )
  params = {"policy": policy, "value": {"backbone": value_backbone, "head": head}}
  shards = {"policy": p_shards, "value": {"backbone": v_shards, "head": h_shards}}
  # The schedule counts optimizer updates: noptepochs x minibatches per iteration.
  trainable_params, _ = optim.split_trainable(params, tuple(config.trainable))
  optim.check_patterns_match(params, tuple(config.trainable), "config.trainable")
  tx = optim.build_optimizer(
    config.optim, trainable_params, config.total_steps * updates_per_iteration(config.ppo)
  )
  state, state_shards = state_lib.create_train_state(
    params, shards, tx, tuple(config.trainable), config.seed, mesh, config.optim.state_dtype
  )
  return state, state_shards, tx, frozen, frozen_shards


def reward_and_value_models(ppo, policy_config) -> tuple[RewardModel, Llava, ScalarHead]:
  """The frozen reward model (ppo.reward_model, checked against the policy) and the value
  model built on its backbone, with the policy's LoRA."""
  rm = load_reward_model(
    ppo.reward_model, runtime=dataclasses.replace(policy_config.runtime, lora=None)
  )
  if ppo.fact_augmented != rm.fact_augmented:
    raise ValueError(
      f"ppo.fact_augmented={ppo.fact_augmented} but {ppo.reward_model} was trained with "
      f"fact_augmented={rm.fact_augmented}"
    )
  if rm.model.config.text.vocab_size != policy_config.text.vocab_size:
    raise ValueError("the reward model and the policy must share a tokenizer (vocab sizes differ)")
  value_model = Llava(rm.model.config.with_runtime(lora=policy_config.runtime.lora))
  return rm, value_model, ScalarHead(zero_init=ppo.value_head_zero_init)


def check_reward_model_images(config: ml_collections.ConfigDict, policy_config, rm) -> None:
  """Refuses a reward model that would read images otherwise than the policy, naming the fields.

  The reward model scores the policy's rows, and the value model (its backbone) reads them in
  the update step itself, where a second copy of every row with the RM's own placeholder count
  and tiles would double the step's largest inputs. So both take the policy's placeholders,
  tiles and pack plan, and must agree on: image_token_id, num_image_tokens, anyres, and for an
  anyres pair the packing (pinpoints, tile and patch size, anyres_max_N) and the image
  processor of the two folders' preprocessor_config.json (resizing, crop, normalisation).
  LLaVA-RLHF's reward model starts from the policy's own SFT model, so they agree.
  """
  p, r = policy_config, rm.model.config
  if p.vision is None and r.vision is None:
    return
  checks = [("vision", p.vision is not None, r.vision is not None)]
  if p.vision is not None and r.vision is not None:
    checks += [
      ("image_token_id", p.image_token_id, r.image_token_id),
      ("num_image_tokens", p.num_image_tokens, r.num_image_tokens),
      ("anyres", p.anyres, r.anyres),
    ]
  differ = [f"{name} (policy {a!r}, reward model {b!r})" for name, a, b in checks if a != b]
  if not differ and p.anyres:
    for field in dataclasses.fields(p.packing):
      a, b = getattr(p.packing, field.name), getattr(r.packing, field.name)
      if a != b:
        differ.append(f"packing.{field.name} (policy {a!r}, reward model {b!r})")
    rm_config = ml_collections.ConfigDict(config.to_dict())
    rm_config.init_from = config.ppo.reward_model
    mine = sources.image_config_for(config, p)
    theirs = sources.image_config_for(rm_config, r)
    for field in dataclasses.fields(AnyresImageConfig):
      a, b = getattr(mine, field.name), getattr(theirs, field.name)
      if field.name != "processor_type" and a != b:  # the class name alone changes nothing
        differ.append(f"image processor {field.name} (policy {a!r}, reward model {b!r})")
  if differ:
    raise ValueError(
      f"ppo.reward_model={config.ppo.reward_model}: the reward and value models read the "
      f"policy's image placeholders and tiles, so they must process images as the policy "
      f"({config.init_from}) does; these differ: {'; '.join(differ)}"
    )


def restore_policy(
  config: ml_collections.ConfigDict, workdir: str, policy_model: Llava
) -> tuple[Any, Any, int]:
  """(policy params, their frozen base or None, step) of the run's latest checkpoint, on one
  device: `lmm-align export` of a PPO run writes the policy (the value model is dropped). The
  state is rebuilt as the run built it, so the reward model folder must still be there."""
  rm, value_model, value_head = reward_and_value_models(config.ppo, policy_model.config)

  def build(mesh, rules):
    state, state_shards, _, frozen, _ = build_state(
      config, policy_model, value_model, value_head, rm, mesh, rules, "init_from"
    )
    return state, state_shards, frozen["policy_base"]

  state, base, step = export.restore_latest(config, workdir, build)
  return state.params["policy"], base, step


def rollout_prompts(data: PromptData, iteration: int, ppo) -> list[Prompt]:
  """The iteration's rollout rows: rollout_batch_size / samples_per_prompt prompts, each
  repeated samples_per_prompt times in consecutive rows (rows draw their own PRNG keys)."""
  k = ppo.samples_per_prompt
  return [p for p in data.batch(iteration, ppo.rollout_batch_size // k) for _ in range(k)]


def updates_per_iteration(ppo) -> int:
  if ppo.rollout_batch_size % ppo.step_batch_size:
    raise ValueError("ppo.rollout_batch_size must be a multiple of ppo.step_batch_size")
  return ppo.noptepochs * (ppo.rollout_batch_size // ppo.step_batch_size)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs PPO for config.total_steps iterations (rollout + updates); summary.json as SFT/DPO."""
  ppo = config.ppo
  if not config.init_from or not ppo.reward_model:
    raise ValueError(
      "PPO needs config.init_from (the SFT policy) and ppo.reward_model (an RM folder)"
    )
  if ppo.reward_source != "model" and ppo.reward_source not in oracles.names():
    raise ValueError(
      f"ppo.reward_source={ppo.reward_source!r}: use 'model' (the reward model) or a "
      f"registered oracle: {', '.join(oracles.names())}"
    )
  if ppo.samples_per_prompt < 1 or ppo.rollout_batch_size % ppo.samples_per_prompt:
    raise ValueError(
      f"ppo.samples_per_prompt={ppo.samples_per_prompt} must divide ppo.rollout_batch_size="
      f"{ppo.rollout_batch_size}"
    )
  if ppo.prompt_baseline and ppo.samples_per_prompt < 2:
    raise ValueError("ppo.prompt_baseline needs ppo.samples_per_prompt >= 2")
  if ppo.dense_reward not in ("none", "segments"):
    raise ValueError(f"ppo.dense_reward={ppo.dense_reward!r}: use 'none' or 'segments'")
  if ppo.dense_reward == "segments" and not ppo.segment_separators:
    raise ValueError("ppo.dense_reward=segments needs ppo.segment_separators (e.g. ',', '.')")
  if ppo.kl_target < 0 or (ppo.kl_target > 0 and ppo.kl_horizon <= 0):
    raise ValueError(
      f"ppo.kl_target={ppo.kl_target} (0 = a fixed kl_coef) must be >= 0, and "
      f"ppo.kl_horizon={ppo.kl_horizon} > 0 when it is set"
    )
  if not 0.0 <= ppo.yes_no_fraction <= 1.0:
    raise ValueError(f"ppo.yes_no_fraction={ppo.yes_no_fraction} must be in [0, 1]")
  run = run_setup.start_run(config, workdir)
  mesh, tokenizer, checkpointer = run.mesh, run.tokenizer, run.checkpointer
  groups = sharding.data_parallel_size(mesh) * config.optim.grad_accum_steps
  if ppo.step_batch_size % groups:
    raise ValueError(
      f"ppo.step_batch_size={ppo.step_batch_size} must divide by data x fsdp "
      f"({sharding.data_parallel_size(mesh)}) x optim.grad_accum_steps "
      f"({config.optim.grad_accum_steps})"
    )
  policy_config = run.model_config
  policy_model = Llava(policy_config)
  rm, value_model, value_head = reward_and_value_models(ppo, policy_config)
  image_config, tiling = sources.image_batching(config, policy_config)
  check_reward_model_images(config, policy_config, rm)
  data = prompt_data(config, tokenizer, policy_config, tiling)
  per_iteration = updates_per_iteration(ppo)

  with run.activation_sharding():
    state, state_shards, tx, frozen, frozen_shards = build_state(
      config, policy_model, value_model, value_head, rm, mesh, run.rules, run.source
    )
    state, saved = run_setup.restore_state(run, state, state_shards, data.fingerprint())
    kl_coef = ppo.kl_coef
    if run.restores and ppo.kl_target > 0:
      kl_coef = float(saved.get("kl_coef", kl_coef))  # a restart goes on with the one reached
    start = int(state.step) // per_iteration
    print(
      f"[ppo] start at iteration {start} from {run.source}; {len(data)} prompts, {dict(data.stats)}"
    )
    step_fn = jax.tree_util.Partial(
      ppo_train_step, policy_model=policy_model, value_model=value_model, value_head=value_head,
      tx=tx, trainable=tuple(config.trainable), ppo=ppo, state_dtype=config.optim.state_dtype,
      grad_accum_steps=config.optim.grad_accum_steps,
    )  # fmt: skip
    # The frozen params are passed at each call (`update(state, batch, frozen)`), not bound.
    update = state_lib.jit_train_step(
      lambda s, b, f: step_fn(s, b, f), state_shards, mesh,
      {k: frozen_shards[k] for k in ("policy_base", "value_base")},
    )  # fmt: skip
    rollouts = Rollouts(
      config, tokenizer, policy_model, value_model, value_head, rm, image_config, mesh, tiling
    )
    state = _run_iterations(
      config, workdir, mesh, state, data, rollouts, update, frozen, checkpointer, start, kl_coef
    )
    summary = {
      "final_iteration": config.total_steps,
      "data": {k: int(v) for k, v in data.stats.items()},  # kept, and skipped by reason
    }
    if eval_registry.active_kind(config) != eval_registry.NONE:
      policy = rollouts.sampling_params(state.params, frozen)
      summary.update(eval_registry.evaluate(config, workdir, policy))
  loop.write_json(os.path.join(workdir, "summary.json"), summary)
  checkpointer.close()
  return summary


def _run_iterations(
  config, workdir, mesh, state, data, rollouts, update, frozen, checkpointer, start, kl_coef
):
  ppo = config.ppo
  update_frozen = {k: frozen[k] for k in ("policy_base", "value_base")}
  logger = loop.MetricLogger(workdir, config.total_steps, start)
  fingerprint = data.fingerprint()
  key = jax.random.key(config.seed)
  saved = start
  try:
    with loop.PreemptionGuard() as guard:
      for iteration in range(start, config.total_steps):
        prompts = rollout_prompts(data, iteration, ppo)
        batch, metrics, _ = rollouts.collect(
          state.params, frozen, prompts, jax.random.fold_in(key, iteration), iteration, kl_coef
        )
        if ppo.kl_target > 0:
          kl_coef = ppo_math.adaptive_kl_coef(
            kl_coef, metrics["kl"], ppo.kl_target, ppo.kl_horizon, len(prompts)
          )
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        n = len(prompts)
        for epoch in range(ppo.noptepochs):
          order = np.random.default_rng([config.seed, iteration, epoch]).permutation(n)
          for s in range(0, n, ppo.step_batch_size):
            rows = order[s : s + ppo.step_batch_size]
            minibatch = sharding.global_batch_from_local(
              {k: v[rows] for k, v in batch.items()}, mesh
            )
            state, step_metrics = update(state, minibatch, update_frozen)
            for k, v in jax.device_get(step_metrics).items():
              sums[k] = sums.get(k, 0.0) + float(v)
        updates = updates_per_iteration(ppo)
        metrics.update({k: v / updates for k, v in sums.items() if k != "input_tokens"})
        metrics["time/update"] = time.perf_counter() - t0
        loop.check_finite(iteration, {"loss": metrics["loss"], "grad_norm": metrics["grad_norm"]})
        done = iteration + 1
        if done % config.log_every == 0 or done == config.total_steps:
          logger.write(done, metrics)
        shown = ("reward/score", "kl", "response_tokens", "time/rollout", "time/scoring")
        logger.progress(
          done, {**{k: metrics[k] for k in shown}, "time/update": metrics["time/update"]}
        )
        data_state = {"step": int(state.step), **fingerprint, "kl_coef": kl_coef}
        if done % config.checkpoint_every == 0 or done == config.total_steps:
          checkpointer.save(int(state.step), state, data_state)
          saved = done
        if guard.should_stop():
          if saved != done:
            checkpointer.save(int(state.step), state, data_state, force=True)
          checkpointer.close()
          print(f"[ppo] preempted: saved iteration {done}, exiting")
          raise SystemExit(0)
  finally:
    logger.close()
  checkpointer.wait()
  return state


registry.register(registry.Trainer("ppo", train, restore_policy=restore_policy))
