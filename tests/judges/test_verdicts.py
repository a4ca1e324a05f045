"""The verdict parser on every published format, in context, and on arbitrary text."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lmm_align.judges.verdicts import (
  PairwiseVerdict,
  first_line_scores,
  parse_pairwise,
  parse_pointwise,
)

# (text, winner, strength, format)
PAIRWISE_CASES = [
  ("The better response: [first]", "first", None, "better_response"),
  ("The better response: second", "second", None, "better_response"),
  ("The better response: [1]", "first", None, "better_response"),
  ("The better response: 2.", "second", None, "better_response"),
  ("The better response: [A]", "first", None, "better_response"),
  ("the better response is B", "second", None, "better_response"),
  ("The better response is the second one.", "second", None, "better_response"),
  ("The better response: Response 1", "first", None, "better_response"),
  ("The better response: [The second response]", "second", None, "better_response"),
  ("Overall, the better response is [the first one].", "first", None, "better_response"),
  ("The better response: [Tie]", "tie", None, "better_response"),
  ("Both responses are equally good.", "tie", None, "equally_good"),
  ("The two answers are Equally  helpful", "tie", None, "equally_good"),
  ("[[A]]", "first", None, "mt_bench"),
  ("[[B]]", "second", None, "mt_bench"),
  ("[[C]]", "tie", None, "mt_bench"),
  ("[[A>>B]]", "first", "strong", "arena"),
  ("[[A>B]]", "first", "weak", "arena"),
  ("[[A=B]]", "tie", None, "arena"),
  ("[[B>A]]", "second", "weak", "arena"),
  ("[[B>>A]]", "second", "strong", "arena"),
  ("[[A<<B]]", "second", "strong", "arena"),
  ("[[ B < A ]]", "first", "weak", "arena"),
  ("[[8, 6]]", "first", None, "bracket_scores"),
  ("[[7,7.05]]", "tie", None, "bracket_scores"),
]
POINTWISE_CASES = [
  ("Final Score: 85", 85.0, "final_score"),
  ("final score: 72.5/100", 72.5, "final_score"),
  ("Final Score: [90]", 90.0, "final_score"),
  ("Rating: [[5]]", 5.0, "double_bracket"),
  ("[[7]]", 7.0, "double_bracket"),
  ("[[6.5]]", 6.5, "double_bracket"),
  ("rating: 3", 3.0, "rating"),
  ("Rating:4", 4.0, "rating"),
]


@pytest.mark.parametrize("text, winner, strength, fmt", PAIRWISE_CASES)
def test_pairwise_formats(text, winner, strength, fmt):
  verdict = parse_pairwise(text)
  assert (verdict.winner, verdict.strength, verdict.format) == (winner, strength, fmt)
  assert verdict.valid and verdict.reason is None


@pytest.mark.parametrize("text, score, fmt", POINTWISE_CASES)
def test_pointwise_formats(text, score, fmt):
  assert parse_pointwise(text) == parse_pointwise(text, low=0, high=100)
  verdict = parse_pointwise(text)
  assert (verdict.score, verdict.format, verdict.reason) == (score, fmt, None)


def test_first_line_scores_is_llava_bench():
  review = "8 6\nAssistant 1 gives more detail; assistant 2 misses the dog."
  assert first_line_scores(review) == (8.0, 6.0)
  assert first_line_scores("8, 6\nreason") == (8.0, 6.0)  # LLaVA's split(' ') would give -1
  assert parse_pairwise(review) == PairwiseVerdict(
    "first", format="first_line_scores", scores=(8.0, 6.0)
  )
  assert parse_pairwise("5 5\nsame").winner == "tie"
  for bad in ("8 6 7\nx", "eight six", "8\n6", "Assistant 1: 8"):
    assert first_line_scores(bad) is None


def test_single_bracket_is_only_a_fallback():
  assert parse_pointwise("I would say [6]; overall [7].").score == 7.0
  assert parse_pointwise("[[3]] but see [9]").score == 3.0  # [[N]] anywhere beats [N]
  assert parse_pointwise("Rating: 8, see reference [2]").score == 8.0


def test_verdict_before_reason_and_last_of_two():
  assert parse_pairwise("[[B]]\nAssistant B names the red car, which A misses.").winner == "second"
  text = "At first I thought [[A]] was right, but after checking the image: [[B]]"
  assert parse_pairwise(text).winner == "second"
  text = "The better response: first. On reflection both are equally good."
  assert parse_pairwise(text).winner == "tie"
  assert parse_pointwise("Final Score: 40 ... revised Final Score: 60").score == 60.0


def test_invalid_replies_carry_a_reason():
  for text, reason in [
    ("", "empty reply"),
    ("   \n", "empty reply"),
    (None, "not text: NoneType"),
    ("Response A is better.", "no pairwise verdict found"),
    ("The better response: a detailed one", "no pairwise verdict found"),
    ("[[A>A]]", "no pairwise verdict found"),
  ]:
    verdict = parse_pairwise(text)
    assert verdict.winner == "invalid" and not verdict.valid and verdict.reason == reason
  assert parse_pointwise("Score unknown").reason == "no score found"
  assert parse_pointwise(42).reason == "not text: int"
  out_of_range = parse_pointwise("Final Score: 120", low=0, high=100)
  assert out_of_range.score is None and "outside [0, 100]" in out_of_range.reason


def test_swapped_flips_positions():
  verdict = PairwiseVerdict("first", strength="strong", format="arena", scores=(9.0, 2.0))
  assert verdict.swapped() == PairwiseVerdict("second", "strong", "arena", (2.0, 9.0))
  assert PairwiseVerdict("tie").swapped().winner == "tie"
  assert PairwiseVerdict("invalid", reason="x").swapped().winner == "invalid"


def test_mt_bench_prompt_formats_parse(shared_reference_data):
  """The example verdicts FastChat's prompts ask for parse to what they say."""
  prompts = [
    json.loads(line)
    for line in open(shared_reference_data / "fastchat_llm_judge/judge_prompts.jsonl")
  ]
  formats = {p["output_format"] for p in prompts}
  assert formats == {"[[A]]", "[[rating]]"}
  single = next(p for p in prompts if p["name"] == "single-v1")
  assert '"Rating: [[5]]"' in single["prompt_template"]
  assert parse_pointwise('..."Rating: [[5]]".').score == 5.0
  pair = next(p for p in prompts if p["name"] == "pair-v2")
  assert "[[C]]" in pair["system_prompt"]


# ------------------------------------------------------------------------------------------
# Property-based: never raises; every format found inside filler text; the last one wins.
# ------------------------------------------------------------------------------------------

# Filler has no digits, brackets or colons, so it cannot form or extend a verdict by itself.
FILLER = st.text(
  alphabet="abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?'\n", max_size=80
)
VERDICT_PIECES = [
  "[[", "]]", "[", "]", "A", "B", "C", ">", ">>", "=", "<", "1", "2", "8", ".5", ",", ":", " ",
  "\n", "The better response", "first", "second", "equally good", "Final Score", "Rating",
]  # fmt: skip


def _no_verdict(text: str) -> bool:
  return not parse_pairwise(text).valid and not parse_pointwise(text).valid


@settings(max_examples=300, deadline=None)
@given(
  st.one_of(
    st.text(max_size=200), st.lists(st.sampled_from(VERDICT_PIECES), max_size=40).map("".join)
  )
)
def test_random_text_never_raises(text):
  pairwise = parse_pairwise(text)
  assert pairwise.winner in ("first", "second", "tie", "invalid")
  assert pairwise.valid == (pairwise.reason is None)
  pointwise = parse_pointwise(text, low=0, high=100)
  assert pointwise.valid == (pointwise.reason is None)
  first_line_scores(text)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(st.sampled_from(PAIRWISE_CASES), FILLER, FILLER)
def test_pairwise_format_embedded_in_text(case, before, after):
  text, winner, strength, fmt = case
  assume(_no_verdict(before) and _no_verdict(after))
  verdict = parse_pairwise(f"{before}\n{text}\n{after}")
  assert (verdict.winner, verdict.strength, verdict.format) == (winner, strength, fmt)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(st.sampled_from(POINTWISE_CASES), FILLER, FILLER)
def test_pointwise_format_embedded_in_text(case, before, after):
  text, score, fmt = case
  assume(_no_verdict(before) and _no_verdict(after))
  assert parse_pointwise(f"{before}\n{text}\n{after}").score == score


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(st.sampled_from(PAIRWISE_CASES), st.sampled_from(PAIRWISE_CASES), FILLER)
def test_last_of_two_pairwise_verdicts_wins(earlier, later, middle):
  assume(_no_verdict(middle))
  verdict = parse_pairwise(f"Reasoning.\n{earlier[0]}\n{middle}\n{later[0]}")
  assert (verdict.winner, verdict.strength) == (later[1], later[2])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(st.sampled_from(POINTWISE_CASES), st.sampled_from(POINTWISE_CASES), FILLER)
def test_last_of_two_pointwise_scores_wins(earlier, later, middle):
  assume(_no_verdict(middle))
  assert parse_pointwise(f"{earlier[0]}\n{middle}\n{later[0]}").score == later[1]
