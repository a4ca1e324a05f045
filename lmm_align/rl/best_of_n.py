"""Best-of-N at inference: sample N answers per prompt, keep the one a scorer rates highest.

Three steps, each usable alone:

  candidates = sample_candidates(model, params, prompts, tokenizer, n=4, settings=..., rng=key)
  scores = scorer(prompts, candidates)              # float [P, N]
  results = select_best(prompts, candidates, scores)

`best_of_n` runs the three. Keeping them apart lets one set of candidates be judged by several
scorers (the shapes experiment compares a reward model with the DPO implicit reward on the
same samples).

Sampling. Prompt p's N candidates are one `sampling.generate` call of N copies of the prompt,
drawn with the key `jax.random.fold_in(rng, p)`: a prompt's candidates depend on its key and
position only, never on the other prompts, and N = 1 is exactly plain sampling with that key.

Scorers (any `Scorer` works, e.g. a stub in tests):
  * `RewardModelScorer`: an exported reward model (`hf.reward.RewardModel`) on
    `query + response + evaluation request`, read at the last real token, as PPO scores its
    rollouts (`rl.scoring.reward_scores`). A fact-augmented model lists the prompt's facts in
    the request: the N candidates of a prompt share one shuffle of the facts, so their
    scores differ by the answers alone.
  * `ImplicitRewardScorer`: RLAIF-V's inference-time ranking, the DPO implicit reward
    normalised by length, r(x, y) = (beta / T) * (log pi_theta(y|x) - log pi_ref(y|x)), with
    T the response's token count.
A response's tokens are the sampled ids, its stop token included when it stopped (DPO's
labels and PPO's reward both include the answer's end token), so T >= 1.

Both scorers run jitted forwards in fixed-shape chunks: rows sorted by length, right-padded to
a length bucket, `batch_size` rows per call (a short last chunk is filled with copies), so a
whole run compiles once per bucket. Images go row-aligned ([B, 1, H, W, 3]), so each row's
placeholders take its own image's features whatever the other rows hold.

A candidate that contains the image placeholder id cannot be scored faithfully (the sampler fed
that token's embedding; a scoring forward would splice an image feature there): it is scored
-inf, and so is never chosen while another candidate has a finite score. Selection takes the
highest score, the first candidate on ties; a NaN score is an error naming the prompt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from lmm_align import preference_losses, sampling
from lmm_align.data import reward_data
from lmm_align.hf.reward import RewardModel
from lmm_align.losses import IGNORE_INDEX
from lmm_align.models.config import ModelConfig
from lmm_align.models.heads import ScalarHead
from lmm_align.models.llava import Llava
from lmm_align.rl.scoring import query_ids, reward_scores

DEFAULT_SCORE_BATCH = 8

# --------------------------------------------------------------------------------------------
# Prompts, candidates, results.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BestOfNPrompt:
  """One prompt to answer N times.

  prompt_id: named in errors and results.
  input_ids: int [T], a generation prompt ending with the assistant's turn
    (`conversation.encode_generation_prompt`), image placeholders expanded.
  pixel_values: float32 [H, W, 3], the preprocessed image (`images.preprocess_image`), or None.
  facts: captions of the image; required by a fact-augmented reward model.
  question: the question's text; required by a reward model that reads its facts under the
    question (`facts_position="before_response"`), which re-encodes its query from it.
  """

  prompt_id: str
  input_ids: np.ndarray
  pixel_values: np.ndarray | None = None
  facts: tuple[str, ...] = ()
  question: str | None = None


@dataclasses.dataclass(frozen=True)
class Candidates:
  """N sampled responses to each of P prompts.

  tokens[p][k]: response ids, the stop token included when the row stopped.
  texts[p][k]: decoded without the stop token and special tokens, stripped.
  stopped: bool [P, N], whether each response ended on a stop token.
  """

  tokens: list[list[list[int]]]
  texts: list[list[str]]
  stopped: np.ndarray

  @property
  def shape(self) -> tuple[int, int]:
    """(P, N)."""
    return (len(self.tokens), len(self.tokens[0]) if self.tokens else 0)


@dataclasses.dataclass(frozen=True)
class BestOfN:
  """The choice for one prompt: candidates[chosen_index] scored highest (first on ties)."""

  prompt_id: str
  chosen_index: int
  chosen_text: str
  candidates: list[str]
  scores: np.ndarray  # float [N]


# Scores [P, N] of every candidate of every prompt.
Scorer = Callable[[Sequence[BestOfNPrompt], Candidates], np.ndarray]


def prompt_key(rng: jax.Array | None, index: int) -> jax.Array | None:
  """The sampling key of prompt `index` (None stays None: greedy needs no key)."""
  return None if rng is None else jax.random.fold_in(rng, index)


def _plain(model: Llava) -> Llava:
  """The model without LoRA adapters: params here are full (merged) params."""
  return Llava(model.config.with_runtime(lora=None))


def sample_candidates(
  model: Llava,
  params: Any,
  prompts: Sequence[BestOfNPrompt],
  tokenizer: Any,
  *,
  n: int,
  settings: sampling.SamplingSettings,
  rng: jax.Array | None,
  buckets: Sequence[int] | None = None,
) -> Candidates:
  """N responses per prompt: one `generate` call of N rows per prompt, key `prompt_key(rng, p)`.

  params: the policy's full params (LoRA adapters merged). settings: as `generate` takes;
  greedy settings need n == 1 (N greedy rows would be N copies). buckets: prompt length buckets.
  """
  if n < 1:
    raise ValueError(f"n={n} must be >= 1")
  if settings.greedy and n > 1:
    raise ValueError(f"greedy settings give {n} identical candidates: use temperature > 0")
  model = _plain(model)
  tokens, texts, stopped = [], [], []
  for index, prompt in enumerate(prompts):
    pixels = None if prompt.pixel_values is None else np.repeat(prompt.pixel_values[None], n, 0)
    out = sampling.generate(
      model, params, [prompt.input_ids] * n, pixels, settings=settings,
      rng=prompt_key(rng, index), pad_id=tokenizer.pad_token_id, buckets=buckets,
    )  # fmt: skip
    tokens.append(out.token_lists(strip_stop=False))
    texts.append([tokenizer.decode(t, skip_special_tokens=True).strip() for t in out.token_lists()])
    stopped.append(np.asarray(out.stopped, bool))
  return Candidates(tokens, texts, np.asarray(stopped, bool).reshape(len(prompts), n))


def select_best(
  prompts: Sequence[BestOfNPrompt], candidates: Candidates, scores: np.ndarray
) -> list[BestOfN]:
  """Per prompt, the highest-scored candidate (the first on ties). scores: float [P, N]."""
  scores = np.asarray(scores, np.float64)
  if len(prompts) != candidates.shape[0] or scores.shape != candidates.shape:
    raise ValueError(
      f"{len(prompts)} prompts, candidates {candidates.shape} and scores {scores.shape} "
      "must agree as [P, N]"
    )
  results = []
  for p, prompt in enumerate(prompts):
    if np.isnan(scores[p]).any():
      bad = np.flatnonzero(np.isnan(scores[p])).tolist()
      raise ValueError(f"prompt {prompt.prompt_id!r}: candidates {bad} have a NaN score")
    best = int(np.argmax(scores[p]))  # argmax returns the first maximum
    texts = candidates.texts[p]
    results.append(BestOfN(prompt.prompt_id, best, texts[best], list(texts), scores[p].copy()))
  return results


def best_of_n(
  model: Llava,
  params: Any,
  prompts: Sequence[BestOfNPrompt],
  tokenizer: Any,
  scorer: Scorer,
  *,
  n: int,
  settings: sampling.SamplingSettings,
  rng: jax.Array | None,
  buckets: Sequence[int] | None = None,
) -> list[BestOfN]:
  """`sample_candidates`, then `scorer`, then `select_best`: one result per prompt."""
  candidates = sample_candidates(
    model, params, prompts, tokenizer, n=n, settings=settings, rng=rng, buckets=buckets
  )
  return select_best(prompts, candidates, scorer(prompts, candidates))


# --------------------------------------------------------------------------------------------
# Row scoring in fixed-shape chunks.
# --------------------------------------------------------------------------------------------

# Pixels of one row: an array, a zero-argument loader of one (read per chunk, so a large
# set never holds every image at once), or None for a text-only row.
RowPixels = np.ndarray | Callable[[], np.ndarray] | None


def _check_rows(config: ModelConfig, rows: Sequence[np.ndarray], pixels: Sequence[RowPixels]):
  """Host-side checks jit cannot make: ids in the vocabulary, one image's placeholders."""
  if len(rows) != len(pixels):
    raise ValueError(f"{len(rows)} rows but {len(pixels)} pixel entries")
  for i, (row, image) in enumerate(zip(rows, pixels)):
    if len(row) == 0 or row.min() < 0 or row.max() >= config.text.vocab_size:
      raise ValueError(
        f"row {i}: empty, or ids outside the vocabulary [0, {config.text.vocab_size})"
      )
    if config.vision is None:
      if image is not None:
        raise ValueError(f"row {i}: an image for a text-only model")
      continue
    found = int(np.sum(row == config.image_token_id))
    expected = 0 if image is None else config.num_image_tokens
    if found != expected:
      raise ValueError(
        f"row {i}: {found} image placeholder ids ({config.image_token_id}), expected {expected}"
      )


def _chunk_pixels(config: ModelConfig, pixels: Sequence[RowPixels]) -> np.ndarray | None:
  """Row-aligned float32 [B, 1, H, W, 3]; rows without an image get a zero slot."""
  if config.vision is None:
    return None
  side = config.vision.image_size
  out = np.zeros((len(pixels), 1, side, side, 3), np.float32)
  for i, image in enumerate(pixels):
    if image is None:
      continue
    array = np.asarray(image() if callable(image) else image, np.float32)
    if array.shape != (side, side, 3):
      raise ValueError(f"pixel values {array.shape}, the vision tower takes ({side}, {side}, 3)")
    out[i, 0] = array
  return out


def _right_pad(rows: Sequence[np.ndarray], length: int, pad_id: int, labels_from: Sequence[int]):
  """(input_ids, attention_mask, labels) int32 [B, length]; labels hold the ids from position
  labels_from[b] of each row (the response) and IGNORE_INDEX elsewhere."""
  ids = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  labels = np.full((len(rows), length), IGNORE_INDEX, np.int32)
  for b, (row, start) in enumerate(zip(rows, labels_from)):
    ids[b, : len(row)] = row
    mask[b, : len(row)] = 1
    labels[b, start : len(row)] = row[start:]
  return ids, mask, labels


def score_rows_in_chunks(
  fn: Callable[[dict[str, Any]], jax.Array],
  config: ModelConfig,
  rows: Sequence[Sequence[int]],
  pixels: Sequence[RowPixels],
  *,
  pad_id: int,
  batch_size: int = DEFAULT_SCORE_BATCH,
  buckets: Sequence[int] | None = None,
  labels_from: Sequence[int] | None = None,
) -> np.ndarray:
  """fn(batch) -> [B] over all rows in fixed-shape chunks; float32 [R] in the rows' order.

  Rows are sorted by length so a chunk shares a bucket (`sampling.bucket_length`); each chunk
  has exactly `batch_size` rows (a short one is filled with copies of its last row). batch:
  {"input_ids", "attention_mask", "labels"} int32 [B, L] and "pixel_values" [B, 1, H, W, 3]
  for a vision model. labels_from[r]: where row r's labelled part starts (default: nowhere).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1")
  rows = [np.asarray(r, np.int64) for r in rows]
  _check_rows(config, rows, pixels)
  starts = [len(r) for r in rows] if labels_from is None else list(labels_from)
  order = np.argsort([len(r) for r in rows], kind="stable")
  out = np.zeros(len(rows), np.float32)
  for begin in range(0, len(rows), batch_size):
    chosen = order[begin : begin + batch_size]
    filled = np.concatenate([chosen, np.full(batch_size - len(chosen), chosen[-1])])
    length = sampling.bucket_length(max(len(rows[i]) for i in filled), buckets)
    ids, mask, labels = _right_pad(
      [rows[i] for i in filled], length, pad_id, [starts[i] for i in filled]
    )
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    chunk_pixels = _chunk_pixels(config, [pixels[i] for i in filled])
    if chunk_pixels is not None:
      batch["pixel_values"] = chunk_pixels
    values = np.asarray(jax.device_get(fn(batch)), np.float32)
    out[chosen] = values[: len(chosen)]
  return out


def _rm_scores(model: Llava, backbone: Any, head: Any, batch: dict) -> jax.Array:
  return reward_scores(model, ScalarHead(), backbone, head, batch)


def _summed_logps(model: Llava, params: Any, batch: dict) -> jax.Array:
  """sum_t log pi(labelled token t | its prefix) per row: float32 [B]."""
  logits = model.apply(
    {"params": params},
    batch["input_ids"],
    pixel_values=batch.get("pixel_values"),
    attention_mask=batch["attention_mask"],
  ).logits
  return preference_losses.sequence_logps(logits, batch["labels"])


def _log_ratios(model: Llava, policy: Any, reference: Any, batch: dict) -> jax.Array:
  """log pi_theta(y|x) - log pi_ref(y|x) per row: float32 [B] (two forwards, one call)."""
  return _summed_logps(model, policy, batch) - _summed_logps(model, reference, batch)


# Jitted once per process; the model (hashable, compared by config) is static.
_jit_rm_scores = jax.jit(_rm_scores, static_argnums=0)
_jit_log_ratios = jax.jit(_log_ratios, static_argnums=0)


def reward_model_scores(
  rm: RewardModel,
  rows: Sequence[Sequence[int]],
  pixels: Sequence[RowPixels],
  *,
  pad_id: int,
  batch_size: int = DEFAULT_SCORE_BATCH,
  buckets: Sequence[int] | None = None,
) -> np.ndarray:
  """The reward model's score of each full row (conversation + response + evaluation request,
  e.g. `reward_data.encode_reward_sequence`), read at its last token: float32 [R]."""
  model = _plain(rm.model)
  return score_rows_in_chunks(
    lambda batch: _jit_rm_scores(model, rm.backbone, rm.head, batch), model.config, rows, pixels,
    pad_id=pad_id, batch_size=batch_size, buckets=buckets,
  )  # fmt: skip


def implicit_rewards(
  model: Llava,
  policy_params: Any,
  reference_params: Any,
  prompts: Sequence[Sequence[int]],
  responses: Sequence[Sequence[int]],
  pixels: Sequence[RowPixels],
  *,
  beta: float,
  pad_id: int,
  batch_size: int = DEFAULT_SCORE_BATCH,
  buckets: Sequence[int] | None = None,
) -> np.ndarray:
  """Length-normalised DPO implicit reward of each (prompt, response): float [R].

      r = (beta / T) * (sum_t log pi_theta(y_t | x, y_<t) - sum_t log pi_ref(y_t | x, y_<t))

  T = len(response) >= 1. Both sums come from one jitted call per chunk.
  """
  if any(len(r) == 0 for r in responses):
    raise ValueError("an empty response has no implicit reward (T = 0)")
  model = _plain(model)
  log_ratios = score_rows_in_chunks(
    lambda batch: _jit_log_ratios(model, policy_params, reference_params, batch), model.config,
    [list(p) + list(r) for p, r in zip(prompts, responses)], pixels, pad_id=pad_id,
    batch_size=batch_size, buckets=buckets, labels_from=[len(p) for p in prompts],
  )  # fmt: skip
  lengths = np.array([len(r) for r in responses], np.float64)
  return beta / lengths * log_ratios.astype(np.float64)


# --------------------------------------------------------------------------------------------
# Scorers of candidates.
# --------------------------------------------------------------------------------------------


def _scorable(config: ModelConfig, candidates: Candidates) -> list[tuple[int, int]]:
  """(prompt, candidate) pairs whose response holds no image placeholder id (see the module
  docstring); the rest are scored -inf."""
  blocked = config.image_token_id if config.vision is not None else None
  return [
    (p, k)
    for p, rows in enumerate(candidates.tokens)
    for k, tokens in enumerate(rows)
    if blocked is None or blocked not in tokens
  ]


def _scatter(shape: tuple[int, int], where: list[tuple[int, int]], values: np.ndarray):
  out = np.full(shape, -np.inf)
  for (p, k), v in zip(where, values):
    out[p, k] = v
  return out


class RewardModelScorer:
  """Scores candidates with an exported reward model, as PPO scores rollouts.

  rm: the reward model; it reads the policy's prompt ids (or, when it reads its facts under
    the question, the prompt re-encoded with them) and preprocessed image, so it must share
    the policy's tokenizer, image placeholders and image preprocessing.
  tokenizer: encodes the evaluation request (`reward_data.suffix_ids`) and such a query.
  fact_seed: prompt p's facts are shuffled by `default_rng([fact_seed, p])`.
  lead_in: the sentence above the facts (`reward_data.fact_block`); None: the one the reward
    model was trained with (`rm.fact_lead_in`).
  template: the chat template of the policy's prompts, for an RM that reads its facts under
    the question (its query is the prompt re-encoded with them).
  """

  def __init__(
    self,
    rm: RewardModel,
    tokenizer: Any,
    *,
    fact_seed: int = 0,
    batch_size: int = DEFAULT_SCORE_BATCH,
    buckets: Sequence[int] | None = None,
    lead_in: str | None = None,
    template: str = "vicuna_v1",
  ):
    self.rm, self.tokenizer, self.template = rm, tokenizer, template
    self.fact_seed, self.batch_size, self.buckets, self.lead_in = (
      fact_seed,
      batch_size,
      buckets,
      rm.fact_lead_in if lead_in is None else lead_in,
    )
    self.fact_augmented = rm.fact_augmented

  def query_and_suffix(self, prompt: BestOfNPrompt, index: int) -> tuple[list[int], list[int]]:
    """Prompt `index`'s query as the RM reads it and the evaluation request after its
    responses, shared by its N candidates: one draw of `default_rng([fact_seed, index])` orders
    the facts."""
    if self.rm.fact_augmented and not prompt.facts:
      raise ValueError(
        f"prompt {prompt.prompt_id!r}, field 'facts': none, but the reward model is fact-augmented"
      )
    before = self.rm.fact_augmented and self.rm.facts_position == "before_response"
    if before and prompt.question is None:
      raise ValueError(
        f"prompt {prompt.prompt_id!r}, field 'question': none, but the reward model reads its "
        "facts under the question"
      )
    question, suffix = reward_data.reward_texts(
      prompt.question or "", self.rm.prompt, list(prompt.facts),
      np.random.default_rng([self.fact_seed, index]), fact_augmented=self.rm.fact_augmented,
      facts_position=self.rm.facts_position, lead_in=self.lead_in,
    )  # fmt: skip
    query = list(prompt.input_ids)
    if before:
      query = list(
        query_ids(question, prompt.pixel_values is not None, prompt.prompt_id, self.tokenizer,
                  self.template, self.rm.model.config)
      )  # fmt: skip
    return query, reward_data.suffix_ids(suffix, self.tokenizer, self.template)

  def __call__(self, prompts: Sequence[BestOfNPrompt], candidates: Candidates) -> np.ndarray:
    parts = [self.query_and_suffix(prompt, p) for p, prompt in enumerate(prompts)]
    where = _scorable(self.rm.model.config, candidates)
    rows = [parts[p][0] + candidates.tokens[p][k] + parts[p][1] for p, k in where]
    scores = reward_model_scores(
      self.rm, rows, [prompts[p].pixel_values for p, _ in where],
      pad_id=self.tokenizer.pad_token_id, batch_size=self.batch_size, buckets=self.buckets,
    )  # fmt: skip
    return _scatter(candidates.shape, where, scores)


class ImplicitRewardScorer:
  """Scores candidates by (beta / T) * log pi_theta(y|x) / pi_ref(y|x) (RLAIF-V's BoN).

  model: the policy's architecture; policy_params, reference_params: full params of the
  aligned policy and of its reference (the model DPO started from).
  """

  def __init__(
    self,
    model: Llava,
    policy_params: Any,
    reference_params: Any,
    *,
    pad_id: int,
    beta: float = 0.1,
    batch_size: int = DEFAULT_SCORE_BATCH,
    buckets: Sequence[int] | None = None,
  ):
    if beta <= 0:
      raise ValueError(f"beta={beta} must be > 0")
    self.model, self.policy_params, self.reference_params = model, policy_params, reference_params
    self.pad_id, self.beta, self.batch_size, self.buckets = pad_id, beta, batch_size, buckets

  def __call__(self, prompts: Sequence[BestOfNPrompt], candidates: Candidates) -> np.ndarray:
    where = _scorable(self.model.config, candidates)
    scores = implicit_rewards(
      self.model, self.policy_params, self.reference_params,
      [prompts[p].input_ids for p, _ in where], [candidates.tokens[p][k] for p, k in where],
      [prompts[p].pixel_values for p, _ in where], beta=self.beta, pad_id=self.pad_id,
      batch_size=self.batch_size, buckets=self.buckets,
    )  # fmt: skip
    return _scatter(candidates.shape, where, scores)
