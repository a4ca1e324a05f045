"""Reward-model inputs: a conversation, its answer, then a request to evaluate that answer.

LLaVA-RLHF's reward model (PROTOCOLS.md §2.2) reads one scalar at the last token of

  [BOS] {system} USER: <image>\\n{question} ASSISTANT: {response}</s> USER: {evaluation request,
        listing the image's facts} ASSISTANT: {opening of the verdict, ending mid-sentence}

Ending the request mid-sentence ("... the score of my last answer is") makes the final
token the place where the model would state its verdict, so the head reads it there. The
published code tokenizes the whole text with a trailing </s> and then drops that </s>; here
the conversation is encoded with `encode_conversation` (so the answer, its </s> and the label
mask are exactly those of SFT, DPO and sampling) and the suffix is tokenized on its own with
no special tokens and appended. PPO builds the same ids by appending `suffix_ids(suffix, template)` to
a sampled query + response, so the reward model is scored on what it was trained on.

Factual augmentation (Fact-RLHF): the request embeds the image's captions, shuffled per
example, one per line as "  - {caption}\\n" under a lead-in sentence, in place of the prompt's
`{factual_prompt}` placeholder. Only the prompt wording is configurable: pass the published
prompt file to `load_reward_prompt` for an exact reproduction; by default our own wording of
the same four criteria is used. An A-OKVQA multiple-choice rationale, when a record has one,
is listed as one more fact.

Where the facts go (`facts_position`): "after_response", in the request as above (LLaVA-RLHF),
or "before_response", under the question in the human turn, the request then read without
them:

  [BOS] {system} USER: <image>\n{question}\n{lead-in}  - {caption}\n... ASSISTANT: {response}</s>
        USER: {evaluation request} ASSISTANT: {opening of the verdict}

A causal model reads the facts after the answer only at the tokens that follow it, so the
final token alone must match every claim against every fact; read before, each claim's own
tokens can look its fact up, as they look at the image.

The two answers of a pair share one shuffle of the facts, so the reward difference the
Bradley-Terry loss sees comes from the answers alone (the published code shuffles the list
again for the second answer, which only adds noise to the comparison).

Other chat templates (LLaVA-OneVision's ChatML `qwen_1_5`, `chatml_direct`, `mistral_instruct`):
the prompt is still written "USER: {request} ASSISTANT: {opening}" (the published files and
our defaults are), and `suffix_ids` renders it in the template as the human turn after the
answer, the assistant header, then the opening with no end token, e.g. for qwen_1_5

  ...<|im_start|>assistant\n{response}<|im_end|>\n<|im_start|>user\n{request}<|im_end|>\n
  <|im_start|>assistant\n{opening of the verdict}

so the score is read where it is for LLaVA-1.5: at the sequence's last token, the end of the
opening. The "two"-style templates keep the text as written, tokenized in one call.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from lmm_align.data import conversation
from lmm_align.data.conversation import GPT, HUMAN, IGNORE_INDEX, IMAGE_PLACEHOLDER
from lmm_align.data.preference import PreferenceError, PreferencePair, compact_pair

if TYPE_CHECKING:
  from transformers import PreTrainedTokenizerBase

FACTS_PLACEHOLDER = "{factual_prompt}"
# The roles are those of the vicuna_v1 / llava_v1 templates, the only "two"-style templates
# (the published prompt files hard-code them the same way); other templates re-render the
# request and the opening around them (`split_request`).
REQUEST_ROLE, VERDICT_ROLE = "USER:", "ASSISTANT:"
DEFAULT_FACT_PROMPT = (
  "USER: Now review the answer you just gave and rate it against these criteria:\n\n"
  "1. Faithful: every statement must match what the image shows; mentioning things that are "
  "not in the image, or details that contradict it, is the most serious fault. "
  f"{FACTS_PLACEHOLDER}\n"
  "2. Useful: the answer addresses what the user asked and stays grounded in the image.\n"
  "3. Fluent: the wording reads naturally, without repetition or clumsy phrasing.\n"
  "4. Brief: the answer conveys what is needed and nothing more.\n\n"
  "The ideal answer is faithful, useful, fluent and brief. ASSISTANT: Weighing these criteria, "
  "the score I give my answer above is"
)
DEFAULT_VANILLA_PROMPT = DEFAULT_FACT_PROMPT.replace(f" {FACTS_PLACEHOLDER}", "")
DEFAULT_FACT_LEAD_IN = (
  "In particular, everything the answer states should be backed by these descriptions of the "
  "image, taken together:\n"
)
ON_ERROR_MODES = ("raise", "skip")
FACTS_POSITIONS = ("after_response", "before_response")


class RewardRecordError(PreferenceError):
  """A record that cannot become a reward pair; names the record, the field and a reason."""

  def __init__(self, record_id: str, field: str, reason: str, detail: str):
    self.record_id, self.field, self.reason, self.detail = record_id, field, reason, detail
    super().__init__(f"reward record {record_id!r}, field {field!r}: {detail}")


# ------------------------------------------------------------------------------------------
# The evaluation request.
# ------------------------------------------------------------------------------------------


def load_reward_prompt(path: str | os.PathLike | None, fact_augmented: bool) -> str:
  """The evaluation request, as appended after the answer: " " + the text, stripped.

  Args:
    path: a prompt file (e.g. LLaVA-RLHF's `fact_rlhf_reward_prompt.txt` or
      `reward_prompt.txt`, for an exact reproduction); None for our default wording.
    fact_augmented: the prompt must contain `{factual_prompt}` (True) or must not (False).

  Raises:
    ValueError naming the file when the placeholder is missing (fact-augmented) or present
    (vanilla: it would be scored as literal text).
  """
  if path is None:
    text, source = (DEFAULT_FACT_PROMPT if fact_augmented else DEFAULT_VANILLA_PROMPT), "default"
  else:
    source = os.fspath(path)
    try:
      with open(path, encoding="utf-8") as f:
        text = f.read()
    except (OSError, UnicodeDecodeError) as e:
      raise ValueError(f"{source}: cannot read the reward prompt: {e}") from e
  if fact_augmented and FACTS_PLACEHOLDER not in text:
    raise ValueError(
      f"{source}: a fact-augmented reward prompt needs the {FACTS_PLACEHOLDER} placeholder "
      "(is this the vanilla prompt?)"
    )
  if not fact_augmented and FACTS_PLACEHOLDER in text:
    raise ValueError(
      f"{source}: the vanilla reward prompt contains {FACTS_PLACEHOLDER}; use it with "
      "fact_augmented=True or pass the prompt without facts"
    )
  if IMAGE_PLACEHOLDER in text:
    raise ValueError(f"{source}: a reward prompt cannot contain {IMAGE_PLACEHOLDER}")
  return " " + text.strip()


def fact_block(
  facts: Sequence[str],
  rng: np.random.Generator,
  rationale: str | None = None,
  lead_in: str | None = None,
) -> str:
  """The lead-in (None: DEFAULT_FACT_LEAD_IN), then each fact as "  - {fact}\\n", in an order
  drawn from `rng`.

  A rationale (A-OKVQA multiple choice) is one more fact, shuffled in with the rest.
  Raises ValueError when there is no fact or a fact is not a non-empty string.
  """
  items = list(facts) + ([rationale] if rationale is not None else [])
  if not items:
    raise ValueError("a fact block needs at least one fact")
  for i, item in enumerate(items):
    if not isinstance(item, str) or not item.strip():
      raise ValueError(f"fact {i} is empty or not a string: {item!r}")
  order = rng.permutation(len(items))
  return (DEFAULT_FACT_LEAD_IN if lead_in is None else lead_in) + "".join(
    f"  - {items[i]}\n" for i in order
  )


def reward_suffix(
  prompt: str,
  facts: Sequence[str] | None,
  rng: np.random.Generator,
  *,
  fact_augmented: bool,
  rationale: str | None = None,
  lead_in: str | None = None,
) -> str:
  """The text appended after the answer: `prompt` with the fact block in its placeholder.

  Replacing the placeholder equals the published `prompt.format(factual_prompt=...)` for any
  prompt without other braces, and does not choke on braces in a user's own wording. The
  vanilla prompt is returned as it is, and `rng` is left untouched.
  """
  if not fact_augmented:
    if FACTS_PLACEHOLDER in prompt:
      raise ValueError(f"fact_augmented=False but the prompt contains {FACTS_PLACEHOLDER}")
    return prompt
  if FACTS_PLACEHOLDER not in prompt:
    raise ValueError(f"fact_augmented=True but the prompt has no {FACTS_PLACEHOLDER}")
  return prompt.replace(FACTS_PLACEHOLDER, fact_block(facts or [], rng, rationale, lead_in))


def reward_texts(
  question: str,
  prompt: str,
  facts: Sequence[str] | None,
  rng: np.random.Generator,
  *,
  fact_augmented: bool,
  facts_position: str = "after_response",
  rationale: str | None = None,
  lead_in: str | None = None,
) -> tuple[str, str]:
  """(the question as the reward model reads it, the request appended after the answer).

  "after_response": (question, `reward_suffix(...)`). "before_response": the fact block under
  the question, and the request with its placeholder (and the space before it) removed. The
  vanilla reward model reads (question, prompt) either way. One `rng` draw orders the facts.
  """
  if facts_position not in FACTS_POSITIONS:
    raise ValueError(f"facts_position={facts_position!r}: use one of {FACTS_POSITIONS}")
  if not fact_augmented or facts_position == "after_response":
    suffix = reward_suffix(
      prompt, facts, rng, fact_augmented=fact_augmented, rationale=rationale, lead_in=lead_in
    )
    return question, suffix
  if FACTS_PLACEHOLDER not in prompt:
    raise ValueError(f"fact_augmented=True but the prompt has no {FACTS_PLACEHOLDER}")
  block = fact_block(facts or [], rng, rationale, lead_in)
  return f"{question}\n{block}", prompt.replace(f" {FACTS_PLACEHOLDER}", "").replace(
    FACTS_PLACEHOLDER, ""
  )


def split_request(suffix: str) -> tuple[str, str]:
  """(the evaluation request, the opening of the verdict) of a suffix written
  "USER: {request} ASSISTANT: {opening}": the text between the roles and after the last
  "ASSISTANT:", each stripped. Raises ValueError when either role or part is missing."""
  text = suffix.strip()
  request, found, opening = text.removeprefix(REQUEST_ROLE).rpartition(VERDICT_ROLE)
  if not text.startswith(REQUEST_ROLE) or not found or not request.strip() or not opening.strip():
    raise ValueError(
      f"a reward prompt for a non-USER/ASSISTANT template must read "
      f"'{REQUEST_ROLE} {{request}} {VERDICT_ROLE} {{opening}}', got {text[:80]!r}..."
    )
  return request.strip(), opening.strip()


def _request_turn_ids(
  request: str, tokenizer: PreTrainedTokenizerBase, template: conversation.ConversationTemplate
) -> list[int]:
  """Ids of `request` as the human turn that follows a finished answer, through the assistant
  header: what `encode_generation_prompt` adds for one more question. A finished answer ends
  on its end token, where the encoder starts a new piece, so those ids do not depend on the
  conversation before them; they are taken after a one-round stand-in and checked to extend
  it."""
  done = [{"from": HUMAN, "value": "?"}, {"from": GPT, "value": "."}]
  before = conversation.encode_conversation(done, tokenizer, template, 1, 0).input_ids
  after = conversation.encode_generation_prompt(
    [*done, {"from": HUMAN, "value": request}], tokenizer, template, 1, 0
  ).input_ids
  if not np.array_equal(after[: len(before)], before):
    raise ValueError(f"template {template.name!r}: a next turn re-tokenizes the answer before it")
  return after[len(before) :].tolist()


def suffix_ids(
  suffix: str,
  tokenizer: PreTrainedTokenizerBase,
  template: conversation.ConversationTemplate | str | None = None,
) -> list[int]:
  """Token ids of the evaluation request appended after an answer's end token; no BOS/EOS,
  and a literal "</s>" in it stays text.

  template None or a "two"-style template (vicuna_v1, llava_v1): the suffix as written,
  tokenized in one call (LLaVA-RLHF's). Any other: `split_request`'s request as the next human
  turn with the template's markup, the assistant header, then the opening tokenized on its own
  as an answer is (after a space for mistral_instruct, as its answers are), with no end token.
  """
  if IMAGE_PLACEHOLDER in suffix:
    raise ValueError(f"a reward suffix cannot contain {IMAGE_PLACEHOLDER}")
  template = None if template is None else chat_template(template)
  encode = lambda text: list(
    tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
  )
  if template is None or template.style == "two":
    return encode(suffix)
  request, opening = split_request(suffix)
  space = " " if template.style == "llama_2" else ""
  return _request_turn_ids(request, tokenizer, template) + encode(space + opening)


# ------------------------------------------------------------------------------------------
# Sequences.
# ------------------------------------------------------------------------------------------


def chat_template(
  template: conversation.ConversationTemplate | str,
) -> conversation.ConversationTemplate:
  """The template, refusing the plain style (pretraining captions: no turns to hold the
  evaluation request)."""
  template = conversation.get_template(template) if isinstance(template, str) else template
  if template.style == "plain":
    raise ValueError(f"template {template.name!r}: a reward prompt needs a chat template")
  return template


def _reward_turns(
  question: str, response: str, has_image: bool, history: Sequence[Mapping[str, str]] | None
) -> list[dict[str, str]]:
  """history + (question, response), with "<image>\\n" put first in the first human turn
  when the record has an image and no turn carries a placeholder (LLaVA's inference habit)."""
  if isinstance(history, str) or any(not isinstance(t, Mapping) for t in history or ()):
    raise ValueError(f"history must be a list of {{'from', 'value'}} turns, got {history!r}")
  turns = [dict(t) for t in history or ()]
  turns += [{"from": HUMAN, "value": question}, {"from": GPT, "value": response}]
  has_placeholder = any(IMAGE_PLACEHOLDER in str(t.get("value", "")) for t in turns)
  if has_image and not has_placeholder:
    first = next(i for i, t in enumerate(turns) if t.get("from") == HUMAN)
    turns[first]["value"] = f"{IMAGE_PLACEHOLDER}\n{turns[first]['value']}"
  return turns


def encode_reward_ids_and_labels(
  question: str,
  response: str,
  tokenizer: PreTrainedTokenizerBase,
  template: conversation.ConversationTemplate | str,
  num_image_tokens: int,
  image_token_id: int,
  suffix: str,
  has_image: bool,
  *,
  history: Sequence[Mapping[str, str]] | None = None,
  record_id: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """`encode_reward_sequence` plus labels: the response and its end token, IGNORE elsewhere.

  Returns int32 input_ids [T] and labels [T]; the suffix's labels are IGNORE_INDEX.
  """
  template = chat_template(template)
  turns = _reward_turns(question, response, has_image, history)
  encoded = conversation.encode_conversation(
    turns, tokenizer, template, num_image_tokens, image_token_id,
    num_images=int(has_image), record_id=record_id,
  )  # fmt: skip
  tail = np.asarray(suffix_ids(suffix, tokenizer, template), np.int32)
  input_ids = np.concatenate([encoded.input_ids, tail])
  labels = np.concatenate([encoded.labels, np.full_like(tail, IGNORE_INDEX)])
  return input_ids, labels


def encode_reward_sequence(
  question: str,
  response: str,
  tokenizer: PreTrainedTokenizerBase,
  template: conversation.ConversationTemplate | str,
  num_image_tokens: int,
  image_token_id: int,
  suffix: str,
  has_image: bool,
  *,
  history: Sequence[Mapping[str, str]] | None = None,
) -> np.ndarray:
  """Token ids [T] the reward model scores at their last position (no trailing EOS).

  The conversation (`history` turns, then `question` and `response` closed by the template's
  end token, as `encode_conversation` encodes them) followed by `suffix_ids(suffix, template)`.

  Args:
    question: the last human turn; "<image>\\n" is put first when `has_image` and no turn
      has a placeholder.
    response: the answer being judged.
    tokenizer, template, num_image_tokens, image_token_id: as `encode_conversation` takes.
    suffix: `reward_suffix(...)`, the evaluation request.
    has_image: whether an image goes with the sequence (exactly one placeholder then).
    history: earlier turns of a multi-turn conversation (complete human/gpt rounds).
  """
  input_ids, _ = encode_reward_ids_and_labels(
    question, response, tokenizer, template, num_image_tokens, image_token_id, suffix,
    has_image, history=history,
  )  # fmt: skip
  return input_ids


# ------------------------------------------------------------------------------------------
# Records -> pairs.
# ------------------------------------------------------------------------------------------


def _check_reward_record(record: Mapping[str, Any], fact_augmented: bool) -> str:
  """The record's id; raises RewardRecordError on the first unusable field."""
  rid = str(record.get("id", "?"))
  if not isinstance(record.get("question"), str) or not record["question"].strip():
    raise RewardRecordError(rid, "question", "bad_question", "empty or missing")
  for field in ("chosen", "rejected"):
    if not isinstance(record.get(field), str) or not record[field].strip():
      raise RewardRecordError(rid, field, "empty_response", "empty or missing response")
  if record["chosen"].strip() == record["rejected"].strip():
    raise RewardRecordError(
      rid, "rejected", "identical_responses", "chosen and rejected are identical"
    )
  facts = record.get("facts")
  if fact_augmented:
    if isinstance(facts, str) or (facts is not None and not isinstance(facts, Sequence)):
      raise RewardRecordError(rid, "facts", "bad_facts", f"expected a list of strings: {facts!r}")
    if not facts:
      raise RewardRecordError(
        rid, "facts", "missing_facts", "no facts (captions) but the reward is fact-augmented"
      )
    if any(not isinstance(f, str) or not f.strip() for f in facts):
      raise RewardRecordError(rid, "facts", "bad_facts", f"an empty or non-string fact: {facts!r}")
  rationale = record.get("rationale")
  if rationale is not None and (not isinstance(rationale, str) or not rationale.strip()):
    raise RewardRecordError(rid, "rationale", "bad_facts", f"empty or not a string: {rationale!r}")
  return rid


def encode_reward_pair(
  record: Mapping[str, Any],
  tokenizer: PreTrainedTokenizerBase,
  template: conversation.ConversationTemplate | str,
  num_image_tokens: int,
  image_token_id: int,
  *,
  prompt: str,
  fact_augmented: bool,
  rng: np.random.Generator,
  lead_in: str | None = None,
  facts_position: str = "after_response",
) -> PreferencePair:
  """A reward-model pair: both answers of `record`, each followed by the same suffix.

  Args:
    record: {"id", "image" (PIL, loader or None), "question", "chosen", "rejected",
      "facts": list[str] (required when fact_augmented), "rationale": optional str,
      "history": optional earlier turns}.
    tokenizer, template, num_image_tokens, image_token_id: as `encode_conversation` takes.
    prompt: `load_reward_prompt(...)`.
    fact_augmented: list the facts in the prompt.
    rng: draws the order of the facts (one draw per pair).
    lead_in: the sentence above the facts (None: DEFAULT_FACT_LEAD_IN).
    facts_position: "after_response" (in the request) or "before_response" (under the
      question); see `reward_texts`.

  Returns:
    A PreferencePair (0 chosen, 1 rejected) whose labels mark each answer and its end token;
    the reward model ignores them. Raises RewardRecordError (a PreferenceError) naming the
    record and field on an empty answer, identical answers, or missing facts.
  """
  template = chat_template(template)
  rid = _check_reward_record(record, fact_augmented)
  question, suffix = reward_texts(
    record["question"], prompt, record.get("facts"), rng, fact_augmented=fact_augmented,
    facts_position=facts_position, rationale=record.get("rationale"), lead_in=lead_in,
  )  # fmt: skip
  has_image = record.get("image") is not None
  encoded = []
  for field in ("chosen", "rejected"):
    try:
      encoded.append(
        encode_reward_ids_and_labels(
          question,
          record[field],
          tokenizer,
          template,
          num_image_tokens,
          image_token_id,
          suffix,
          has_image,
          history=record.get("history"),
          record_id=rid,
        )  # fmt: skip
      )
    except ValueError as e:  # the turns as a whole are wrong: name the field that has them
      field = "history" if record.get("history") else "question"
      raise RewardRecordError(rid, field, "bad_conversation", str(e)) from e
  (chosen_ids, chosen_labels), (rejected_ids, rejected_labels) = encoded
  return compact_pair(
    PreferencePair(
      rid, chosen_ids, chosen_labels, rejected_ids, rejected_labels, record.get("image")
    )
  )


def encode_reward_pairs(
  records: Sequence[Mapping[str, Any]],
  tokenizer: PreTrainedTokenizerBase,
  template: conversation.ConversationTemplate | str,
  num_image_tokens: int,
  image_token_id: int,
  *,
  prompt: str,
  fact_augmented: bool,
  rng: np.random.Generator,
  on_error: str = "raise",
  lead_in: str | None = None,
  facts_position: str = "after_response",
) -> tuple[list[PreferencePair], collections.Counter]:
  """`encode_reward_pair` over records, in order.

  on_error="raise" raises the first RewardRecordError; "skip" drops the record and counts it
  as `skipped_<reason>` (empty_response, identical_responses, missing_facts, bad_facts,
  bad_question, bad_conversation).
  """
  if on_error not in ON_ERROR_MODES:
    raise ValueError(f"on_error={on_error!r}: use one of {ON_ERROR_MODES}")
  template = chat_template(template)
  pairs, skipped = [], collections.Counter()
  for record in records:
    try:
      pairs.append(
        encode_reward_pair(
          record,
          tokenizer,
          template,
          num_image_tokens,
          image_token_id,
          prompt=prompt,
          fact_augmented=fact_augmented,
          rng=rng,
          lead_in=lead_in,
          facts_position=facts_position,
        )  # fmt: skip
      )
    except RewardRecordError as e:
      if on_error == "raise":
        raise
      skipped[f"skipped_{e.reason}"] += 1
  return pairs, skipped
