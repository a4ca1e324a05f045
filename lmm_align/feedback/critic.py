"""LLaVA-Critic pieces: critic prompts, position-debiased pairwise judging, the ordered-pair
reward used to pick DPO pairs, and a pointwise critic reward. (Critic instruction data with
exact labels comes from a world with ground truth: the shapes world plugin's
`critic_records`.)

Prompts. LLaVA-Critic takes "<image>\\n" + a judging prompt and answers with a reason, then a
verdict: "The better response: [first|second]" (or "... equally good" for a tie) pairwise, and
"Final Score: N" pointwise. The builders here use our own wording with the same verdict lines,
so `lmm_align.judges.verdicts` reads the replies. A published prompt is a `PromptTemplate`
with `{placeholder}` fields, loaded from a file or given here: `LLAVA_CRITIC_PAIRWISE` and
`LLAVA_CRITIC_POINTWISE` are the released critic's own.

The released LLaVA-Critic (lmms-lab/llava-critic-7b / -72b, LLaVA-OneVision models) as an
in-process judge: `llava_critic_judge` runs it greedily with its conversation template,
qwen_1_5, on "<image>\n" + one of its prompts; its replies are read by `parse_pairwise` /
`parse_pointwise` whatever format the 113k training data taught it (the last verdict wins).

Pairwise reward (LLaVA-Critic's preference-learning recipe). For K responses y_1..y_K to one
prompt, all K(K-1) ordered pairs are judged. Let a_ij be the credit the critic gives the
SECOND-shown response y_j in the judgment that shows y_i first and y_j second:

    a_ij = 1 (y_j better), 0.5 (tie), 0 (y_i better)

and r_i = sum_{k != i} a_ki - sum_{l != i} a_il: credit y_i earns when shown second, minus the
credit its opponents earn when y_i is shown first. Since the credit of the first-shown response
is 1 - a_il, r_i = sum over the 2(K-1) judgments involving y_i of (credit of y_i - 1/2), which
is how it is computed: an invalid verdict (no verdict parsed, or no reply) is counted and
adds nothing to either response, exactly as a tie would, instead of removing only one of the
two sums' terms. y+ = argmax r, y- = argmin r (ties broken by the lower index); when every
r_i is equal there is no preference and no pair. The paper leaves the a_ij mapping open
(LLaVA-NeXT issue #372); 1 / 0.5 / 0 is this module's choice.

Position bias (MT-Bench's rule). A pair judged in both orders keeps the winner only when both
orders agree; any disagreement is a tie. `aggregate_pairwise(..., debias=True)` applies the
rule to each unordered pair before computing r.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lmm_align.data.anyres import AnyresImageConfig
from lmm_align.data.anyres import image_config_for_model as anyres_image_config_for_model
from lmm_align.data.images import ImageProcessorConfig
from lmm_align.judges.base import Judge, JudgeReply, JudgeRequest
from lmm_align.judges.model import ModelJudge
from lmm_align.judges.verdicts import (
  INVALID,
  PairwiseVerdict,
  PointwiseVerdict,
  parse_pairwise,
  parse_pointwise,
)

IMAGE_PLACEHOLDER = "<image>"
SCORE_SCALES = {"0-100": (0.0, 100.0), "1-10": (1.0, 10.0)}
PAIRWISE_VERDICT_LINES = {
  "first": "The better response: [first]",
  "second": "The better response: [second]",
  "tie": "The two responses are equally good.",
}
VERDICT_CREDIT = {"first": 0.0, "tie": 0.5, "second": 1.0}  # a_ij: credit of the second-shown


def score_scale(scale: str | tuple[float, float]) -> tuple[float, float]:
  """(low, high) of a named scale ("0-100", "1-10") or of a (low, high) pair."""
  if isinstance(scale, str):
    if scale not in SCORE_SCALES:
      raise ValueError(f"unknown score scale {scale!r}; known: {sorted(SCORE_SCALES)}")
    return SCORE_SCALES[scale]
  low, high = (float(v) for v in scale)
  if not low < high:
    raise ValueError(f"score scale needs low < high, got {scale}")
  return low, high


def final_score_line(score: float) -> str:
  return f"Final Score: {score:g}"


# ------------------------------------------------------------------------------------------
# Prompts.
# ------------------------------------------------------------------------------------------

_POINTWISE = (
  "You are checking an answer that an AI assistant gave about the image above. Compare every "
  "statement in the answer with the image: an object that is not there, a wrong colour, count "
  "or position is an error, and so is an answer that does not address the question. Explain "
  "your judgment with specific details from the image. Then, on the last line, give the answer "
  'a score from {low:g} to {high:g} (higher is better), written as "Final Score: N".\n'
  "Question: [{question}]\n"
  "Answer: [{response}]"
)
_PAIRWISE = (
  "You are comparing two answers that AI assistants gave about the image above. Compare every "
  "statement in each answer with the image: an object that is not there, a wrong colour, count "
  "or position is an error, and so is an answer that does not address the question. Do not let "
  "the order or the length of the answers sway you. Explain which answer is better with "
  "specific details from the image. Then, on the last line, write "
  f'"{PAIRWISE_VERDICT_LINES["first"]}" or "{PAIRWISE_VERDICT_LINES["second"]}", or '
  f'"{PAIRWISE_VERDICT_LINES["tie"]}" if neither is better.\n'
  "Question: [{question}]\n"
  "The first response: [{first}]\n"
  "The second response: [{second}]"
)

# Placeholder names a published prompt may use, mapped to our fields: ours, FastChat's
# ({answer}, {answer_a}, {answer_b}) and the LLaVA-Critic model card's notation ({q}, {r}, ...).
_FIELD_ALIASES = {
  "question": "question", "q": "question",
  "response": "response", "answer": "response", "r": "response",
  "first": "first", "answer_a": "first", "response_1": "first", "r1": "first",
  "second": "second", "answer_b": "second", "response_2": "second", "r2": "second",
}  # fmt: skip
_FIELDS = {"pointwise": ("question", "response"), "pairwise": ("question", "first", "second")}
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
  """A judging prompt with `{field}` placeholders; `kind` is "pointwise" or "pairwise"."""

  text: str
  kind: str
  source: str = "<string>"

  def __post_init__(self):
    if self.kind not in _FIELDS:
      raise ValueError(f"{self.source}: kind {self.kind!r} is not 'pointwise' or 'pairwise'")
    found = set()
    for name in _PLACEHOLDER.findall(self.text):
      field = _FIELD_ALIASES.get(name)
      if field not in _FIELDS[self.kind]:
        raise ValueError(f"{self.source}: placeholder {{{name}}} is not a {self.kind} field")
      found.add(field)
    missing = [f for f in _FIELDS[self.kind] if f not in found]
    if missing:
      raise ValueError(f"{self.source}: {self.kind} prompt lacks a placeholder for {missing}")

  @classmethod
  def from_file(cls, path: str | os.PathLike, kind: str) -> PromptTemplate:
    """A published prompt, e.g. the LLaVA-Critic model card's, saved as UTF-8 text."""
    return cls(pathlib.Path(path).read_text(encoding="utf-8"), kind, os.fspath(path))

  def fill(self, **fields: str) -> str:
    """The prompt with every placeholder replaced (values are inserted verbatim, once)."""
    return _PLACEHOLDER.sub(lambda m: fields[_FIELD_ALIASES[m[1]]], self.text)


# LLaVA-Critic's prompts as its model card's Quick Start writes them (lmms-lab/llava-critic-7b
# README; the same in LLaVA-NeXT's critic examples). "answer answers" and the space after the
# pointwise "ASSISTANT:\n" are the card's: the prompt the critic was trained with, verbatim.
LLAVA_CRITIC_PAIRWISE = PromptTemplate(
  "Given an image and a corresponding question, please serve as an unbiased and fair judge to "
  "evaluate the quality of the answers provided by a Large Multimodal Model (LMM). Determine "
  "which answer is better and explain your reasoning with specific details. Your task is "
  "provided as follows:\nQuestion: [{question}]\nThe first response: [{first}]\n"
  "The second response: [{second}]\nASSISTANT:\n",
  "pairwise",
  "LLaVA-Critic model card (pairwise)",
)
LLAVA_CRITIC_POINTWISE = PromptTemplate(
  "Given an image and a corresponding question, please serve as an unbiased and fair judge to "
  "evaluate the quality of answer answers provided by a Large Multimodal Model (LMM). Score "
  "the response out of 100 and explain your reasoning with specific details. Your task is "
  "provided as follows:\nQuestion: [{question}]\nThe LMM response: [{response}]\n"
  "ASSISTANT:\n ",
  "pointwise",
  "LLaVA-Critic model card (pointwise)",
)
LLAVA_CRITIC_TEMPLATE = "qwen_1_5"  # the conversation template of its model card
LLAVA_CRITIC_MAX_NEW_TOKENS = 4096  # the card's generate(max_new_tokens=4096)


def llava_critic_judge(
  model: Any,
  params: Any,
  tokenizer: Any,
  image_config: ImageProcessorConfig | AnyresImageConfig | None = None,
  *,
  batch_size: int = 8,
  max_new_tokens: int = LLAVA_CRITIC_MAX_NEW_TOKENS,
  buckets: Sequence[int] | None = None,
  tile_buckets: Sequence[int] | None = None,
) -> ModelJudge:
  """The released LLaVA-Critic (or a critic trained here) as an in-process judge: greedy
  decoding (the card's do_sample=False, temperature 0) in the qwen_1_5 template, each reply
  ending at <|im_end|>. Pass its prompts to `rank_responses` / `judge_both_orders` /
  `pointwise_scores` as `template=LLAVA_CRITIC_PAIRWISE` / `LLAVA_CRITIC_POINTWISE`.

  model, params, tokenizer: a loaded LLaVA-OneVision checkpoint (lmms-lab/llava-critic-7b).
  image_config: the image preprocessing its tower takes. For a LLaVA-NeXT / OneVision model
    (the released critics) each image goes in as its anyres tiles, as in SFT: an
    `AnyresImageConfig` is used as given; otherwise the model's own tiling
    (`anyres.image_config_for_model`), with a given config's normalisation and resampling.
  tile_buckets: anyres tile counts a batch pads to (None: the most an image can take).
  """
  if model.config.anyres and not isinstance(image_config, AnyresImageConfig):
    tiling = anyres_image_config_for_model(model.config)
    if image_config is not None:
      tiling = dataclasses.replace(
        tiling, mean=image_config.mean, std=image_config.std, resample=image_config.resample,
        rescale_factor=image_config.rescale_factor,
      )  # fmt: skip
    image_config = tiling
  return ModelJudge(
    model, params, tokenizer, image_config,
    template=LLAVA_CRITIC_TEMPLATE, batch_size=batch_size, max_new_tokens=max_new_tokens,
    buckets=buckets, name="llava-critic", tile_buckets=tile_buckets,
  )  # fmt: skip


def _with_image(prompt: str, with_image: bool) -> str:
  if with_image and IMAGE_PLACEHOLDER not in prompt:
    return f"{IMAGE_PLACEHOLDER}\n{prompt}"
  return prompt


def pointwise_prompt(
  question: str,
  response: str,
  *,
  scale: str | tuple[float, float] = "0-100",
  template: PromptTemplate | None = None,
  with_image: bool = True,
) -> str:
  """The critic prompt to score one response ("<image>\\n" first unless with_image=False)."""
  if template is None:
    low, high = score_scale(scale)
    text = _POINTWISE.format(low=low, high=high, question=question, response=response)
  else:
    text = template.fill(question=question, response=response)
  return _with_image(text, with_image)


def pairwise_prompt(
  question: str,
  first: str,
  second: str,
  *,
  template: PromptTemplate | None = None,
  with_image: bool = True,
) -> str:
  """The critic prompt to compare two responses ("<image>\\n" first unless with_image=False)."""
  if template is None:
    text = _PAIRWISE.format(question=question, first=first, second=second)
  else:
    text = template.fill(question=question, first=first, second=second)
  return _with_image(text, with_image)


# ------------------------------------------------------------------------------------------
# Position bias and the ordered-pair reward.
# ------------------------------------------------------------------------------------------


def _winner(verdict: PairwiseVerdict | str) -> str:
  return verdict.winner if isinstance(verdict, PairwiseVerdict) else verdict


def debiased_winner(original: PairwiseVerdict | str, swapped: PairwiseVerdict | str) -> str:
  """MT-Bench's swap rule. `original` judged (a, b), `swapped` judged (b, a); returns the
  winner in the original positions: the common winner when both orders agree, "tie" when they
  disagree, "invalid" when either verdict is invalid."""
  ab, ba = _winner(original), _winner(swapped)
  if INVALID in (ab, ba) or ab not in VERDICT_CREDIT or ba not in VERDICT_CREDIT:
    return INVALID
  ba_in_original_positions = {"first": "second", "second": "first", "tie": "tie"}[ba]
  return ab if ab == ba_in_original_positions else "tie"


@dataclasses.dataclass(frozen=True)
class CriticRanking:
  """The ordered-pair aggregation for K responses (module docstring).

  scores: float64[K], r_i. chosen / rejected: argmax / argmin of r (None when all r are equal
  or nothing was judged). margin: r[chosen] - r[rejected] (0 without a pair). judged: the
  judgments that counted; invalid: the ones excluded.
  """

  scores: np.ndarray
  chosen: int | None
  rejected: int | None
  margin: float
  judged: int
  invalid: int


def _checked_pairs(
  num_responses: int, verdicts: Mapping[tuple[int, int], PairwiseVerdict | str]
) -> dict[tuple[int, int], str]:
  winners = {}
  for (i, j), verdict in verdicts.items():
    if not (0 <= i < num_responses and 0 <= j < num_responses) or i == j:
      raise ValueError(f"verdict key {(i, j)} is not an ordered pair of {num_responses} responses")
    winners[(i, j)] = _winner(verdict)
  return winners


def _apply_swap_rule(winners: dict[tuple[int, int], str]) -> dict[tuple[int, int], str]:
  """Each unordered pair judged both ways gets the swap rule's winner in both orders."""
  combined = dict(winners)
  for (i, j), ab in winners.items():
    if (j, i) in winners:
      combined[(i, j)] = debiased_winner(ab, winners[(j, i)])
    else:
      combined[(i, j)] = INVALID  # one order alone cannot be debiased
  return combined


def aggregate_pairwise(
  num_responses: int,
  verdicts: Mapping[tuple[int, int], PairwiseVerdict | str],
  *,
  debias: bool = False,
) -> CriticRanking:
  """r_i from the verdicts of ordered pairs: verdicts[(i, j)] judged y_i first, y_j second.

  Normally all K(K-1) ordered pairs are given; a missing one adds nothing. debias: apply the
  swap rule to each unordered pair first (a pair judged in one order only is then invalid).
  """
  winners = _checked_pairs(num_responses, verdicts)
  if debias:
    winners = _apply_swap_rule(winners)
  scores = np.zeros(num_responses, np.float64)
  judged = invalid = 0
  for (i, j), winner in winners.items():
    if winner not in VERDICT_CREDIT:
      invalid += 1
      continue
    judged += 1
    credit_j = VERDICT_CREDIT[winner]
    scores[j] += credit_j - 0.5
    scores[i] += (1.0 - credit_j) - 0.5
  chosen, rejected = int(np.argmax(scores)), int(np.argmin(scores))
  margin = float(scores[chosen] - scores[rejected])
  if judged == 0 or margin == 0:
    return CriticRanking(scores, None, None, 0.0, judged, invalid)
  return CriticRanking(scores, chosen, rejected, margin, judged, invalid)


def _reply_verdict(reply: JudgeReply) -> PairwiseVerdict:
  if not reply.ok:
    return PairwiseVerdict(INVALID, reason=f"no reply: {reply.error}")
  return parse_pairwise(reply.text)


def rank_responses(
  judge: Judge,
  question: str,
  responses: Sequence[str],
  image: str | None = None,
  *,
  template: PromptTemplate | None = None,
  debias: bool = False,
  max_tokens: int = 1024,
) -> tuple[CriticRanking, dict[tuple[int, int], PairwiseVerdict]]:
  """Judges all K(K-1) ordered pairs of `responses` in one batch and aggregates them.

  Returns the ranking and the parsed verdict of every ordered pair (for logs and audits).
  """
  pairs = [(i, j) for i in range(len(responses)) for j in range(len(responses)) if i != j]
  requests = [
    JudgeRequest(
      pairwise_prompt(question, responses[i], responses[j], template=template),
      image=image,
      max_tokens=max_tokens,
      request_id=f"pair-{i}-{j}",
    )
    for i, j in pairs
  ]
  verdicts = {pair: _reply_verdict(r) for pair, r in zip(pairs, judge.complete(requests))}
  return aggregate_pairwise(len(responses), verdicts, debias=debias), verdicts


def judge_both_orders(
  judge: Judge,
  question: str,
  first: str,
  second: str,
  image: str | None = None,
  *,
  template: PromptTemplate | None = None,
  max_tokens: int = 1024,
) -> tuple[str, PairwiseVerdict, PairwiseVerdict]:
  """(debiased winner in the given positions, verdict on (first, second), on (second, first))."""
  requests = [
    JudgeRequest(
      pairwise_prompt(question, a, b, template=template), image=image, max_tokens=max_tokens
    )
    for a, b in ((first, second), (second, first))
  ]
  original, swapped = (_reply_verdict(r) for r in judge.complete(requests))
  return debiased_winner(original, swapped), original, swapped


@dataclasses.dataclass(frozen=True)
class PointwiseScores:
  """scores[i]: the critic's score for response i, None where invalid (counted in `invalid`)."""

  scores: list[float | None]
  verdicts: list[PointwiseVerdict]
  invalid: int


def pointwise_scores(
  judge: Judge,
  question: str,
  responses: Sequence[str],
  image: str | None = None,
  *,
  scale: str | tuple[float, float] = "0-100",
  template: PromptTemplate | None = None,
  max_tokens: int = 1024,
) -> PointwiseScores:
  """The pointwise critic as a reward: one score per response; a score outside the scale is
  invalid, as is a reply with no score."""
  low, high = score_scale(scale)
  requests = [
    JudgeRequest(
      pointwise_prompt(question, r, scale=scale, template=template),
      image=image,
      max_tokens=max_tokens,
      request_id=f"response-{k}",
    )  # fmt: skip
    for k, r in enumerate(responses)
  ]
  verdicts = []
  for reply in judge.complete(requests):
    if reply.ok:
      verdicts.append(parse_pointwise(reply.text, low=low, high=high))
    else:
      verdicts.append(PointwiseVerdict(None, reason=f"no reply: {reply.error}"))
  scores = [v.score for v in verdicts]
  return PointwiseScores(scores, verdicts, sum(s is None for s in scores))
