"""LLaVA conversation templates, and token ids + loss labels for one conversation.

A conversation is LLaVA's instruction format: a list of `{"from": "human" | "gpt", "value": str}`
turns. The `vicuna_v1` / `llava_v1` templates render one as

  "{system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>"

and the loss covers only each answer and its closing </s>: the net effect of LLaVA's
`preprocess_v1`. LLaVA gets there by tokenizing the whole prompt and then recomputing each
round's length with hand-tuned offsets (`-2` for BOS and the merged trailing space, `-1` more
for non-legacy Llama tokenizers). Those offsets are only right for the sentencepiece Llama
tokenizer; any other tokenizer silently shifts the mask, or trips LLaVA's "tokenization
mismatch" check, which drops the whole sample. Here every rendered piece is tokenized on its
own and the pieces are concatenated:

  [BOS] [system + "USER: ... ASSISTANT:"] [" " + answer] [EOS] ["USER: ... ASSISTANT:"] ...
   -100   -100 ...                        loss ...      loss   -100 ...

so the mask is exact by construction for any tokenizer. The space after "ASSISTANT:" goes with
the answer, where sentencepiece and byte-level BPE both attach it (to the answer's first token).
The ids can differ from tokenizing the whole string in one call at piece boundaries; training,
sampling and scoring all go through these functions, so they agree with each other.

Images: each `<image>` becomes `num_image_tokens` copies of `image_token_id` (the HF Llava
convention, e.g. 576 for CLIP ViT-L/14-336), not LLaVA's single -200 sentinel.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # transformers is only needed for the annotation; importing it costs ~1 s
  from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
HUMAN, GPT = "human", "gpt"


@dataclasses.dataclass(frozen=True)
class ConversationTemplate:
  """How turns are rendered to text.

  style: "two" (LLaVA's SeparatorStyle.TWO: "ROLE: message" turns) or "plain" (LLaVA's
    pretraining format: the image placeholders, then the caption, nothing else).
  system: text before the first turn ("two" only), followed by `sep`.
  roles: display names of the (human, gpt) roles.
  sep: text after each human turn (and after the system prompt).
  sep2: text after each answer; the answer's end token, which is trained on.
  sep2_is_eos: encode `sep2` as the tokenizer's eos id instead of tokenizing its text.
  """

  name: str
  style: str
  system: str
  roles: tuple[str, str]
  sep: str
  sep2: str
  sep2_is_eos: bool

  @property
  def stop_str(self) -> str:
    """Where sampling stops (LLaVA's `stop_str`)."""
    return self.sep2


_VICUNA_SYSTEM = (
  "A chat between a curious user and an artificial intelligence assistant. "
  "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_LLAVA_SYSTEM = (
  "A chat between a curious human and an artificial intelligence assistant. "
  "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

TEMPLATES: dict[str, ConversationTemplate] = {
  # LLaVA-1.5 training (`--version v1`) and evaluation (`--conv-mode vicuna_v1`).
  "vicuna_v1": ConversationTemplate(
    "vicuna_v1", "two", _VICUNA_SYSTEM, ("USER", "ASSISTANT"), " ", "</s>", True
  ),
  # model_vqa.py, LLaVA-RLHF's MMHal script and RLAIF-V training.
  "llava_v1": ConversationTemplate(
    "llava_v1", "two", _LLAVA_SYSTEM, ("USER", "ASSISTANT"), " ", "</s>", True
  ),
  # LLaVA stage-1 pretraining (`preprocess_plain`): "<image>" + caption + "\n"; the human
  # text is dropped and the caption ends with "\n", not </s>.
  "plain": ConversationTemplate("plain", "plain", "", ("", ""), "\n", "\n", False),
}
TEMPLATES["v1"] = TEMPLATES["vicuna_v1"]  # LLaVA registers the vicuna template under both names


def get_template(name: str) -> ConversationTemplate:
  """Looks a template up by name; an unknown name raises ValueError listing the known ones."""
  if name not in TEMPLATES:
    raise ValueError(f"unknown conversation template {name!r}; known: {sorted(TEMPLATES)}")
  return TEMPLATES[name]


@dataclasses.dataclass(frozen=True, eq=False)  # arrays: compare fields with numpy instead
class EncodedConversation:
  """One tokenized conversation.

  input_ids: int32 [T], starting with BOS; each image is `num_image_tokens` image ids.
  labels: int32 [T], equal to input_ids on trained positions and IGNORE_INDEX elsewhere. Not
    shifted: the loss at position t compares logits[t - 1] with labels[t].
  num_images: how many `<image>` placeholders were expanded.
  """

  input_ids: np.ndarray
  labels: np.ndarray
  num_images: int


# ------------------------------------------------------------------------------------------
# Validation and normalisation of the LLaVA turn list.
# ------------------------------------------------------------------------------------------


def _where(record_id: str | None) -> str:
  return f"record {record_id!r}: " if record_id is not None else ""


def _normalise_turns(
  conversation: Any, record_id: str | None, ends_with: str
) -> list[tuple[str, str]]:
  """Validates turns and returns (role, value) pairs with each turn's images moved first.

  A leading non-human turn is dropped, as LLaVA's `preprocess` does (`if roles[source[0]
  ["from"]] != conv.roles[0]: source = source[1:]`); some ShareGPT-derived records open with
  a gpt greeting. Everything else that LLaVA asserts on (or silently mis-masks) is an error.
  """
  where = _where(record_id)
  if isinstance(conversation, str | bytes) or not isinstance(conversation, Sequence):
    raise ValueError(f"{where}conversations must be a list of turns, got {type(conversation)}")
  if len(conversation) == 0:
    raise ValueError(f"{where}empty conversation")
  turns = []
  for i, turn in enumerate(conversation):
    if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
      raise ValueError(f"{where}turn {i}: needs 'from' and 'value' fields, got {turn!r}")
    role, value = turn["from"], turn["value"]
    if role not in (HUMAN, GPT):
      raise ValueError(f"{where}turn {i} field 'from': {role!r} is not 'human' or 'gpt'")
    if not isinstance(value, str) or not value.strip():
      raise ValueError(f"{where}turn {i} field 'value': empty or not a string ({value!r})")
    if role == GPT and IMAGE_PLACEHOLDER in value:
      raise ValueError(f"{where}turn {i} field 'value': {IMAGE_PLACEHOLDER} in a gpt turn")
    turns.append((i, role, value))

  if turns[0][1] != HUMAN:
    turns = turns[1:]
    if not turns:
      raise ValueError(f"{where}no human turn after dropping the leading gpt turn")
  for k, (i, role, _) in enumerate(turns):
    expected = HUMAN if k % 2 == 0 else GPT
    if role != expected:
      raise ValueError(f"{where}turn {i} field 'from': roles must alternate, expected {expected!r}")
  if turns[-1][1] != ends_with:
    what = "an answer (gpt turn)" if ends_with == GPT else "a question (human turn)"
    raise ValueError(f"{where}the conversation must end with {what}")

  normalised = []
  for _, role, value in turns:
    n = value.count(IMAGE_PLACEHOLDER)
    if n:
      # LLaVA's preprocess_multimodal: "<image>\n" + rest.strip(). LLaVA collapses several
      # placeholders in one turn into one; we keep the count so multi-image data stays aligned.
      value = (IMAGE_PLACEHOLDER + "\n") * n + value.replace(IMAGE_PLACEHOLDER, "").strip()
    normalised.append((role, value))
  return normalised


# ------------------------------------------------------------------------------------------
# Rendering to text pieces.
# ------------------------------------------------------------------------------------------


def _render_pieces(
  turns: list[tuple[str, str]], template: ConversationTemplate, record_id: str | None
) -> list[tuple[str, bool]]:
  """(text, is_answer) pieces whose concatenation is LLaVA's `get_prompt()`.

  An answer piece excludes its end token `sep2`, which `_encode_pieces` appends. A trailing
  human turn yields a prompt ending with "ASSISTANT:" (the generation prompt).
  """
  if template.style == "plain":
    if len(turns) > 2:
      raise ValueError(f"{_where(record_id)}the plain template takes one (image, caption) pair")
    images = turns[0][1].count(IMAGE_PLACEHOLDER)
    if images == 0:
      raise ValueError(f"{_where(record_id)}the plain template needs an {IMAGE_PLACEHOLDER}")
    pieces = [(IMAGE_PLACEHOLDER * images, False)]
    if len(turns) == 2:
      pieces.append((turns[1][1], True))
    return pieces

  user, assistant = template.roles
  pieces = []
  for k in range(0, len(turns), 2):
    prefix = template.system + template.sep if k == 0 else ""
    question = turns[k][1]
    pieces.append((f"{prefix}{user}: {question}{template.sep}{assistant}:", False))
    if k + 1 < len(turns):
      pieces.append((" " + turns[k + 1][1], True))
  return pieces


def _check_image_args(num_image_tokens: int, image_token_id: int) -> None:
  if num_image_tokens < 1:
    raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
  if image_token_id < 0:
    raise ValueError(f"image_token_id must be a real token id (>= 0), got {image_token_id}")


def _encode_text(
  tokenizer: PreTrainedTokenizerBase, text: str, num_image_tokens: int, image_token_id: int
) -> list[int]:
  """Token ids of `text`, each `<image>` replaced by `num_image_tokens` image ids.

  `split_special_tokens=True`: a literal "</s>" or "<pad>" typed in the data stays text, so the
  only special ids in a sequence are the ones placed here and the mask cannot be shifted.
  """
  ids = []
  for j, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
    if j:
      ids.extend([image_token_id] * num_image_tokens)
    if chunk:
      ids.extend(tokenizer.encode(chunk, add_special_tokens=False, split_special_tokens=True))
  return ids


def _encode_pieces(
  pieces: list[tuple[str, bool]],
  tokenizer: PreTrainedTokenizerBase,
  template: ConversationTemplate,
  num_image_tokens: int,
  image_token_id: int,
  add_bos: bool,
) -> tuple[np.ndarray, np.ndarray]:
  if template.sep2_is_eos:
    if tokenizer.eos_token_id is None:
      raise ValueError(f"template {template.name!r} ends answers with eos; tokenizer has none")
    end_ids = [tokenizer.eos_token_id]
  else:
    end_ids = _encode_text(tokenizer, template.sep2, num_image_tokens, image_token_id)
  input_ids, labels = [], []
  if add_bos:
    if tokenizer.bos_token_id is None:
      raise ValueError("add_bos=True but the tokenizer has no bos_token_id")
    input_ids.append(tokenizer.bos_token_id)
    labels.append(IGNORE_INDEX)
  for text, is_answer in pieces:
    ids = _encode_text(tokenizer, text, num_image_tokens, image_token_id)
    if is_answer:
      ids = ids + end_ids
    input_ids.extend(ids)
    labels.extend(ids if is_answer else [IGNORE_INDEX] * len(ids))
  return np.asarray(input_ids, np.int32), np.asarray(labels, np.int32)


def _count_images(
  turns: list[tuple[str, str]], num_images: int | None, record_id: str | None
) -> int:
  found = sum(value.count(IMAGE_PLACEHOLDER) for _, value in turns)
  if num_images is not None and found != num_images:
    what = "more" if found > num_images else "fewer"
    raise ValueError(
      f"{_where(record_id)}{what} {IMAGE_PLACEHOLDER} placeholders ({found}) than images "
      f"({num_images})"
    )
  return found


# ------------------------------------------------------------------------------------------
# Public API.
# ------------------------------------------------------------------------------------------


def encode_conversation(
  conversation: Sequence[Mapping[str, str]],
  tokenizer: PreTrainedTokenizerBase,
  template: ConversationTemplate | str,
  num_image_tokens: int,
  image_token_id: int,
  *,
  num_images: int | None = None,
  record_id: str | None = None,
  add_bos: bool = True,
) -> EncodedConversation:
  """Token ids and SFT labels for a LLaVA conversation that ends with an answer.

  Args:
    conversation: LLaVA turns, `[{"from": "human" | "gpt", "value": str}, ...]`.
    tokenizer: an HF tokenizer (needs `encode`, `bos_token_id`, `eos_token_id`).
    template: a ConversationTemplate or its registered name.
    num_image_tokens: ids per image (P, e.g. 576); the vision tower's patch count.
    image_token_id: the id standing for one image patch (HF `image_token_index`).
    num_images: images supplied with the record; when given, the placeholder count must
      equal it (a missing placeholder would leave an image unused, as LLaVA silently does).
    record_id: named in error messages.
    add_bos: prepend the tokenizer's BOS (LLaVA always does).

  Returns:
    EncodedConversation with input_ids / labels int32 [T]; labels are IGNORE_INDEX except on
    each answer's tokens and its end token.
  """
  template = get_template(template) if isinstance(template, str) else template
  _check_image_args(num_image_tokens, image_token_id)
  turns = _normalise_turns(conversation, record_id, ends_with=GPT)
  found = _count_images(turns, num_images, record_id)
  pieces = _render_pieces(turns, template, record_id)
  input_ids, labels = _encode_pieces(
    pieces, tokenizer, template, num_image_tokens, image_token_id, add_bos
  )
  return EncodedConversation(input_ids, labels, found)


def encode_generation_prompt(
  conversation: str | Sequence[Mapping[str, str]],
  tokenizer: PreTrainedTokenizerBase,
  template: ConversationTemplate | str,
  num_image_tokens: int,
  image_token_id: int,
  *,
  with_image: bool = True,
  num_images: int | None = None,
  record_id: str | None = None,
  add_bos: bool = True,
) -> EncodedConversation:
  """Token ids of a prompt to sample from, ending with "ASSISTANT:" (no trailing space).

  `conversation` is a question string (an `<image>` is put first when `with_image`) or LLaVA
  turns ending with a human turn (earlier answers are context). Labels are all IGNORE_INDEX.
  The ids equal the prefix that `encode_conversation` produces for the same turns plus an
  answer, so a sampled answer can be scored by appending its ids.
  """
  template = get_template(template) if isinstance(template, str) else template
  _check_image_args(num_image_tokens, image_token_id)
  if isinstance(conversation, str):
    conversation = [{"from": HUMAN, "value": _question(conversation, with_image)}]
  turns = _normalise_turns(conversation, record_id, ends_with=HUMAN)
  found = _count_images(turns, num_images, record_id)
  pieces = _render_pieces(turns, template, record_id)
  input_ids, _ = _encode_pieces(
    pieces, tokenizer, template, num_image_tokens, image_token_id, add_bos
  )
  return EncodedConversation(input_ids, np.full_like(input_ids, IGNORE_INDEX), found)


def _question(question: str, with_image: bool) -> str:
  if with_image and IMAGE_PLACEHOLDER not in question:
    return f"{IMAGE_PLACEHOLDER}\n{question}"
  return question


def render_conversation(
  conversation: Sequence[Mapping[str, str]], template: ConversationTemplate | str
) -> str:
  """The prompt text, identical to LLaVA's `conv.get_prompt()` after `preprocess_multimodal`.

  For the plain template it is `preprocess_plain`'s "<image>" + caption + "\\n".
  """
  template = get_template(template) if isinstance(template, str) else template
  # Rendering serves both finished conversations and generation prompts.
  last = conversation[-1] if isinstance(conversation, Sequence) and conversation else None
  ends_with = HUMAN if isinstance(last, Mapping) and last.get("from") == HUMAN else GPT
  turns = _normalise_turns(conversation, None, ends_with=ends_with)
  pieces = _render_pieces(turns, template, None)
  return "".join(text + (template.sep2 if is_answer else "") for text, is_answer in pieces)


def generation_prompt(
  question: str, template: ConversationTemplate | str, with_image: bool = True
) -> str:
  """LLaVA's single-turn sampling prompt, e.g. "{system} USER: <image>\\n{q} ASSISTANT:"."""
  return render_conversation([{"from": HUMAN, "value": _question(question, with_image)}], template)
