"""The reward prompt in non-USER/ASSISTANT chat templates (LLaVA-OneVision's ChatML qwen_1_5,
chatml_direct, mistral_instruct): token ids against transformers' chat template and the
template written out by hand, labels, the score position, and LLaVA-1.5's ids unchanged."""

import numpy as np
import pytest

from lmm_align.data import reward_data as rd
from lmm_align.data.conversation import IGNORE_INDEX, IM_END, IM_START, get_template
from lmm_align.data.tokenizer import train_bpe_tokenizer
from lmm_align.models.heads import sequence_scores

IMAGE_ID = 4  # <image> in train_bpe_tokenizer: one id, so a placeholder is one token here
FACTS = ["A red circle sits in the middle.", "The background is white.", "One shape in total."]
QUESTION, ANSWER = "What is in the image?", "A red circle on white."
# LLaVA-NeXT's preprocess_qwen sets this chat template on the Qwen tokenizer (as in
# tests/data/test_conversation.py).
QWEN_JINJA = (
  "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
  "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
  "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
  texts = [get_template("vicuna_v1").system, get_template("qwen_1_5").system, QUESTION, ANSWER]
  texts += [rd.DEFAULT_FACT_PROMPT, rd.DEFAULT_FACT_LEAD_IN, *FACTS]
  tokenizer = train_bpe_tokenizer(texts * 2, vocab_size=500)
  tokenizer.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
  return tokenizer


def _texts(facts_position="after_response", seed=3):
  prompt = rd.load_reward_prompt(None, fact_augmented=True)
  return rd.reward_texts(
    QUESTION, prompt, FACTS, np.random.default_rng(seed), fact_augmented=True,
    facts_position=facts_position,
  )  # fmt: skip


def _encode(tok, template, facts_position="after_response", answer=ANSWER):
  question, suffix = _texts(facts_position)
  return rd.encode_reward_ids_and_labels(
    question, answer, tok, template, 1, IMAGE_ID, suffix, True
  ), suffix


@pytest.mark.parametrize("facts_position", rd.FACTS_POSITIONS)
def test_qwen_reward_ids_equal_transformers_chat_template(tok, facts_position):
  (ids, labels), suffix = _encode(tok, "qwen_1_5", facts_position)
  question, _ = _texts(facts_position)
  request, opening = rd.split_request(suffix)
  assert request.startswith("Now review") and opening.endswith("my answer above is")
  assert ("  - " in request) == (facts_position == "after_response")
  assert ("  - " in question) == (facts_position == "before_response")
  turns = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": f"<image>\n{question}"},
    {"role": "assistant", "content": ANSWER},
    {"role": "user", "content": request},
  ]
  # preprocess_qwen tokenizes each turn with the chat template; the generation prompt and the
  # verdict's opening follow, the opening tokenized as an answer is.
  want = []
  for turn in turns:
    want += tok.apply_chat_template([turn], chat_template=QWEN_JINJA, return_dict=False)
  want += tok.encode(f"{IM_START}assistant\n", add_special_tokens=False)
  want += tok.encode(opening, add_special_tokens=False)
  assert ids.tolist() == want
  by_hand = (
    f"{IM_START}system\nYou are a helpful assistant.{IM_END}\n{IM_START}user\n<image>\n"
    f"{question}{IM_END}\n{IM_START}assistant\n{ANSWER}{IM_END}\n{IM_START}user\n{request}"
    f"{IM_END}\n{IM_START}assistant\n{opening}"
  )
  assert tok.decode(ids.tolist()) == by_hand
  # Labels: the answer and its <|im_end|>, nothing of the request.
  kept = labels != IGNORE_INDEX
  assert np.array_equal(labels[kept], ids[kept])
  assert tok.decode(ids[kept].tolist()) == ANSWER + IM_END
  assert (ids == IMAGE_ID).sum() == 1 and not kept[ids == IMAGE_ID].any()


@pytest.mark.parametrize(
  "name, between, header, space, trained",
  [
    ("chatml_direct", f"{IM_START}user\n", f"{IM_END}{IM_START}assistant\n", "", IM_END),
    ("mistral_instruct", "[INST] ", " [/INST]", " ", " </s>"),  # LLaVA-NeXT's " {a} </s>"
  ],
)
def test_other_templates_render_the_request_as_their_next_turn(
  tok, name, between, header, space, trained
):
  (ids, labels), suffix = _encode(tok, name)
  request, opening = rd.split_request(suffix)
  text = tok.decode(ids.tolist())
  tail = f"{between}{request}{header}{space}{opening}"
  assert text.endswith(f"{ANSWER}{trained}{tail}"), text[-200:]
  kept = labels != IGNORE_INDEX
  assert tok.decode(ids[kept].tolist()).strip() == ANSWER + trained
  n_tail = len(rd.suffix_ids(suffix, tok, name))
  assert not kept[-n_tail:].any() and kept[-n_tail - 1]  # the suffix follows the end token


def test_score_is_read_at_the_last_token_of_the_verdicts_opening(tok):
  """A ChatML pair, right-padded as the reward batches are: the head reads each sequence at
  its last real token, the opening's last token, after the answer's <|im_end|>."""
  prompt = rd.load_reward_prompt(None, fact_augmented=True)
  record = {"id": "r0", "image": None, "question": QUESTION, "chosen": ANSWER,
            "rejected": "A blue square.", "facts": FACTS}  # fmt: skip
  pair = rd.encode_reward_pair(
    record, tok, "qwen_1_5", 1, IMAGE_ID, prompt=prompt, fact_augmented=True,
    rng=np.random.default_rng(0),
  )  # fmt: skip
  _, suffix = rd.reward_texts(QUESTION, prompt, FACTS, np.random.default_rng(0),
                              fact_augmented=True)  # fmt: skip
  tail = rd.suffix_ids(suffix, tok, "qwen_1_5")
  opening = tok.encode(rd.split_request(suffix)[1], add_special_tokens=False)
  assert tail[-len(opening) :] == opening and tail[0] != tok.convert_tokens_to_ids(IM_END)
  rows = [pair.chosen_ids, pair.rejected_ids]
  width = max(map(len, rows)) + 3
  mask = np.zeros((2, width), np.int32)
  for i, row in enumerate(rows):
    assert row[-len(tail) :].tolist() == tail  # both answers end with the same request
    assert row[-len(tail) - 1] == tok.convert_tokens_to_ids(IM_END)
    mask[i, : len(row)] = 1
  positions = np.broadcast_to(np.arange(width, dtype=np.float32), (2, width))
  read_at = np.asarray(sequence_scores(positions, mask))
  assert read_at.tolist() == [len(rows[0]) - 1, len(rows[1]) - 1]


def test_llava_15_suffix_ids_are_unchanged(tok):
  """vicuna_v1 (and no template, as LLaVA-RLHF's callers pass) tokenize the text as written."""
  _, suffix = _texts()
  want = list(tok.encode(suffix, add_special_tokens=False, split_special_tokens=True))
  assert rd.suffix_ids(suffix, tok) == rd.suffix_ids(suffix, tok, "vicuna_v1") == want
  assert rd.suffix_ids(suffix, tok, "llava_v1") == want


def test_bad_prompts_and_templates_are_refused(tok):
  with pytest.raises(ValueError, match="must read 'USER: {request} ASSISTANT: {opening}'"):
    rd.suffix_ids(" Rate the answer. The score is", tok, "qwen_1_5")
  with pytest.raises(ValueError, match="must read"):
    rd.suffix_ids(" USER: Rate the answer. ASSISTANT:", tok, "qwen_1_5")  # no opening
  with pytest.raises(ValueError, match="'plain': a reward prompt needs a chat template"):
    rd.chat_template("plain")
  # A "two"-style template reads the text as written, roles or not.
  assert rd.suffix_ids(" Rate it.", tok, "vicuna_v1") == tok.encode(" Rate it.",
                                                                    add_special_tokens=False)  # fmt: skip
