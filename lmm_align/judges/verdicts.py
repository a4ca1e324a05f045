"""Reading a judge's verdict out of its free text: one parser for every published format.

Judges write a reason and a verdict, in formats that differ by source:

  pairwise (which of two responses is better)
    better_response  LLaVA-Critic:  "The better response: [first]" (first|second|1|2|A|B, with or
                     without brackets, also "[The second response]"; tie|equal|both|neither
                     mean a tie)
    equally_good     LLaVA-Critic ties: "... are equally good" (good|bad|helpful|accurate|...)
    mt_bench         FastChat pair-v2: "[[A]]", "[[B]]", "[[C]]" (C is a tie)
    arena            arena-hard / critic data: "[[A>>B]]", "[[A>B]]", "[[A=B]]", "[[B>A]]",
                     "[[B>>A]]" (also written with "<"); ">>" is a strong preference
    bracket_scores   FastChat pair-v1: "[[8, 6]]", a score per assistant
    first_line_scores  LLaVA-Bench review: the first line is "8 6" (or "8, 6")
  pointwise (a score for one response)
    final_score      LLaVA-Critic: "Final Score: 85"
    rating           MMHal-style "Rating: 4" (also "Rating: [[4]]")
    double_bracket   FastChat single-v1: "[[7]]"
    single_bracket   FastChat's fallback "[7]", used only when nothing above matches

Rule: every pattern is searched over the whole text and the match that starts LAST wins,
because judges give the reason first and the verdict last, and a reason may quote a format
("I would not say [[A]] here..."). A verdict written before its reason is still found: with
nothing after it, it is the last match. This differs from FastChat on texts with two verdicts
(FastChat takes the first "[[A]]"/"[[B]]"/"[[C]]" found in that order; the last is the judge's
final word). Score pairs become a winner by FastChat's TIE_DELTA: |s1 - s2| <= 0.1 is a tie.

Parsing never raises: any input (even a non-string) gives a verdict, invalid with its reason
when no format matches, so one odd reply in a long judging run is counted, not fatal.
"""

from __future__ import annotations

import dataclasses
import math
import re

WINNERS = ("first", "second", "tie")
INVALID = "invalid"
TIE_DELTA = 0.1  # FastChat's llm_judge: two scores this close are a tie

_NUMBER = r"[0-9]+(?:\.[0-9]*)?"
_TIE_WORDS = {"tie", "equal", "both", "neither"}
_CHOICE_WINNER = {
  "first": "first",
  "1": "first",
  "a": "first",
  "second": "second",
  "2": "second",
  "b": "second",
}

# Letters A/B must be upper case: "The better response: a detailed one" is not a verdict.
_BETTER_RESPONSE = re.compile(
  r"(?i:the\s+better\s+(?:response|answer))[ \t]*(?i:is\b)?[ \t]*[:：]?[ \t]*(?i:the[ \t]+)?"
  r"\[?[ \t]*(?i:the[ \t]+)?(?i:(?:response|answer)[ \t]*)?"
  r"(?P<choice>(?i:first|second|tie|equal|both|neither)|[12AB])(?![A-Za-z0-9])"
)
_EQUALLY = re.compile(
  r"(?i:\bequally[ \t]+(?:good|bad|well|poor|strong|weak|helpful|accurate|correct|valid)\b)"
)
_MT_BENCH = re.compile(r"\[\[[ \t]*(?P<letter>[ABC])[ \t]*\]\]")
_ARENA = re.compile(
  r"\[\[[ \t]*(?P<left>[AB])[ \t]*(?P<op>>>|>|=|<<|<)[ \t]*(?P<right>[AB])[ \t]*\]\]"
)
_BRACKET_SCORES = re.compile(
  rf"\[\[[ \t]*(?P<s1>{_NUMBER})[ \t]*,[ \t]*(?P<s2>{_NUMBER})[ \t]*\]\]"
)
_SCORE_TOKEN = re.compile(_NUMBER)

_FINAL_SCORE = re.compile(
  rf"(?i:\bfinal[ \t]+score)[ \t]*[:：]?[ \t]*\[*[ \t]*(?P<score>{_NUMBER})"
)
_RATING = re.compile(rf"(?i:\brating)[ \t]*[:：][ \t]*\[*[ \t]*(?P<score>{_NUMBER})")
_DOUBLE_BRACKET = re.compile(rf"\[\[[ \t]*(?P<score>{_NUMBER})[ \t]*\]\]")
_SINGLE_BRACKET = re.compile(rf"\[[ \t]*(?P<score>{_NUMBER})[ \t]*\]")


@dataclasses.dataclass(frozen=True)
class PairwiseVerdict:
  """Which of two responses a judge prefers.

  winner: "first", "second", "tie", or "invalid" (no verdict found; `reason` says why).
  strength: "strong" (">>") or "weak" (">") where the format grades it, else None.
  format: the name of the pattern that matched (see the module docstring), None if invalid.
  scores: the two scores for score-pair formats, else None.
  reason: why the verdict is invalid; None for a valid one.
  """

  winner: str
  strength: str | None = None
  format: str | None = None
  scores: tuple[float, float] | None = None
  reason: str | None = None

  @property
  def valid(self) -> bool:
    return self.winner != INVALID

  def swapped(self) -> PairwiseVerdict:
    """The same verdict seen with the two responses' positions exchanged."""
    flip = {"first": "second", "second": "first"}
    scores = None if self.scores is None else (self.scores[1], self.scores[0])
    winner = flip.get(self.winner, self.winner)
    return dataclasses.replace(self, winner=winner, scores=scores)


@dataclasses.dataclass(frozen=True)
class PointwiseVerdict:
  """A judge's score for one response: `score` None when invalid (`reason` says why)."""

  score: float | None
  format: str | None = None
  reason: str | None = None

  @property
  def valid(self) -> bool:
    return self.score is not None


def _invalid_pairwise(reason: str) -> PairwiseVerdict:
  return PairwiseVerdict(INVALID, reason=reason)


def _winner_from_scores(s1: float, s2: float, tie_delta: float) -> str:
  if abs(s1 - s2) <= tie_delta:
    return "tie"
  return "first" if s1 > s2 else "second"


def _better_response(m: re.Match) -> PairwiseVerdict:
  choice = m["choice"].lower()
  winner = "tie" if choice in _TIE_WORDS else _CHOICE_WINNER[choice]
  return PairwiseVerdict(winner, format="better_response")


def _arena(m: re.Match) -> PairwiseVerdict | None:
  left, op, right = m["left"], m["op"], m["right"]
  if left == right:
    return None  # "[[A>A]]" says nothing about the pair
  if op == "=":
    return PairwiseVerdict("tie", format="arena")
  left_wins = op.startswith(">")
  a_wins = left_wins == (left == "A")
  strength = "strong" if len(op) == 2 else "weak"
  return PairwiseVerdict("first" if a_wins else "second", strength=strength, format="arena")


def _score_pair(s1: str, s2: str, fmt: str, tie_delta: float) -> PairwiseVerdict | None:
  scores = (float(s1), float(s2))
  if not all(math.isfinite(s) for s in scores):
    return None
  return PairwiseVerdict(_winner_from_scores(*scores, tie_delta), format=fmt, scores=scores)


def first_line_scores(text: str) -> tuple[float, float] | None:
  """LLaVA-Bench's two scores from a review's first line ("8 6", "8, 6"), else None.

  LLaVA splits on single spaces after replacing commas, so its "8, 6" fails to parse; here any
  whitespace separates, which reads every reply LLaVA reads and that one too.
  """
  if not isinstance(text, str):
    return None
  parts = text.split("\n", 1)[0].replace(",", " ").split()
  if len(parts) != 2 or not all(_SCORE_TOKEN.fullmatch(p) for p in parts):
    return None
  scores = (float(parts[0]), float(parts[1]))
  return scores if all(math.isfinite(s) for s in scores) else None


def _pairwise_candidates(text: str, tie_delta: float) -> list[tuple[int, PairwiseVerdict]]:
  """(start position, verdict) for every pairwise verdict in the text."""
  found: list[tuple[int, PairwiseVerdict]] = []
  found += [(m.start(), _better_response(m)) for m in _BETTER_RESPONSE.finditer(text)]
  found += [
    (m.start(), PairwiseVerdict("tie", format="equally_good")) for m in _EQUALLY.finditer(text)
  ]
  letters = {"A": "first", "B": "second", "C": "tie"}
  found += [
    (m.start(), PairwiseVerdict(letters[m["letter"]], format="mt_bench"))
    for m in _MT_BENCH.finditer(text)
  ]
  for m in _ARENA.finditer(text):
    verdict = _arena(m)
    if verdict is not None:
      found.append((m.start(), verdict))
  for m in _BRACKET_SCORES.finditer(text):
    verdict = _score_pair(m["s1"], m["s2"], "bracket_scores", tie_delta)
    if verdict is not None:
      found.append((m.start(), verdict))
  scores = first_line_scores(text)
  if scores is not None:
    winner = _winner_from_scores(*scores, tie_delta)
    found.append((0, PairwiseVerdict(winner, format="first_line_scores", scores=scores)))
  return found


def parse_pairwise(text: object, *, tie_delta: float = TIE_DELTA) -> PairwiseVerdict:
  """The pairwise verdict in a judge's reply: the last match of any format (module docstring).

  Never raises: an empty reply, a non-string or a reply with no verdict is invalid.
  """
  if not isinstance(text, str):
    return _invalid_pairwise(f"not text: {type(text).__name__}")
  if not text.strip():
    return _invalid_pairwise("empty reply")
  found = _pairwise_candidates(text, tie_delta)
  if not found:
    return _invalid_pairwise("no pairwise verdict found")
  # A stable sort keeps the order above among equal starts; the last start wins.
  return sorted(found, key=lambda item: item[0])[-1][1]


def _last_score(patterns: dict[str, re.Pattern], text: str) -> tuple[int, float, str] | None:
  best: tuple[int, float, str] | None = None
  for fmt, pattern in patterns.items():
    for m in pattern.finditer(text):
      score = float(m["score"])
      if math.isfinite(score) and (best is None or m.start() >= best[0]):
        best = (m.start(), score, fmt)
  return best


def parse_pointwise(
  text: object, *, low: float | None = None, high: float | None = None
) -> PointwiseVerdict:
  """The score in a judge's reply: the last "Final Score: N", "Rating: N" or "[[N]]"; "[N]"
  only when none of those occurs (FastChat's fallback). A score outside [low, high] (where
  given) is invalid. Never raises.
  """
  if not isinstance(text, str):
    return PointwiseVerdict(None, reason=f"not text: {type(text).__name__}")
  if not text.strip():
    return PointwiseVerdict(None, reason="empty reply")
  primary = {"final_score": _FINAL_SCORE, "rating": _RATING, "double_bracket": _DOUBLE_BRACKET}
  best = _last_score(primary, text) or _last_score({"single_bracket": _SINGLE_BRACKET}, text)
  if best is None:
    return PointwiseVerdict(None, reason="no score found")
  _, score, fmt = best
  if (low is not None and score < low) or (high is not None and score > high):
    return PointwiseVerdict(None, format=fmt, reason=f"score {score:g} outside [{low}, {high}]")
  return PointwiseVerdict(score, format=fmt)
