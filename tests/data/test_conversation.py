"""Conversation templates and LLaVA label masks, against hand-worked token pieces."""

import re

import numpy as np
import pytest

from lmm_align.data import conversation as conv
from lmm_align.data.tokenizer import train_bpe_tokenizer

IGNORE = conv.IGNORE_INDEX
NUM_IMAGE_TOKENS = 3
VICUNA_SYSTEM = (
  "A chat between a curious user and an artificial intelligence assistant. "
  "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
TWO_ROUNDS = [
  {"from": "human", "value": "What colour is the circle?\n<image>"},
  {"from": "gpt", "value": "The circle is red."},
  {"from": "human", "value": "Where is it?"},
  {"from": "gpt", "value": "It is on the left."},
]


@pytest.fixture(scope="module")
def tok():
  corpus = [
    VICUNA_SYSTEM,
    "USER: What colour is the circle? ASSISTANT: The circle is red.</s>",
    "USER: Where is it? ASSISTANT: It is on the left.</s>",
    "a blue square above a green triangle",
  ] * 4
  return train_bpe_tokenizer(corpus, vocab_size=400)


def _ids(tok, text):
  return tok.encode(text, add_special_tokens=False)


def test_templates_match_llava():
  vicuna, llava = conv.get_template("vicuna_v1"), conv.get_template("llava_v1")
  assert vicuna.system == VICUNA_SYSTEM
  assert llava.system == VICUNA_SYSTEM.replace("curious user", "curious human").replace(
    "the user's", "the human's"
  )
  for t in (vicuna, llava):
    assert (t.roles, t.sep, t.sep2, t.stop_str) == (("USER", "ASSISTANT"), " ", "</s>", "</s>")
  assert conv.get_template("v1") is vicuna
  with pytest.raises(ValueError, match="unknown conversation template"):
    conv.get_template("chatml")


def test_render_is_llava_get_prompt():
  # PROTOCOLS.md §1.2: "{SYS} USER: <image>\n{q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT: {a2}</s>",
  # with preprocess_multimodal having moved the image to the front of the first turn.
  expected = (
    f"{VICUNA_SYSTEM} USER: <image>\nWhat colour is the circle? ASSISTANT: The circle is red.</s>"
    "USER: Where is it? ASSISTANT: It is on the left.</s>"
  )
  assert conv.render_conversation(TWO_ROUNDS, "vicuna_v1") == expected
  assert conv.generation_prompt("Is it red?", "vicuna_v1") == (
    f"{VICUNA_SYSTEM} USER: <image>\nIs it red? ASSISTANT:"
  )
  assert conv.generation_prompt("Is it red?", "llava_v1", with_image=False).endswith(
    "human's questions. USER: Is it red? ASSISTANT:"
  )


def test_two_round_labels_hand_worked(tok):
  image_id = tok.image_token_id
  pieces = [
    # (token ids, trained?)
    ([tok.bos_token_id], False),
    (_ids(tok, VICUNA_SYSTEM + " USER: "), False),
    ([image_id] * NUM_IMAGE_TOKENS, False),
    (_ids(tok, "\nWhat colour is the circle? ASSISTANT:"), False),
    (_ids(tok, " The circle is red."), True),
    ([tok.eos_token_id], True),
    (_ids(tok, "USER: Where is it? ASSISTANT:"), False),
    (_ids(tok, " It is on the left."), True),
    ([tok.eos_token_id], True),
  ]
  expected_ids = [i for ids, _ in pieces for i in ids]
  expected_labels = [i if trained else IGNORE for ids, trained in pieces for i in ids]

  enc = conv.encode_conversation(TWO_ROUNDS, tok, "vicuna_v1", NUM_IMAGE_TOKENS, image_id)
  assert enc.input_ids.dtype == np.int32 and enc.labels.dtype == np.int32
  assert enc.input_ids.tolist() == expected_ids
  assert enc.labels.tolist() == expected_labels
  assert enc.num_images == 1
  # Decoding gives back the rendered prompt, and the trained tokens are exactly the answers.
  rendered = conv.render_conversation(TWO_ROUNDS, "vicuna_v1")
  assert tok.decode(enc.input_ids) == "<s>" + rendered.replace("<image>", "<image>" * 3)
  trained = enc.input_ids[enc.labels != IGNORE]
  assert tok.decode(trained) == " The circle is red.</s> It is on the left.</s>"


def test_generation_prompt_is_the_training_prefix(tok):
  image_id = tok.image_token_id
  full = conv.encode_conversation(TWO_ROUNDS, tok, "llava_v1", NUM_IMAGE_TOKENS, image_id)
  first_question = conv.encode_generation_prompt(
    "What colour is the circle?", tok, "llava_v1", NUM_IMAGE_TOKENS, image_id
  )
  n = len(first_question.input_ids)
  assert full.input_ids[:n].tolist() == first_question.input_ids.tolist()
  assert (first_question.labels == IGNORE).all()
  assert full.labels[n - 1] == IGNORE and full.labels[n] != IGNORE  # the answer starts at n
  # With history: everything up to the second "ASSISTANT:".
  second = conv.encode_generation_prompt(TWO_ROUNDS[:3], tok, "llava_v1", 3, image_id)
  m = len(second.input_ids)
  assert full.input_ids[:m].tolist() == second.input_ids.tolist()
  assert tok.decode(second.input_ids).endswith("USER: Where is it? ASSISTANT:")
  assert second.num_images == 1


def test_plain_template_is_llava_pretraining(tok):
  image_id = tok.image_token_id
  record = [
    {"from": "human", "value": "Describe the image briefly.\n<image>"},
    {"from": "gpt", "value": "a red circle"},
  ]
  assert conv.render_conversation(record, "plain") == "<image>a red circle\n"
  enc = conv.encode_conversation(record, tok, "plain", 2, image_id)
  caption = _ids(tok, "a red circle") + _ids(tok, "\n")
  assert enc.input_ids.tolist() == [tok.bos_token_id, image_id, image_id] + caption
  assert enc.labels.tolist() == [IGNORE] * 3 + caption
  prompt = conv.encode_generation_prompt("ignored", tok, "plain", 2, image_id)
  assert prompt.input_ids.tolist() == [tok.bos_token_id, image_id, image_id]
  with pytest.raises(ValueError, match="needs an <image>"):
    conv.encode_conversation(
      [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}], tok, "plain", 2, image_id
    )
  with pytest.raises(ValueError, match="one \\(image, caption\\) pair"):
    conv.encode_conversation(TWO_ROUNDS, tok, "plain", 2, image_id)


def test_leading_gpt_turn_is_dropped_like_llava(tok):
  with_greeting = [{"from": "gpt", "value": "Hello!"}] + TWO_ROUNDS
  a = conv.encode_conversation(with_greeting, tok, "vicuna_v1", 2, tok.image_token_id)
  b = conv.encode_conversation(TWO_ROUNDS, tok, "vicuna_v1", 2, tok.image_token_id)
  np.testing.assert_array_equal(a.input_ids, b.input_ids)
  np.testing.assert_array_equal(a.labels, b.labels)


def test_image_moved_to_front_and_text_only(tok):
  mid = [{"from": "human", "value": "  Look: <image> what is it? "}, {"from": "gpt", "value": "A"}]
  assert "USER: <image>\nLook:  what is it? ASSISTANT: A</s>" in conv.render_conversation(
    mid, "vicuna_v1"
  )
  text_only = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
  enc = conv.encode_conversation(text_only, tok, "vicuna_v1", 5, tok.image_token_id, num_images=0)
  assert enc.num_images == 0 and tok.image_token_id not in enc.input_ids.tolist()


def test_literal_special_token_text_stays_text(tok):
  # "</s>" typed inside an answer must not become an eos that the mask does not expect.
  record = [{"from": "human", "value": "Say </s>"}, {"from": "gpt", "value": "ok </s> done"}]
  enc = conv.encode_conversation(record, tok, "vicuna_v1", 1, tok.image_token_id)
  assert enc.input_ids.tolist().count(tok.eos_token_id) == 1
  assert enc.input_ids[-1] == tok.eos_token_id


def _encode(record, tok, **kw):
  return conv.encode_conversation(record, tok, "vicuna_v1", 2, tok.image_token_id, **kw)


H = lambda v: {"from": "human", "value": v}
G = lambda v: {"from": "gpt", "value": v}


@pytest.mark.parametrize(
  "record, kwargs, match",
  [
    ([], {}, "record 'r7': empty conversation"),
    ("USER: hi", {}, "must be a list of turns"),
    ([G("only an answer")], {}, "no human turn"),
    ([H("a"), H("b"), G("c")], {}, "turn 1 field 'from': roles must alternate"),
    ([G("x"), H("a"), G("b"), G("c")], {}, "turn 3 field 'from': roles must alternate"),
    ([H("a"), G("  ")], {}, "turn 1 field 'value': empty"),
    ([H(""), G("b")], {}, "turn 0 field 'value': empty"),
    ([H("a"), G(None)], {}, "turn 1 field 'value'"),
    ([H("a"), {"from": "bot", "value": "b"}], {}, "turn 1 field 'from': 'bot'"),
    ([H("a"), {"value": "b"}], {}, "turn 1: needs 'from' and 'value'"),
    ([H("<image>\na"), G("see <image>")], {}, "turn 1 field 'value': <image> in a gpt turn"),
    ([H("<image>\na"), G("b")], {"num_images": 0}, r"more <image> placeholders \(1\) than images"),
    ([H("<image><image>a"), G("b")], {"num_images": 1}, r"more <image> placeholders \(2\)"),
    ([H("a"), G("b")], {"num_images": 1}, r"fewer <image> placeholders \(0\)"),
    ([H("a"), G("b"), H("c")], {}, "must end with an answer"),
  ],
)
def test_bad_conversations_raise(tok, record, kwargs, match):
  with pytest.raises(ValueError, match=match):
    _encode(record, tok, record_id="r7", **kwargs)


def test_error_without_record_id_and_bad_args(tok):
  with pytest.raises(ValueError, match="^turn 1 field 'from'"):
    _encode([H("a"), H("b")], tok)
  with pytest.raises(ValueError, match="num_image_tokens"):
    conv.encode_conversation(TWO_ROUNDS, tok, "vicuna_v1", 0, tok.image_token_id)
  with pytest.raises(ValueError, match="must end with a question"):
    conv.encode_generation_prompt(TWO_ROUNDS, tok, "vicuna_v1", 1, tok.image_token_id)


def test_multiple_images_keep_their_count(tok):
  record = [H("<image> and <image>: same?"), G("No.")]
  enc = _encode(record, tok, num_images=2)
  assert enc.num_images == 2
  assert enc.input_ids.tolist().count(tok.image_token_id) == 4
  assert conv.render_conversation(record, "vicuna_v1").endswith(
    "USER: <image>\n<image>\nand : same? ASSISTANT: No.</s>"
  )


# ------------------------------------------------------------------------------------------
# The LLaVA-NeXT / OneVision templates (LLaVA-VL/LLaVA-NeXT llava/conversation.py: conv_qwen,
# conv_chatml_direct, conv_mistral_instruct; labels as llava/train/train.py's preprocess_qwen,
# preprocess_mpt, preprocess_llama_2).
# ------------------------------------------------------------------------------------------

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# get_prompt() of each template for TWO_ROUNDS, written out from the reference's rules.
NEXT_PROMPTS = {
  "qwen_1_5": (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<image>\nWhat colour is the circle?<|im_end|>\n"
    "<|im_start|>assistant\nThe circle is red.<|im_end|>\n"
    "<|im_start|>user\nWhere is it?<|im_end|>\n"
    "<|im_start|>assistant\nIt is on the left.<|im_end|>\n"
  ),
  "chatml_direct": (
    "<|im_start|>system\nAnswer the questions.<|im_end|>"
    "<|im_start|>user\n<image>\nWhat colour is the circle?<|im_end|>"
    "<|im_start|>assistant\nThe circle is red.<|im_end|>"
    "<|im_start|>user\nWhere is it?<|im_end|>"
    "<|im_start|>assistant\nIt is on the left.<|im_end|>"
  ),
  "mistral_instruct": (
    "[INST] <image>\nWhat colour is the circle? [/INST] The circle is red. </s>"
    "[INST] Where is it? [/INST] It is on the left. </s>"
  ),
}
NEXT_GENERATION_PROMPTS = {
  "qwen_1_5": (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<image>\nIs it red?<|im_end|>\n<|im_start|>assistant\n"
  ),
  "chatml_direct": (
    "<|im_start|>system\nAnswer the questions.<|im_end|>"
    "<|im_start|>user\n<image>\nIs it red?<|im_end|><|im_start|>assistant\n"
  ),
  "mistral_instruct": "[INST] <image>\nIs it red? [/INST]",
}

# Chat templates copied as data from the transformers side, to render with apply_chat_template:
# - LLaVA-NeXT's preprocess_qwen (llava/train/train.py) sets this on the Qwen tokenizer and
#   tokenizes the system message and each turn with it: the reference's own token ids.
NEXT_QWEN_JINJA = (
  "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
  "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
  "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# - llava-hf/llava-v1.6-mistral-7b-hf's processor chat_template (the llava-hf push script's
#   chat_mistral). Its assistant turn is " {a}<\s> ", not LLaVA-NeXT's " {a} </s>", so only
#   the generation prompt is compared.
HF_MISTRAL_JINJA = (
  "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + "
  "message['content'][0]['text'] + '\n<</SYS>>\n\n' }}{% elif message['role'] == 'user' %}"
  "{{ '[INST] ' }}{# Render all images first #}{% for content in message['content'] | "
  "selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text "
  "next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
  "{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}"
  "{{ ' ' + message['content'][0]['text'] + '<\\\\s> '}}{% else %}{{ raise_exception('Only "
  "user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# (llava-hf's llava-v1.6-vicuna and llava-onevision templates do not render the training formats:
# the first prints a system message twice and none by default, the second writes
# "<|im_start|>user <image>\n..." with no system turn; they are not compared.)


@pytest.fixture(scope="module")
def chat_tok():
  corpus = [*NEXT_PROMPTS.values(), VICUNA_SYSTEM] * 4
  tokenizer = train_bpe_tokenizer(corpus, vocab_size=400)
  tokenizer.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
  return tokenizer


@pytest.mark.parametrize("name", sorted(NEXT_PROMPTS))
def test_next_templates_render_the_reference_prompt(name):
  rendered = conv.render_conversation(TWO_ROUNDS, name)
  # qwen_1_5 stops at the last <|im_end|>, where a sampled answer stops; the reference's
  # get_prompt writes one more "\n" after it.
  assert rendered + ("\n" if name == "qwen_1_5" else "") == NEXT_PROMPTS[name]
  assert conv.generation_prompt("Is it red?", name) == NEXT_GENERATION_PROMPTS[name]
  history = conv.render_conversation(TWO_ROUNDS[:3], name)
  assert NEXT_PROMPTS[name].startswith(history) and history.endswith("Where is it?" + {
    "qwen_1_5": "<|im_end|>\n<|im_start|>assistant\n",
    "chatml_direct": "<|im_end|><|im_start|>assistant\n",
    "mistral_instruct": " [/INST]",
  }[name])  # fmt: skip
  assert conv.get_template("llava_mistral_instruct") is conv.get_template("mistral_instruct")


def _expected(tok, spec):
  """ids and labels from (piece, trained) pairs: a piece is text, a special token name, or
  an int id."""
  ids, labels = [], []
  for piece, trained in spec:
    if isinstance(piece, int):
      piece_ids = [piece]
    elif piece in (IM_START, IM_END):
      piece_ids = [tok.convert_tokens_to_ids(piece)]
    else:
      piece_ids = _ids(tok, piece)
    ids += piece_ids
    labels += piece_ids if trained else [IGNORE] * len(piece_ids)
  return ids, labels


def _next_spec(tok, name):
  img = [(tok.image_token_id, False)] * NUM_IMAGE_TOKENS
  if name == "qwen_1_5":
    return [
      (IM_START, False), ("system\nYou are a helpful assistant.", False), (IM_END, False),
      ("\n", False), (IM_START, False), ("user\n", False), *img,
      ("\nWhat colour is the circle?", False), (IM_END, False), ("\n", False), (IM_START, False),
      ("assistant\n", False), ("The circle is red.", True), (IM_END, True), ("\n", False),
      (IM_START, False), ("user\nWhere is it?", False), (IM_END, False), ("\n", False),
      (IM_START, False), ("assistant\n", False), ("It is on the left.", True), (IM_END, True),
    ]  # fmt: skip
  if name == "chatml_direct":
    return [
      (IM_START, False), ("system\nAnswer the questions.", False), (IM_END, False),
      (IM_START, False), ("user\n", False), *img, ("\nWhat colour is the circle?", False),
      (IM_END, False), (IM_START, False), ("assistant\n", False), ("The circle is red.", True),
      (IM_END, True), (IM_START, False), ("user\nWhere is it?", False), (IM_END, False),
      (IM_START, False), ("assistant\n", False), ("It is on the left.", True), (IM_END, True),
    ]  # fmt: skip
  return [  # mistral_instruct: BOS, and answers keep the space before </s>
    (tok.bos_token_id, False), ("[INST] ", False), *img,
    ("\nWhat colour is the circle? [/INST]", False), (" The circle is red. ", True),
    (tok.eos_token_id, True), ("[INST] Where is it? [/INST]", False),
    (" It is on the left. ", True), (tok.eos_token_id, True),
  ]  # fmt: skip


@pytest.mark.parametrize("name", sorted(NEXT_PROMPTS))
def test_next_templates_ids_and_labels(chat_tok, name):
  tok = chat_tok
  expected_ids, expected_labels = _expected(tok, _next_spec(tok, name))
  enc = conv.encode_conversation(TWO_ROUNDS, tok, name, NUM_IMAGE_TOKENS, tok.image_token_id)
  assert enc.input_ids.tolist() == expected_ids
  assert enc.labels.tolist() == expected_labels
  # The ids decode to the reference prompt; the trained tokens are the answers and their ends.
  decoded = tok.decode(enc.input_ids).replace("<image>" * NUM_IMAGE_TOKENS, "<image>")
  bos = "<s>" if name == "mistral_instruct" else ""
  assert decoded == bos + conv.render_conversation(TWO_ROUNDS, name)
  answers = ("The circle is red.", "It is on the left.")
  if name == "mistral_instruct":
    answers = tuple(f" {a} </s>" for a in answers)
  else:
    answers = tuple(a + IM_END for a in answers)
  assert tok.decode(enc.input_ids[enc.labels != IGNORE]) == "".join(answers)
  # The generation prompt is the training prefix up to where the answer starts.
  prompt = conv.encode_generation_prompt(
    "What colour is the circle?", tok, name, NUM_IMAGE_TOKENS, tok.image_token_id
  )
  n = len(prompt.input_ids)
  assert enc.input_ids[:n].tolist() == prompt.input_ids.tolist()
  assert enc.labels[n - 1] == IGNORE and enc.labels[n] != IGNORE
  second = conv.encode_generation_prompt(TWO_ROUNDS[:3], tok, name, 3, tok.image_token_id)
  m = len(second.input_ids)
  assert enc.input_ids[:m].tolist() == second.input_ids.tolist() and enc.labels[m] != IGNORE
  end_id = tok.eos_token_id if name == "mistral_instruct" else tok.convert_tokens_to_ids(IM_END)
  assert conv.answer_stop_ids(tok, name)[0] == end_id


def test_qwen_ids_equal_llava_next_preprocess_qwen(chat_tok):
  """preprocess_qwen tokenizes the system message and each turn with its chat template via
  apply_chat_template; with "<image>" a special token (one image id) the ids are ours."""
  tok = chat_tok
  turns = [{"role": "system", "content": "You are a helpful assistant."}] + [
    {"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
    for t in [{"from": "human", "value": "<image>\nWhat colour is the circle?"}, *TWO_ROUNDS[1:]]
  ]
  ref_ids, ref_labels = [], []
  for turn in turns:
    ids = tok.apply_chat_template([turn], chat_template=NEXT_QWEN_JINJA, return_dict=False)
    ref_ids += ids
    ref_labels += ids if turn["role"] == "assistant" else [IGNORE] * len(ids)
  markup = {tok.convert_tokens_to_ids(IM_START), tok.convert_tokens_to_ids(IM_END)}
  markup |= set(_ids(tok, "\n"))
  ref_labels = [i if i in markup else label for i, label in zip(ref_ids, ref_labels)]

  enc = conv.encode_conversation(TWO_ROUNDS, tok, "qwen_1_5", 1, tok.image_token_id)
  # The reference's last token is the "\n" after the final <|im_end|>, where ours stop.
  assert ref_ids[-1:] == _ids(tok, "\n")
  ref_ids, ref_labels = ref_ids[:-1], ref_labels[:-1]
  assert enc.input_ids.tolist() == ref_ids
  # Ours trains a subset of the reference's positions; the rest is only template markup.
  ours = enc.labels != IGNORE
  theirs = np.asarray(ref_labels) != IGNORE
  assert not (ours & ~theirs).any()
  extra = tok.decode(enc.input_ids[theirs & ~ours])
  assert re.fullmatch(r"(<\|im_start\|>|<\|im_end\|>|\n|assistant)*", extra), extra
  # Rendered as text with add_generation_prompt, the reference's template is our prompt.
  text = tok.apply_chat_template(
    turns[:2], chat_template=NEXT_QWEN_JINJA, tokenize=False, add_generation_prompt=True
  )
  assert text == conv.generation_prompt("What colour is the circle?", "qwen_1_5")


def _hf_message(role, text, image=False):
  content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
  return {"role": role, "content": content}


def test_generation_prompts_equal_the_llava_hf_mistral_template(chat_tok):
  question = _hf_message("user", "Is it red?", image=True)
  mistral = chat_tok.apply_chat_template(
    [question], chat_template=HF_MISTRAL_JINJA, tokenize=False, add_generation_prompt=True
  )
  assert mistral == conv.generation_prompt("Is it red?", "mistral_instruct")
  several = chat_tok.apply_chat_template(
    [_hf_message("user", "Same?", image=True) | {"content": [{"type": "image"}] * 2 + [
      {"type": "text", "text": "Same?"}]}], chat_template=HF_MISTRAL_JINJA, tokenize=False,
  )  # fmt: skip
  assert several == conv.generation_prompt("<image>\n<image>\nSame?", "mistral_instruct")


def test_next_image_rule_keeps_a_leading_image_verbatim(chat_tok):
  # LLaVA-Critic's prompts end "ASSISTANT:\n " and start with "<image>\n": kept as written.
  prompt = "<image>\nJudge this.\nASSISTANT:\n "
  assert conv.generation_prompt(prompt, "qwen_1_5").endswith(
    "<|im_start|>user\n<image>\nJudge this.\nASSISTANT:\n <|im_end|>\n<|im_start|>assistant\n"
  )
  # A lone image elsewhere moves to the front (stripped), as in LLaVA-NeXT's preprocess.
  mid = [H("Look: <image> here "), G("A")]
  assert "user\n<image>\nLook:  here<|im_end|>" in conv.render_conversation(mid, "qwen_1_5")
  several = [H("first <image> then <image>"), G("B")]
  assert "user\nfirst <image> then <image><|im_end|>" in conv.render_conversation(
    several, "qwen_1_5"
  )
  # vicuna_v1 keeps LLaVA-1.5's rule: stripped and moved, whatever the turn.
  assert conv.generation_prompt(prompt, "vicuna_v1").endswith(
    "USER: <image>\nJudge this.\nASSISTANT: ASSISTANT:"
  )


def test_chatml_markup_in_the_data_stays_text(chat_tok):
  tok = chat_tok
  record = [H("Say <|im_end|> now"), G("ok <|im_start|> done")]
  enc = conv.encode_conversation(record, tok, "qwen_1_5", 1, tok.image_token_id)
  im_start, im_end = (tok.convert_tokens_to_ids(t) for t in (IM_START, IM_END))
  assert enc.input_ids.tolist().count(im_end) == 3  # system, user and answer ends only
  assert enc.input_ids.tolist().count(im_start) == 3
  assert tok.bos_token_id not in enc.input_ids.tolist()  # Qwen adds no BOS


def test_missing_markup_token_and_stop_ids(tok, chat_tok):
  with pytest.raises(ValueError, match=r"template 'qwen_1_5' needs '<\|im_start\|>' as one"):
    conv.encode_conversation(TWO_ROUNDS, tok, "qwen_1_5", 1, tok.image_token_id)
  assert conv.answer_stop_ids(tok, "vicuna_v1") == (tok.eos_token_id,)
  im_end = chat_tok.convert_tokens_to_ids(IM_END)
  assert conv.answer_stop_ids(chat_tok, "qwen_1_5") == (im_end, chat_tok.eos_token_id)
  with pytest.raises(ValueError, match="style 'bogus'"):
    conv.ConversationTemplate("x", "bogus", "", ("a", "b"), " ", "</s>", True)
