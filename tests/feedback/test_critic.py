"""LLaVA-Critic pieces: prompts, the swap rule, ordered-pair aggregation by hand, and critic
rewards with scripted judges."""

from __future__ import annotations

import numpy as np
import pytest

from lmm_align.data import conversation
from lmm_align.feedback import critic
from lmm_align.judges.base import FunctionJudge, JudgeReply
from lmm_align.judges.verdicts import PairwiseVerdict, parse_pairwise

# ------------------------------------------------------------------------------------------
# Prompts.
# ------------------------------------------------------------------------------------------


def test_prompts_start_with_the_image_and_hold_the_fields():
  prompt = critic.pointwise_prompt("What is shown?", "A red circle.", scale="1-10")
  assert prompt.startswith("<image>\n") and prompt.count("<image>") == 1
  assert "Question: [What is shown?]" in prompt and "Answer: [A red circle.]" in prompt
  assert "from 1 to 10" in prompt and '"Final Score: N"' in prompt
  assert "from 0 to 100" in critic.pointwise_prompt("q", "r")
  pair = critic.pairwise_prompt("Q {x}?", "one", "two", with_image=False)
  assert not pair.startswith("<image>")
  assert "Question: [Q {x}?]\nThe first response: [one]\nThe second response: [two]" in pair
  for line in critic.PAIRWISE_VERDICT_LINES.values():
    assert line in pair  # the prompt asks for exactly the lines the parser reads


def test_published_template_from_file(tmp_path):
  path = tmp_path / "card_pairwise.txt"
  path.write_text(
    "Judge fairly.\nQuestion: [{q}]\nThe first response: [{r1}]\n"
    "The second response: [{r2}]\nASSISTANT:\n"
  )
  template = critic.PromptTemplate.from_file(path, "pairwise")
  prompt = critic.pairwise_prompt("Why {r1}?", "A", "B", template=template)
  # Values go in verbatim, once: the "{r1}" inside the question is not substituted again.
  assert (
    prompt == "<image>\nJudge fairly.\nQuestion: [Why {r1}?]\nThe first response: [A]\n"
    "The second response: [B]\nASSISTANT:\n"
  )
  fastchat = critic.PromptTemplate("[Question]\n{question}\n[Answer]\n{answer}", "pointwise")
  assert (
    critic.pointwise_prompt("q", "r", template=fastchat, with_image=False)
    == "[Question]\nq\n[Answer]\nr"
  )

  missing = tmp_path / "missing.txt"
  missing.write_text("Question: {question} Response: {first}")
  with pytest.raises(
    ValueError, match=r"missing.txt: pairwise prompt lacks a placeholder for \['second'\]"
  ):
    critic.PromptTemplate.from_file(missing, "pairwise")
  unknown = tmp_path / "unknown.txt"
  unknown.write_text("{question} {response} {reference}")
  with pytest.raises(ValueError, match=r"unknown.txt: placeholder \{reference\}"):
    critic.PromptTemplate.from_file(unknown, "pointwise")


# ------------------------------------------------------------------------------------------
# Swap rule and aggregation.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "original, swapped, expected",
  [
    ("first", "second", "first"),  # a wins in both orders
    ("second", "first", "second"),  # b wins in both orders
    ("tie", "tie", "tie"),
    ("first", "first", "tie"),  # always the first position: inconsistent -> tie
    ("second", "second", "tie"),
    ("first", "tie", "tie"),
    ("tie", "second", "tie"),
    ("first", "invalid", "invalid"),
    ("invalid", "tie", "invalid"),
  ],
)
def test_swap_rule(original, swapped, expected):
  assert critic.debiased_winner(original, swapped) == expected
  assert critic.debiased_winner(PairwiseVerdict(original), PairwiseVerdict(swapped)) == expected


# Verdicts on the 6 ordered pairs of 3 responses; (i, j) showed y_i first and y_j second.
VERDICTS = {
  (0, 1): "second",  # y1 over y0
  (1, 0): "first",  # y1 over y0 again (consistent)
  (0, 2): "tie",
  (2, 0): "first",  # y2 over y0 (inconsistent with the tie above)
  (1, 2): "first",  # y1 over y2
  (2, 1): "invalid",  # no verdict parsed: excluded
}


def test_aggregation_equals_the_hand_computed_example():
  # a_ij = credit of the second-shown response: 1 / 0.5 / 0. Each valid judgment (i, j) adds
  # a_ij - 1/2 to r_j and (1 - a_ij) - 1/2 to r_i; the invalid one adds nothing (as a tie would):
  #   (0,1) second: r_1 += .5, r_0 -= .5     (1,0) first: r_1 += .5, r_0 -= .5
  #   (0,2) tie:    nothing                  (2,0) first: r_2 += .5, r_0 -= .5
  #   (1,2) first:  r_1 += .5, r_2 -= .5     (2,1) invalid: nothing
  # r = [-1.5, 1.5, 0]. (The paper's two sums with a_21 merely left out would give r_1 = 1 and
  # r_2 = 0.5: a missing a_il term silently favours the first-shown response.)
  ranking = critic.aggregate_pairwise(3, VERDICTS)
  np.testing.assert_allclose(ranking.scores, [-1.5, 1.5, 0.0])
  assert (ranking.chosen, ranking.rejected, ranking.margin) == (1, 0, 3.0)
  assert (ranking.judged, ranking.invalid) == (5, 1)


def test_aggregation_with_all_valid_equals_the_paper_formula():
  rng = np.random.default_rng(0)
  for _ in range(20):
    k = int(rng.integers(2, 6))
    winners = {
      (i, j): str(rng.choice(["first", "second", "tie"]))
      for i in range(k)
      for j in range(k)
      if i != j
    }
    a = np.zeros((k, k))
    for (i, j), w in winners.items():
      a[i, j] = critic.VERDICT_CREDIT[w]
    expected = a.sum(axis=0) - a.sum(axis=1)  # sum_k a_ki - sum_l a_il
    np.testing.assert_allclose(critic.aggregate_pairwise(k, winners).scores, expected)


def test_aggregation_debiased_and_degenerate_cases():
  ranking = critic.aggregate_pairwise(3, VERDICTS, debias=True)
  # {0,1}: y1 both ways -> y1 wins both; {0,2}: tie vs y2 -> tie; {1,2}: one side invalid.
  # r_0 = -0.5 - 0.5 + 0 + 0 = -1, r_1 = +1, r_2 = 0.
  np.testing.assert_allclose(ranking.scores, [-1.0, 1.0, 0.0])
  assert (ranking.chosen, ranking.rejected, ranking.judged, ranking.invalid) == (1, 0, 4, 2)
  biased = {(i, j): "first" for i in range(3) for j in range(3) if i != j}  # position bias only
  flat = critic.aggregate_pairwise(3, biased)
  assert flat.chosen is None and flat.rejected is None and flat.margin == 0
  assert critic.aggregate_pairwise(2, {(0, 1): "invalid"}).judged == 0
  with pytest.raises(ValueError, match=r"\(1, 1\)"):
    critic.aggregate_pairwise(2, {(1, 1): "first"})


def _preference_judge(quality):
  """A scripted critic: prefers the response of higher quality[text] (ties when equal), and
  finds the two responses by their position in the prompt."""

  def verdict(request):
    shown = sorted(
      (request.prompt.index(f"[{t}]"), t) for t in quality if f"[{t}]" in request.prompt
    )
    (_, first), (_, second) = shown
    if quality[first] == quality[second]:
      return "Reasons.\nThe two responses are equally good."
    better = "first" if quality[first] > quality[second] else "second"
    return f"Reasons.\nThe better response: [{better}]"

  return FunctionJudge(verdict)


def test_rank_responses_and_both_orders_with_a_scripted_judge():
  quality = {"alpha reply": 1, "beta reply": 3, "gamma reply": 2}
  responses = list(quality)
  ranking, verdicts = critic.rank_responses(
    _preference_judge(quality), "Describe.", responses, image="x.png"
  )
  assert len(verdicts) == 6 and all(v.valid for v in verdicts.values())
  assert (ranking.chosen, ranking.rejected) == (1, 0)
  np.testing.assert_allclose(ranking.scores, [-2.0, 2.0, 0.0])
  winner, original, swapped = critic.judge_both_orders(
    _preference_judge(quality), "Q", "gamma reply", "beta reply"
  )
  assert (winner, original.winner, swapped.winner) == ("second", "second", "first")


def test_pointwise_scores_count_invalid_replies():
  replies = iter(["Good.\nFinal Score: 85", "Final Score: 250", "no score here", None])

  class Scripted:
    name = "scripted"

    def complete(self, requests):
      assert all(r.prompt.startswith("<image>\n") and r.image == "img.png" for r in requests)
      return [
        JudgeReply(t) if t else JudgeReply(None, error="timeout")
        for t in (next(replies) for _ in requests)
      ]

  result = critic.pointwise_scores(Scripted(), "Describe.", ["a", "b", "c", "d"], image="img.png")
  assert result.scores == [85.0, None, None, None] and result.invalid == 3
  assert "outside" in result.verdicts[1].reason and result.verdicts[3].reason == "no reply: timeout"


# ------------------------------------------------------------------------------------------
# The released LLaVA-Critic's prompts and replies.
# ------------------------------------------------------------------------------------------

# The model card's Quick Start example (lmms-lab/llava-critic-7b README), written out.
CARD_QUESTION = "What this image presents?"
CARD_FIRST = (
  "The image is a black and white sketch of a line that appears to be in the shape of a cross. "
  "The line is a simple and straightforward representation of the cross shape, with two "
  "straight lines intersecting at a point."
)
CARD_SECOND = "This is a handwritten number seven."
CARD_PAIRWISE = (
  "Given an image and a corresponding question, please serve as an unbiased and fair judge to "
  "evaluate the quality of the answers provided by a Large Multimodal Model (LMM). Determine "
  "which answer is better and explain your reasoning with specific details. Your task is "
  f"provided as follows:\nQuestion: [{CARD_QUESTION}]\nThe first response: [{CARD_FIRST}]\n"
  f"The second response: [{CARD_SECOND}]\nASSISTANT:\n"
)
CARD_POINTWISE = (
  "Given an image and a corresponding question, please serve as an unbiased and fair judge to "
  "evaluate the quality of answer answers provided by a Large Multimodal Model (LMM). Score the "
  "response out of 100 and explain your reasoning with specific details. Your task is provided "
  f"as follows:\nQuestion: [{CARD_QUESTION}]\nThe LMM response: [{CARD_SECOND}]\nASSISTANT:\n "
)


def test_llava_critic_prompts_are_the_model_cards():
  pair = critic.pairwise_prompt(
    CARD_QUESTION, CARD_FIRST, CARD_SECOND, template=critic.LLAVA_CRITIC_PAIRWISE
  )
  assert pair == "<image>\n" + CARD_PAIRWISE  # the card's DEFAULT_IMAGE_TOKEN + "\n" + prompt
  point = critic.pointwise_prompt(
    CARD_QUESTION, CARD_SECOND, template=critic.LLAVA_CRITIC_POINTWISE
  )
  assert point == "<image>\n" + CARD_POINTWISE
  # In the card's conv_templates["qwen_1_5"], with the prompt kept verbatim (trailing space too).
  assert conversation.generation_prompt(point, critic.LLAVA_CRITIC_TEMPLATE) == (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n"
    + CARD_POINTWISE
    + "<|im_end|>\n<|im_start|>assistant\n"
  )


REASON = "The first response misreads the sketch; the second names the digit correctly. "


@pytest.mark.parametrize(
  "original, swapped, winner",
  [
    # Each format the 113k data holds, as the critic ends its reasoning with it.
    (REASON + "The better response: [second]", REASON + "The better response: [first]", "second"),
    (REASON + "The better response: 1", REASON + "The better response: 2", "first"),
    (REASON + "The better response: [B]", REASON + "The better response: [A]", "second"),
    (REASON + "Both responses are equally good.", REASON + "The two are equally good.", "tie"),
    ("Reasons.\n[[A>>B]]", "Reasons.\n[[B>A]]", "first"),
    ("Reasons.\n[[A=B]]", "Reasons.\n[[A=B]]", "tie"),
    ("3 8\nAssistant 2 is right about the digit.", "8 3\nAssistant 1 is right.", "second"),
    # The last verdict wins over one quoted in the reasons.
    (
      "One could argue 'The better response: [first]', but it is wrong. The better response: "
      "[second]",
      REASON + "The better response: [first]",
      "second",
    ),
    # Position bias: the first shown wins in both orders -> a tie (MT-Bench's rule).
    (REASON + "The better response: [first]", REASON + "The better response: [first]", "tie"),
    ("No verdict here.", REASON + "The better response: [first]", "invalid"),
  ],
)
def test_llava_critic_replies_both_orders(original, swapped, winner):
  shown = {}

  def reply(request):
    assert request.prompt.startswith("<image>\nGiven an image") and request.image == "img.png"
    first = request.prompt.split("The first response: [", 1)[1].split("]", 1)[0]
    shown[first] = True
    return original if first == CARD_FIRST else swapped

  got, a, b = critic.judge_both_orders(
    FunctionJudge(reply), CARD_QUESTION, CARD_FIRST, CARD_SECOND, image="img.png",
    template=critic.LLAVA_CRITIC_PAIRWISE,
  )  # fmt: skip
  assert set(shown) == {CARD_FIRST, CARD_SECOND}  # both orders were asked
  assert (got, a, b) == (winner, parse_pairwise(original), parse_pairwise(swapped))


def test_llava_critic_pointwise_replies():
  replies = {
    "a": "The response names the digit.\nFinal Score: 85",
    "b": "It misreads the sketch. Final Score: 20.5",
    "c": "I would give it [[7]]",  # a 1-10 style score is still in range
    "d": "Final Score: 120",  # out of 100: invalid
  }

  def reply(request):
    assert "Score the response out of 100" in request.prompt
    return replies[request.prompt.split("The LMM response: [", 1)[1].split("]", 1)[0]]

  result = critic.pointwise_scores(
    FunctionJudge(reply), CARD_QUESTION, list(replies), image="img.png",
    template=critic.LLAVA_CRITIC_POINTWISE,
  )  # fmt: skip
  assert result.scores == [85.0, 20.5, 7.0, None] and result.invalid == 1
