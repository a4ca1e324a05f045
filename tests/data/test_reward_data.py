"""Reward-model inputs: fact blocks, prompts (ours and the published files), sequences, pairs."""

import numpy as np
import pytest

from lmm_align.data import reward_data as rd
from lmm_align.data.conversation import IGNORE_INDEX, encode_conversation, get_template
from lmm_align.data.preference import PreferenceData, PreferenceError, PreferencePair
from lmm_align.data.tokenizer import train_bpe_tokenizer

P, IMAGE_ID, TEMPLATE = 3, 4, "vicuna_v1"  # id 4 is <image> in train_bpe_tokenizer
FACTS = ["A red circle sits in the middle.", "The background is white.", "One shape in total."]


@pytest.fixture(scope="module")
def tokenizer():
  texts = [get_template(TEMPLATE).system, rd.DEFAULT_FACT_PROMPT, rd.DEFAULT_FACT_LEAD_IN]
  texts += ["USER: What is it? ASSISTANT: A red circle.</s>", *FACTS]
  return train_bpe_tokenizer(texts * 2, vocab_size=400)


def record(**overrides):
  base = {
    "id": "r0",
    "image": None,
    "question": "What is in the image?",
    "chosen": "A red circle.",
    "rejected": "A blue square.",
    "facts": FACTS,
  }
  return {**base, **overrides}


# ------------------------------------------------------------------------------------------
# Prompts and fact blocks.
# ------------------------------------------------------------------------------------------


def test_fact_block_lists_the_facts_in_the_rng_order():
  # default_rng(3).permutation(3) is [2, 1, 0]: the published layout, written out by hand.
  want = (
    "Facts:\n"
    "  - One shape in total.\n"
    "  - The background is white.\n"
    "  - A red circle sits in the middle.\n"
  )
  assert rd.fact_block(FACTS, np.random.default_rng(3), lead_in="Facts:\n") == want
  order = np.random.default_rng(11).permutation(3)
  block = rd.fact_block(FACTS, np.random.default_rng(11))
  assert block == rd.DEFAULT_FACT_LEAD_IN + "".join(f"  - {FACTS[i]}\n" for i in order)


def test_fact_block_adds_the_rationale_as_one_more_fact():
  rationale = "The circle is the only red object."
  block = rd.fact_block(FACTS, np.random.default_rng(0), rationale=rationale)
  items = [FACTS[0], FACTS[1], FACTS[2], rationale]
  order = np.random.default_rng(0).permutation(4)
  assert block == rd.DEFAULT_FACT_LEAD_IN + "".join(f"  - {items[i]}\n" for i in order)


@pytest.mark.parametrize("facts", [[], ["ok", " "], ["ok", 3]])
def test_fact_block_refuses_no_or_empty_facts(facts):
  with pytest.raises(ValueError, match="fact"):
    rd.fact_block(facts, np.random.default_rng(0))


def test_default_prompts_and_suffixes():
  fact_prompt = rd.load_reward_prompt(None, fact_augmented=True)
  vanilla = rd.load_reward_prompt(None, fact_augmented=False)
  assert fact_prompt == " " + rd.DEFAULT_FACT_PROMPT.strip()
  assert vanilla == " " + rd.DEFAULT_VANILLA_PROMPT.strip()
  assert rd.FACTS_PLACEHOLDER in fact_prompt and rd.FACTS_PLACEHOLDER not in vanilla
  for prompt in (fact_prompt, vanilla):  # the verdict is left open: read at the last token
    assert prompt.startswith(" USER: ") and prompt.endswith(" is")
    assert prompt.count("ASSISTANT:") == 1

  rng = np.random.default_rng(5)
  suffix = rd.reward_suffix(fact_prompt, FACTS, rng, fact_augmented=True)
  block = rd.fact_block(FACTS, np.random.default_rng(5))
  assert suffix == fact_prompt.replace("{factual_prompt}", block)
  assert "{" not in suffix and all(f"  - {f}\n" in suffix for f in FACTS)

  state = rng.bit_generator.state
  assert rd.reward_suffix(vanilla, FACTS, rng, fact_augmented=False) == vanilla
  assert rng.bit_generator.state == state  # the vanilla prompt draws nothing


def test_prompt_placeholder_mismatches_are_errors(tmp_path):
  without = tmp_path / "vanilla.txt"
  without.write_text("USER: Rate it. ASSISTANT: It is\n")
  with pytest.raises(ValueError, match=r"vanilla\.txt.*factual_prompt"):
    rd.load_reward_prompt(without, fact_augmented=True)
  assert rd.load_reward_prompt(without, fact_augmented=False) == " USER: Rate it. ASSISTANT: It is"
  with_facts = tmp_path / "fact.txt"
  with_facts.write_text("USER: Rate it. {factual_prompt} ASSISTANT: It is")
  with pytest.raises(ValueError, match=r"fact\.txt"):
    rd.load_reward_prompt(with_facts, fact_augmented=False)
  with pytest.raises(ValueError, match="missing.txt"):
    rd.load_reward_prompt(tmp_path / "missing.txt", fact_augmented=True)
  with pytest.raises(ValueError, match="factual_prompt"):
    rd.reward_suffix(" USER: x", FACTS, np.random.default_rng(0), fact_augmented=True)


def test_published_prompt_files_give_the_published_suffix(shared_reference_data):
  folder = shared_reference_data / "llava_rlhf_prompts"
  fact_text = (folder / "fact_rlhf_reward_prompt.txt").read_text()
  prompt = rd.load_reward_prompt(folder / "fact_rlhf_reward_prompt.txt", fact_augmented=True)
  assert prompt == " " + fact_text.strip()
  lead_in = "Lead-in sentence:\n"
  suffix = rd.reward_suffix(
    prompt, FACTS, np.random.default_rng(9), fact_augmented=True, lead_in=lead_in
  )
  block = lead_in + "".join(f"  - {FACTS[i]}\n" for i in np.random.default_rng(9).permutation(3))
  assert suffix == " " + fact_text.strip().format(factual_prompt=block)

  vanilla_text = (folder / "reward_prompt.txt").read_text()
  vanilla = rd.load_reward_prompt(folder / "reward_prompt.txt", fact_augmented=False)
  assert rd.reward_suffix(vanilla, None, np.random.default_rng(0), fact_augmented=False) == (
    " " + vanilla_text.strip()
  )
  with pytest.raises(ValueError, match="reward_prompt.txt"):
    rd.load_reward_prompt(folder / "reward_prompt.txt", fact_augmented=True)


# ------------------------------------------------------------------------------------------
# Sequences.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("has_image", [False, True])
def test_sequence_is_the_conversation_then_the_suffix_without_eos(tokenizer, has_image):
  suffix = rd.reward_suffix(
    rd.load_reward_prompt(None, True), FACTS, np.random.default_rng(0), fact_augmented=True
  )
  ids = rd.encode_reward_sequence(
    "What is it?", "A red circle.", tokenizer, TEMPLATE, P, IMAGE_ID, suffix, has_image
  )
  tail = rd.suffix_ids(suffix, tokenizer)
  assert tail == tokenizer.encode(suffix, add_special_tokens=False)
  assert tokenizer.decode(tail) == suffix
  question = ("<image>\n" if has_image else "") + "What is it?"
  turns = [{"from": "human", "value": question}, {"from": "gpt", "value": "A red circle."}]
  conv = encode_conversation(turns, tokenizer, TEMPLATE, P, IMAGE_ID).input_ids
  np.testing.assert_array_equal(ids, np.concatenate([conv, tail]))
  assert ids.dtype == np.int32
  assert conv[-1] == tokenizer.eos_token_id  # the answer's end token, then the request
  assert ids[-1] != tokenizer.eos_token_id and ids[-1] == tail[-1]
  assert (ids == IMAGE_ID).sum() == (P if has_image else 0)


def test_sequence_keeps_earlier_turns(tokenizer):
  history = [
    {"from": "human", "value": "<image>\nWhat is it?"},
    {"from": "gpt", "value": "A circle."},
  ]
  ids = rd.encode_reward_sequence(
    "Which colour?", "Red.", tokenizer, TEMPLATE, P, IMAGE_ID, " USER: ok ASSISTANT: is", True,
    history=history,
  )  # fmt: skip
  turns = history + [{"from": "human", "value": "Which colour?"}, {"from": "gpt", "value": "Red."}]
  conv = encode_conversation(turns, tokenizer, TEMPLATE, P, IMAGE_ID).input_ids
  tail = rd.suffix_ids(" USER: ok ASSISTANT: is", tokenizer)
  np.testing.assert_array_equal(ids, np.concatenate([conv, tail]))
  assert (ids == IMAGE_ID).sum() == P  # the placeholder stays in the first turn, once


def test_plain_template_and_image_in_suffix_are_refused(tokenizer):
  with pytest.raises(ValueError, match="plain"):
    rd.encode_reward_sequence("Q?", "A.", tokenizer, "plain", P, IMAGE_ID, " is", True)
  with pytest.raises(ValueError, match="<image>"):
    rd.suffix_ids(" USER: <image> is", tokenizer)


# ------------------------------------------------------------------------------------------
# Pairs.
# ------------------------------------------------------------------------------------------


def test_pair_shares_one_suffix_and_masks_only_the_answers(tokenizer):
  prompt = rd.load_reward_prompt(None, True)
  image = object()  # passed through untouched
  pair = rd.encode_reward_pair(
    record(image=image, rationale="Only one shape is red."), tokenizer, TEMPLATE, P, IMAGE_ID,
    prompt=prompt, fact_augmented=True, rng=np.random.default_rng(4),
  )  # fmt: skip
  assert isinstance(pair, PreferencePair) and pair.record_id == "r0" and pair.image is image
  facts = FACTS + ["Only one shape is red."]
  suffix = rd.reward_suffix(prompt, facts[:3], np.random.default_rng(4), fact_augmented=True,
                            rationale=facts[3])  # fmt: skip
  for side, answer in ((0, "A red circle."), (1, "A blue square.")):
    ids = (pair.chosen_ids, pair.rejected_ids)[side]
    labels = (pair.chosen_labels, pair.rejected_labels)[side]
    want = rd.encode_reward_sequence(
      "What is in the image?", answer, tokenizer, TEMPLATE, P, IMAGE_ID, suffix, True
    )
    np.testing.assert_array_equal(ids, want)
    tail = len(rd.suffix_ids(suffix, tokenizer))
    assert (labels[-tail:] == IGNORE_INDEX).all()
    labelled = ids[labels != IGNORE_INDEX]
    answer_ids = tokenizer.encode(" " + answer, add_special_tokens=False)
    assert list(labelled) == answer_ids + [tokenizer.eos_token_id]


@pytest.mark.parametrize(
  "overrides, field, reason",
  [
    ({"chosen": "  "}, "chosen", "empty_response"),
    ({"rejected": None}, "rejected", "empty_response"),
    ({"rejected": "A red circle. "}, "rejected", "identical_responses"),
    ({"facts": None}, "facts", "missing_facts"),
    ({"facts": []}, "facts", "missing_facts"),
    ({"facts": "A red circle."}, "facts", "bad_facts"),
    ({"question": ""}, "question", "bad_question"),
    ({"question": "<image>\nWhat?"}, "question", "bad_conversation"),  # no image given
    ({"history": "Earlier: hi"}, "history", "bad_conversation"),
    ({"history": [{"from": "gpt", "value": "Hi."}] * 2}, "history", "bad_conversation"),
  ],
)
def test_bad_records_name_record_and_field(tokenizer, overrides, field, reason):
  with pytest.raises(PreferenceError, match=rf"'r0', field '{field}'") as info:
    rd.encode_reward_pair(
      record(**overrides), tokenizer, TEMPLATE, P, IMAGE_ID,
      prompt=rd.load_reward_prompt(None, True), fact_augmented=True, rng=np.random.default_rng(0),
    )  # fmt: skip
  assert info.value.reason == reason


def test_vanilla_reward_needs_no_facts(tokenizer):
  pair = rd.encode_reward_pair(
    record(facts=None), tokenizer, TEMPLATE, P, IMAGE_ID,
    prompt=rd.load_reward_prompt(None, False), fact_augmented=False, rng=np.random.default_rng(0),
  )  # fmt: skip
  tail = rd.suffix_ids(rd.load_reward_prompt(None, False), tokenizer)
  assert list(pair.chosen_ids[-len(tail) :]) == tail


def test_encode_pairs_raises_or_counts_skips(tokenizer):
  records = [
    record(id="a"),
    record(id="b", chosen=""),
    record(id="c", facts=None),
    record(id="d", rejected="A red circle."),
    record(id="e", facts=[]),
    record(id="f"),
  ]
  kwargs = dict(prompt=rd.load_reward_prompt(None, True), fact_augmented=True)
  pairs, skipped = rd.encode_reward_pairs(
    records, tokenizer, TEMPLATE, P, IMAGE_ID, rng=np.random.default_rng(0), on_error="skip",
    **kwargs,
  )  # fmt: skip
  assert [p.record_id for p in pairs] == ["a", "f"]
  assert skipped == {
    "skipped_empty_response": 1, "skipped_missing_facts": 2, "skipped_identical_responses": 1
  }  # fmt: skip
  with pytest.raises(PreferenceError, match="'b', field 'chosen'"):
    rd.encode_reward_pairs(
      records, tokenizer, TEMPLATE, P, IMAGE_ID, rng=np.random.default_rng(0), **kwargs
    )
  with pytest.raises(ValueError, match="on_error"):
    rd.encode_reward_pairs(
      records, tokenizer, TEMPLATE, P, IMAGE_ID, rng=np.random.default_rng(0), on_error="x",
      **kwargs,
    )  # fmt: skip


def test_batches_end_each_row_at_the_last_suffix_token(tokenizer):
  prompt = rd.load_reward_prompt(None, True)
  records = [record(id=str(i), chosen="A red circle." + " Yes." * i) for i in range(3)]
  pairs, _ = rd.encode_reward_pairs(
    records, tokenizer, TEMPLATE, P, IMAGE_ID, prompt=prompt, fact_augmented=True,
    rng=np.random.default_rng(0),
  )  # fmt: skip
  data = PreferenceData(
    pairs, None, max_length=1024, buckets=(1024,), pad_id=tokenizer.pad_token_id, seed=0
  )
  batch = data.rows(np.arange(3))
  last = batch["attention_mask"].sum(-1) - 1  # right padding: the last real position
  tokens = np.take_along_axis(batch["input_ids"], last[..., None], axis=-1)[..., 0]
  assert (tokens == rd.suffix_ids(prompt, tokenizer)[-1]).all()


# ------------------------------------------------------------------------------------------
# Facts before the response.
# ------------------------------------------------------------------------------------------


def test_facts_before_the_response_go_under_the_question_in_the_same_order():
  prompt = rd.load_reward_prompt(None, True)
  question, suffix = rd.reward_texts(
    "What is it?", prompt, FACTS, np.random.default_rng(3), fact_augmented=True,
    facts_position="before_response", lead_in="Facts:\n",
  )  # fmt: skip
  # default_rng(3).permutation(3) is [2, 1, 0], as in the fact-block test above.
  assert question == (
    "What is it?\nFacts:\n  - One shape in total.\n  - The background is white.\n"
    "  - A red circle sits in the middle.\n"
  )
  assert suffix == rd.load_reward_prompt(None, False)  # the request without its facts
  after = rd.reward_texts(
    "What is it?", prompt, FACTS, np.random.default_rng(3), fact_augmented=True,
    lead_in="Facts:\n",
  )  # fmt: skip
  assert after == ("What is it?", rd.reward_suffix(prompt, FACTS, np.random.default_rng(3),
                                                   fact_augmented=True, lead_in="Facts:\n"))
  vanilla = rd.load_reward_prompt(None, False)
  assert rd.reward_texts("Q?", vanilla, None, np.random.default_rng(0), fact_augmented=False,
                         facts_position="before_response") == ("Q?", vanilla)  # fmt: skip
  with pytest.raises(ValueError, match="facts_position='inside'"):
    rd.reward_texts("Q?", prompt, FACTS, np.random.default_rng(0), fact_augmented=True,
                    facts_position="inside")  # fmt: skip


def test_pair_with_facts_before_reads_them_before_each_answer(tokenizer):
  prompt = rd.load_reward_prompt(None, True)
  pair = rd.encode_reward_pair(
    record(), tokenizer, TEMPLATE, P, IMAGE_ID, prompt=prompt, fact_augmented=True,
    rng=np.random.default_rng(5), facts_position="before_response",
  )  # fmt: skip
  question, suffix = rd.reward_texts(
    "What is in the image?", prompt, FACTS, np.random.default_rng(5), fact_augmented=True,
    facts_position="before_response",
  )  # fmt: skip
  for ids, labels, answer in (
    (pair.chosen_ids, pair.chosen_labels, "A red circle."),
    (pair.rejected_ids, pair.rejected_labels, "A blue square."),
  ):
    want = rd.encode_reward_sequence(
      question, answer, tokenizer, TEMPLATE, P, IMAGE_ID, suffix, False
    )
    np.testing.assert_array_equal(ids, want)
    answer_start = np.flatnonzero(labels != IGNORE_INDEX)[0]
    before, after = (tokenizer.decode(part) for part in (ids[:answer_start], ids[answer_start:]))
    assert all(fact in before for fact in FACTS) and not any(fact in after for fact in FACTS)


@pytest.mark.parametrize(
  "facts_position, lead_in", [("after_response", None), ("before_response", "Facts:\n")]
)
def test_ppo_scores_the_ids_the_reward_model_was_trained_on(tokenizer, facts_position, lead_in):
  from types import SimpleNamespace

  from lmm_align.rl import scoring
  from lmm_align.trainers import ppo

  prompt = rd.load_reward_prompt(None, True)
  config = SimpleNamespace(num_image_tokens=P, image_token_id=IMAGE_ID)
  rm = SimpleNamespace(model=SimpleNamespace(config=config), prompt=prompt, fact_augmented=True,
                       facts_position=facts_position, fact_lead_in=lead_in)  # fmt: skip
  template = get_template(TEMPLATE)
  prompts = [
    ppo.Prompt(f"p{i}", q, scoring.query_ids(q, True, f"p{i}", tokenizer, template, config), "img",
               0, 1.0, FACTS[i:], None)  # fmt: skip
    for i, q in enumerate(["What is it?", "What is in the image?"])
  ]
  answers = ["A red circle.", "A blue square.", "A red"]
  responses = [[*tokenizer.encode(" " + a, add_special_tokens=False), tokenizer.eos_token_id]
               for a in answers]  # fmt: skip
  responses[2] = responses[2][:-1]  # a prefix: no end token
  rows = [1, 0, 1]
  got = ppo.reward_rows(prompts, rows, responses, rm, tokenizer, template,
                        np.random.default_rng(9))  # fmt: skip
  rng = np.random.default_rng(9)
  texts = [rd.reward_texts(p.question, prompt, p.facts, rng, fact_augmented=True,
                           facts_position=facts_position, lead_in=lead_in) for p in prompts]  # fmt: skip
  assert all((lead_in or rd.DEFAULT_FACT_LEAD_IN) in q + s for q, s in texts)
  for b, answer, row in zip(rows[:2], answers[:2], got[:2]):
    want = rd.encode_reward_sequence(
      texts[b][0], answer, tokenizer, TEMPLATE, P, IMAGE_ID, texts[b][1], True
    )
    assert row == list(want)
  question, suffix = texts[1]
  query = scoring.query_ids(question, True, "p1", tokenizer, template, config)
  assert got[2] == [*query, *responses[2], *rd.suffix_ids(suffix, tokenizer)]
  if facts_position == "after_response":
    assert got[1][: len(prompts[0].input_ids)] == list(prompts[0].input_ids)
