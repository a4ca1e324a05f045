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

The LLaVA-NeXT / OneVision checkpoints' templates (LLaVA-NeXT `llava/conversation.py`):

  qwen_1_5 (LLaVA-OneVision, LLaVA-Critic; SeparatorStyle.CHATML):
    "<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n"
    "<|im_start|>user\\n<image>\\n{q1}<|im_end|>\\n<|im_start|>assistant\\n{a1}<|im_end|>\\n" ...
    (a conversation's text stops at its last <|im_end|>, where sampling stops)
  chatml_direct (llava-v1.6-34b, Nous-Hermes-2-Yi-34B; SeparatorStyle.MPT, no newline between
    turns): "<|im_start|>system\\nAnswer the questions.<|im_end|><|im_start|>user\\n<image>\\n{q1}"
    "<|im_end|><|im_start|>assistant\\n{a1}<|im_end|>" ...
  mistral_instruct (llava-v1.6-mistral-7b; SeparatorStyle.LLAMA_2 with an empty system):
    "[INST] <image>\\n{q1} [/INST] {a1} </s>[INST] {q2} [/INST] {a2} </s>"

Their markup tokens ("<|im_start|>", "<|im_end|>") are looked up as one id each, while the
turns' own text is always tokenized as text (a literal "<|im_end|>" typed in the data stays
text). The loss covers each answer and the token that closes it (<|im_end|>, or </s> for
mistral_instruct, whose answers keep the space LLaVA-NeXT puts before </s>). LLaVA-NeXT's
`preprocess_qwen` also trains on every "\\n", <|im_start|> and <|im_end|> of the prompt and on
the "<|im_start|>assistant\\n" header: tokens fixed by the template, which only teach the model
the markup it is always given; here they are context, as the `{% generation %}` span of the
llava-hf chat templates has it. Qwen and Yi tokenizers add no BOS (`add_bos` False).

Images: each `<image>` becomes `num_image_tokens` copies of `image_token_id` (the HF Llava
convention, e.g. 576 for CLIP ViT-L/14-336), not LLaVA's single -200 sentinel.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # transformers is only needed for the annotation; importing it costs ~1 s
  from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
HUMAN, GPT = "human", "gpt"
STYLES = ("two", "plain", "chatml", "mpt", "llama_2")
IMAGE_RULES = ("llava", "next")


@dataclasses.dataclass(frozen=True)
class ConversationTemplate:
  """How turns are rendered to text (LLaVA's `Conversation` and its `SeparatorStyle`s).

  style: "two" ("ROLE: message" turns, LLaVA's TWO), "plain" (LLaVA's pretraining format: the
    image placeholders, then the caption), "chatml" (LLaVA-NeXT's CHATML: "role\\n" headers,
    turns closed by `sep` + "\\n"), "mpt" (LLaVA-NeXT's MPT: roles carry their "\\n", turns
    closed by `sep` alone) or "llama_2" ("[INST] q [/INST] a </s>").
  system: the system message ("" for none), without its markup; the style wraps it.
  roles: display names of the (human, gpt) roles, as LLaVA writes them.
  sep: text after each human turn (and after the system prompt).
  sep2: text after each answer; the answer's end token, which is trained on.
  sep2_is_eos: encode `sep2` as the tokenizer's eos id instead of tokenizing its text.
  special_tokens: markup strings that are one token each in the model's vocabulary.
  add_bos: whether sequences start with the tokenizer's BOS (LLaVA's `tokenizer_image_token`
    keeps the tokenizer's own BOS: Llama / Mistral add one, Qwen2 and Yi do not).
  image_rule: where `<image>` goes in a human turn: "llava" (LLaVA-1.5's preprocess_multimodal:
    every placeholder moved to the front, each followed by "\\n", the text stripped) or "next"
    (LLaVA-NeXT's: a single placeholder not already first is moved to the front the same way;
    a turn that starts with it, or holds several, is kept verbatim).
  """

  name: str
  style: str
  system: str
  roles: tuple[str, str]
  sep: str
  sep2: str
  sep2_is_eos: bool
  special_tokens: tuple[str, ...] = ()
  add_bos: bool = True
  image_rule: str = "llava"

  def __post_init__(self):
    if self.style not in STYLES:
      raise ValueError(f"template {self.name!r}: style {self.style!r} is not one of {STYLES}")
    if self.image_rule not in IMAGE_RULES:
      raise ValueError(
        f"template {self.name!r}: image_rule {self.image_rule!r} not in {IMAGE_RULES}"
      )

  @property
  def stop_str(self) -> str:
    """Where sampling stops (LLaVA's `stop_str`): the text that closes an answer."""
    return self.sep2


_VICUNA_SYSTEM = (
  "A chat between a curious user and an artificial intelligence assistant. "
  "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_LLAVA_SYSTEM = (
  "A chat between a curious human and an artificial intelligence assistant. "
  "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

TEMPLATES: dict[str, ConversationTemplate] = {
  # LLaVA-1.5 training (`--version v1`) and evaluation (`--conv-mode vicuna_v1`); also the
  # template of llava-v1.6-vicuna-7b/13b.
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
  # The next three are LLaVA-NeXT's `conv_qwen`, `conv_chatml_direct` and
  # `conv_mistral_instruct` (LLaVA-VL/LLaVA-NeXT llava/conversation.py), trained through
  # `preprocess_qwen`, `preprocess_mpt` and `preprocess_llama_2` (llava/train/train.py).
  "qwen_1_5": ConversationTemplate(
    "qwen_1_5",
    "chatml",
    "You are a helpful assistant.",
    (f"{IM_START}user", f"{IM_START}assistant"),
    IM_END,
    IM_END,
    False,
    special_tokens=(IM_START, IM_END),
    add_bos=False,
    image_rule="next",
  ),  # fmt: skip
  "chatml_direct": ConversationTemplate(
    "chatml_direct",
    "mpt",
    "Answer the questions.",
    (f"{IM_START}user\n", f"{IM_START}assistant\n"),
    IM_END,
    IM_END,
    False,
    special_tokens=(IM_START, IM_END),
    add_bos=False,
    image_rule="next",
  ),  # fmt: skip
  "mistral_instruct": ConversationTemplate(
    "mistral_instruct",
    "llama_2",
    "",
    ("USER", "ASSISTANT"),
    "",
    "</s>",
    True,
    image_rule="next",
  ),  # fmt: skip
}
TEMPLATES["v1"] = TEMPLATES["vicuna_v1"]  # LLaVA registers the vicuna template under both names
# LLaVA-NeXT's other names for the same formats.
TEMPLATES["llava_mistral_instruct"] = TEMPLATES["mistral_instruct"]


def get_template(name: str) -> ConversationTemplate:
  """Looks a template up by name; an unknown name raises ValueError listing the known ones."""
  if name not in TEMPLATES:
    raise ValueError(f"unknown conversation template {name!r}; known: {sorted(TEMPLATES)}")
  return TEMPLATES[name]


@dataclasses.dataclass(frozen=True, eq=False)  # arrays: compare fields with numpy instead
class EncodedConversation:
  """One tokenized conversation.

  input_ids: int32 [T], starting with BOS where the template adds one; each image is
    `num_image_tokens` image ids.
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


def _place_images(value: str, image_rule: str) -> str:
  n = value.count(IMAGE_PLACEHOLDER)
  if n == 0:
    return value
  if image_rule == "next" and (n > 1 or value.startswith(IMAGE_PLACEHOLDER)):
    return value  # LLaVA-NeXT's preprocess_multimodal moves only a lone, not-leading image
  # LLaVA's preprocess_multimodal: "<image>\n" + rest.strip(). LLaVA-1.5 collapses several
  # placeholders in one turn into one; we keep the count so multi-image data stays aligned.
  return (IMAGE_PLACEHOLDER + "\n") * n + value.replace(IMAGE_PLACEHOLDER, "").strip()


def _normalise_turns(
  conversation: Any, record_id: str | None, ends_with: str, image_rule: str = "llava"
) -> list[tuple[str, str]]:
  """Validates turns and returns (role, value) pairs with each turn's images placed.

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
  return [(role, _place_images(value, image_rule)) for _, role, value in turns]


# ------------------------------------------------------------------------------------------
# Rendering to segments: (kind, text) whose texts concatenate to LLaVA's `get_prompt()`.
# ------------------------------------------------------------------------------------------

MARKUP, CONTENT, ANSWER, END = "markup", "content", "answer", "end"


def _render_segments(
  turns: list[tuple[str, str]], template: ConversationTemplate, record_id: str | None
) -> list[tuple[str, str]]:
  """(kind, text) segments. kind: MARKUP (the template's own text; its special tokens are one
  id each), CONTENT (a human turn's text), ANSWER (a gpt turn's text, trained) or END (`sep2`
  after an answer, trained). A trailing human turn ends with the assistant header (the
  generation prompt).
  """
  if template.style == "plain":
    if len(turns) > 2:
      raise ValueError(f"{_where(record_id)}the plain template takes one (image, caption) pair")
    images = turns[0][1].count(IMAGE_PLACEHOLDER)
    if images == 0:
      raise ValueError(f"{_where(record_id)}the plain template needs an {IMAGE_PLACEHOLDER}")
    segments = [(CONTENT, IMAGE_PLACEHOLDER * images)]
    if len(turns) == 2:
      segments += [(ANSWER, turns[1][1]), (END, template.sep2)]
    return segments

  user, assistant = template.roles
  system, sep, style = template.system, template.sep, template.style
  segments: list[tuple[str, str]] = []
  if style == "two":
    segments.append((MARKUP, system + sep))
  elif style == "chatml" and system:
    segments.append((MARKUP, f"{IM_START}system\n{system}{sep}\n"))
  elif style == "mpt" and system:
    segments.append((MARKUP, f"{IM_START}system\n{system}{sep}"))
  for k in range(0, len(turns), 2):
    question = turns[k][1]
    if style == "two":
      segments += [(MARKUP, f"{user}: "), (CONTENT, question), (MARKUP, f"{sep}{assistant}:")]
    elif style == "chatml":
      # The "\n" after an answer's <|im_end|> opens the next turn here, so a conversation ends
      # at its last <|im_end|>, where a sampled answer stops (the reference's get_prompt adds
      # that "\n" at the very end too).
      opening = f"{user}\n" if k == 0 else f"\n{user}\n"
      segments += [(MARKUP, opening), (CONTENT, question), (MARKUP, f"{sep}\n{assistant}\n")]
    elif style == "mpt":
      segments += [(MARKUP, user), (CONTENT, question), (MARKUP, sep + assistant)]
    else:  # llama_2: the system block opens the first instruction (LLaVA's wrap_sys)
      sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if k == 0 and system else ""
      opening = ("" if k == 0 else sep) + "[INST] " + sys_block
      segments += [(MARKUP, opening), (CONTENT, question), (MARKUP, " [/INST]")]
    if k + 1 < len(turns):
      answer = turns[k + 1][1]
      if style == "two":
        answer = " " + answer
      elif style == "llama_2":
        answer = f" {answer} "  # LLaVA-NeXT: " " + message + " " + sep2
      segments += [(ANSWER, answer), (END, template.sep2)]
  return segments


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


def special_token_id(tokenizer: PreTrainedTokenizerBase, token: str, template_name: str) -> int:
  """The id of a template markup token, which must be one token of the vocabulary."""
  token_id = tokenizer.convert_tokens_to_ids(token)
  if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
    raise ValueError(
      f"template {template_name!r} needs {token!r} as one token; the tokenizer has no such token"
    )
  return int(token_id)


def _end_ids(
  tokenizer: PreTrainedTokenizerBase, template: ConversationTemplate, image_token_id: int
) -> list[int]:
  if template.sep2_is_eos:
    if tokenizer.eos_token_id is None:
      raise ValueError(f"template {template.name!r} ends answers with eos; tokenizer has none")
    return [tokenizer.eos_token_id]
  if template.sep2 in template.special_tokens:
    return [special_token_id(tokenizer, template.sep2, template.name)]
  return _encode_text(tokenizer, template.sep2, 1, image_token_id)


def _encode_segments(
  segments: list[tuple[str, str]],
  tokenizer: PreTrainedTokenizerBase,
  template: ConversationTemplate,
  num_image_tokens: int,
  image_token_id: int,
  add_bos: bool,
) -> tuple[np.ndarray, np.ndarray]:
  """Token ids and labels. Consecutive markup and content texts are tokenized in one call (so
  "{system} USER: {q} ASSISTANT:" is one piece, as before the NeXT templates existed); the
  template's special tokens split that text and become their own ids."""
  specials = {t: special_token_id(tokenizer, t, template.name) for t in template.special_tokens}
  split = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None
  input_ids: list[int] = []
  labels: list[int] = []
  pending: list[str] = []

  def emit(ids: list[int], trained: bool) -> None:
    input_ids.extend(ids)
    labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))

  def flush() -> None:
    if pending:
      emit(_encode_text(tokenizer, "".join(pending), num_image_tokens, image_token_id), False)
      pending.clear()

  if add_bos:
    if tokenizer.bos_token_id is None:
      raise ValueError(f"template {template.name!r} adds BOS but the tokenizer has no bos_token_id")
    emit([tokenizer.bos_token_id], False)
  for kind, text in segments:
    if kind == CONTENT or (kind == MARKUP and split is None):
      pending.append(text)
    elif kind == MARKUP:
      for part in split.split(text):
        if part in specials:
          flush()
          emit([specials[part]], False)
        elif part:
          pending.append(part)
    elif kind == ANSWER:
      flush()
      emit(_encode_text(tokenizer, text, num_image_tokens, image_token_id), True)
    else:  # END
      flush()
      emit(_end_ids(tokenizer, template, image_token_id), True)
  flush()
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
  add_bos: bool | None = None,
) -> EncodedConversation:
  """Token ids and SFT labels for a LLaVA conversation that ends with an answer.

  Args:
    conversation: LLaVA turns, `[{"from": "human" | "gpt", "value": str}, ...]`.
    tokenizer: an HF tokenizer (needs `encode`, `bos_token_id`, `eos_token_id`, and the
      template's special tokens).
    template: a ConversationTemplate or its registered name.
    num_image_tokens: ids per image (P, e.g. 576); the vision tower's patch count.
    image_token_id: the id standing for one image patch (HF `image_token_index`).
    num_images: images supplied with the record; when given, the placeholder count must
      equal it (a missing placeholder would leave an image unused, as LLaVA silently does).
    record_id: named in error messages.
    add_bos: prepend the tokenizer's BOS; None takes the template's `add_bos`.

  Returns:
    EncodedConversation with input_ids / labels int32 [T]; labels are IGNORE_INDEX except on
    each answer's tokens and its end token.
  """
  template = get_template(template) if isinstance(template, str) else template
  _check_image_args(num_image_tokens, image_token_id)
  turns = _normalise_turns(conversation, record_id, GPT, template.image_rule)
  found = _count_images(turns, num_images, record_id)
  segments = _render_segments(turns, template, record_id)
  bos = template.add_bos if add_bos is None else add_bos
  input_ids, labels = _encode_segments(
    segments, tokenizer, template, num_image_tokens, image_token_id, bos
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
  add_bos: bool | None = None,
) -> EncodedConversation:
  """Token ids of a prompt to sample from, ending where the answer starts ("ASSISTANT:" with
  no trailing space, "<|im_start|>assistant\\n", "[/INST]").

  `conversation` is a question string (an `<image>` is put first when `with_image`) or LLaVA
  turns ending with a human turn (earlier answers are context). Labels are all IGNORE_INDEX.
  The ids equal the prefix that `encode_conversation` produces for the same turns plus an
  answer, so a sampled answer can be scored by appending its ids.
  """
  template = get_template(template) if isinstance(template, str) else template
  _check_image_args(num_image_tokens, image_token_id)
  if isinstance(conversation, str):
    conversation = [{"from": HUMAN, "value": _question(conversation, with_image)}]
  turns = _normalise_turns(conversation, record_id, HUMAN, template.image_rule)
  found = _count_images(turns, num_images, record_id)
  segments = _render_segments(turns, template, record_id)
  bos = template.add_bos if add_bos is None else add_bos
  input_ids, _ = _encode_segments(
    segments, tokenizer, template, num_image_tokens, image_token_id, bos
  )
  return EncodedConversation(input_ids, np.full_like(input_ids, IGNORE_INDEX), found)


def answer_stop_ids(
  tokenizer: PreTrainedTokenizerBase, template: ConversationTemplate | str
) -> tuple[int, ...]:
  """Token ids that end a sampled answer: the template's end token (eos, <|im_end|>, or the
  single id of its end text) and the tokenizer's eos."""
  template = get_template(template) if isinstance(template, str) else template
  ids = []
  if not template.sep2_is_eos:
    end = _end_ids(tokenizer, template, image_token_id=0)
    if len(end) == 1:
      ids.append(end[0])
  if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
    ids.append(int(tokenizer.eos_token_id))
  if not ids:
    raise ValueError(f"template {template.name!r}: no single token ends an answer, and no eos")
  return tuple(ids)


def _question(question: str, with_image: bool) -> str:
  if with_image and IMAGE_PLACEHOLDER not in question:
    return f"{IMAGE_PLACEHOLDER}\n{question}"
  return question


def render_conversation(
  conversation: Sequence[Mapping[str, str]], template: ConversationTemplate | str
) -> str:
  """The prompt text, identical to LLaVA's `conv.get_prompt()` after `preprocess_multimodal`
  (for qwen_1_5, less the "\\n" the reference writes after the last <|im_end|>).

  For the plain template it is `preprocess_plain`'s "<image>" + caption + "\\n". No BOS.
  """
  template = get_template(template) if isinstance(template, str) else template
  # Rendering serves both finished conversations and generation prompts.
  last = conversation[-1] if isinstance(conversation, Sequence) and conversation else None
  ends_with = HUMAN if isinstance(last, Mapping) and last.get("from") == HUMAN else GPT
  turns = _normalise_turns(conversation, None, ends_with, template.image_rule)
  return "".join(text for _, text in _render_segments(turns, template, None))


def generation_prompt(
  question: str, template: ConversationTemplate | str, with_image: bool = True
) -> str:
  """LLaVA's single-turn sampling prompt, e.g. "{system} USER: <image>\\n{q} ASSISTANT:"."""
  return render_conversation([{"from": HUMAN, "value": _question(question, with_image)}], template)
