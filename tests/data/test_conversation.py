"""Conversation templates and LLaVA label masks, against hand-worked token pieces."""

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
