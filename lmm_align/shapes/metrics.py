"""Exact hallucination metrics for the shapes world: CHAIR on free text, scorers for short answers.

Free-form answers are read by a rule-based parser over the closed vocabulary (no NLTK, no GPT
extractor), so the numbers are exact up to the parser's documented rules:

* A mention is a noun phrase whose head is a shape word ("circle", "circles"). Its colour is the
  colour adjective in the phrase before the head ("a large red circle"), or a predicate right
  after it ("the circle is red"); coordinated colours give one mention each ("red and blue
  circles"). Numbers are not read: "two red circles" is one mention of (red, circle), as CHAIR
  counts words, not instances. Colour words include white/gray/black, which no object has, so
  "a white circle" is a wrong attribute rather than an uncoloured mention.
* Negated mentions are dropped. A negation cue ("no", "not", "n't", "without", "neither",
  "nor") opens a scope only when it governs a noun phrase: after skipping verbs like "see" or
  "contain" and determiners like "a"/"any", the next word is a colour, size, number or shape.
  So "there is no red circle" and "I don't see any circles" negate, while "No, the circle is
  red" (the comma ends the scope) and "the circle is not to the left of the square" do not. The
  scope runs to the end of the clause: punctuation, a contrastive word ("but", "however", ...),
  or an "and" that does not join two adjectives. "no red circle or blue square" negates both;
  "no red circle and a blue square" negates only the circle.
* Every other word is ignored, including unknown shapes ("hexagon") and "object"/"shape".

Mentions are scored against the scene: a mention is hallucinated when no object matches it,
either because its shape is absent (an object hallucination) or because the shape is present but
not in that colour (an attribute error). CHAIR_i counts every mention, as the original CHAIR
does (RLAIF-V dedupes per response instead).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from lmm_align.shapes.world import COLOURS, NUMBER_WORDS, PLURALS, SHAPES, SIZES, Scene, SceneObject

_SHAPE_WORDS = {**{s: s for s in SHAPES}, **{p: s for s, p in PLURALS.items()}}
_COLOUR_WORDS = {
  **{c: c for c in COLOURS},
  "white": "white",
  "gray": "gray",
  "grey": "gray",
  "black": "black",
}
_SIZE_WORDS = {*SIZES, "big", "little", "tiny", "medium", "huge"}
_NUMBERS = {w: i for i, w in enumerate(NUMBER_WORDS)}
_QUANTIFIERS = {*_NUMBERS, "single", "other", "several", "many", "some", "both"}
_NEGATIONS = {"no", "not", "without", "neither", "nor", "never"}
# Words that may sit between a negation and the noun phrase it governs.
_NEGATION_FILLERS = {
  "see",
  "seen",
  "contain",
  "contains",
  "show",
  "shows",
  "have",
  "has",
  "include",
  "includes",
  "find",
  "appear",
  "a",
  "an",
  "any",
  "the",
  "single",
}
_CLAUSE_ENDS = {"but", "however", "although", "though", "while", "whereas", "yet"}
_PUNCTUATION = set(".,;:!?\n")
_TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)?|[0-9]+|[.,;:!?\n]")


def _tokens(text: str) -> list[str]:
  return _TOKEN.findall(text.lower().replace("\u2019", "'"))


def _is_negation(token: str) -> bool:
  return token in _NEGATIONS or token.endswith("n't")


def _starts_noun_phrase(token: str) -> bool:
  return (
    token in _COLOUR_WORDS
    or token in _SIZE_WORDS
    or token in _SHAPE_WORDS
    or token in _NUMBERS
    or token.isdigit()
  )


def _governs_noun_phrase(tokens: list[str], i: int) -> bool:
  """Whether the negation at tokens[i] applies to a noun phrase that follows it."""
  j = i + 1
  while j < len(tokens) and tokens[j] in _NEGATION_FILLERS:
    j += 1
  return j < len(tokens) and _starts_noun_phrase(tokens[j])


def _colours_before(tokens: list[str], i: int) -> list[str]:
  """Colour adjectives of the noun phrase headed at tokens[i], walking back to its determiner."""
  colours: list[str] = []
  j = i - 1
  while j >= 0:
    t = tokens[j]
    if t in _COLOUR_WORDS:
      colours.append(_COLOUR_WORDS[t])
    elif t in ("and", "or") and colours and j > 0 and tokens[j - 1] in _COLOUR_WORDS:
      pass  # "red and blue circles"
    elif not (t in _SIZE_WORDS or t in _QUANTIFIERS or t.isdigit()):
      break  # a determiner or any other word starts the phrase
    j -= 1
  return colours[::-1]


def _predicate_colour(tokens: list[str], i: int) -> str | None:
  """'the circle is red' / 'circles that are blue' -> the colour; None when absent or negated."""
  j = i + 1
  if j < len(tokens) and tokens[j] in ("that", "which"):
    j += 1
  if j + 1 < len(tokens) and tokens[j] in ("is", "are"):
    return _COLOUR_WORDS.get(tokens[j + 1])
  return None


def parse_mentions_with_negation(text: str) -> list[tuple[str | None, str, bool]]:
  """Every (colour or None, shape, negated) mention in `text`, in order (see module docstring)."""
  tokens = _tokens(text)
  mentions: list[tuple[str | None, str, bool]] = []
  negated = False
  for i, t in enumerate(tokens):
    if t in _PUNCTUATION or t in _CLAUSE_ENDS:
      negated = False
    elif t == "and" and not (
      i > 0 and (tokens[i - 1] in _COLOUR_WORDS or tokens[i - 1] in _SIZE_WORDS)
    ):
      negated = False
    elif _is_negation(t):
      negated = negated or _governs_noun_phrase(tokens, i)
    elif t in _SHAPE_WORDS:
      colours = _colours_before(tokens, i) or [_predicate_colour(tokens, i)]
      mentions.extend((c, _SHAPE_WORDS[t], negated) for c in colours)
  return mentions


def parse_mentions(text: str) -> list[tuple[str | None, str]]:
  """The (colour or None, shape) objects `text` says are there, negated mentions dropped.

  >>> parse_mentions("Two red circles and a square, but no blue star.")
  [('red', 'circle'), (None, 'square')]
  """
  return [(c, s) for c, s, negated in parse_mentions_with_negation(text) if not negated]


# ------------------------------------------------------------------------------------------
# CHAIR-style metrics against the ground-truth scene.
# ------------------------------------------------------------------------------------------

COUNT_KEYS = (
  "responses",
  "responses_with_mentions",
  "hallucinated_responses",
  "mentions",
  "hallucinated_mentions",
  "object_hallucinations",
  "coloured_mentions",
  "attribute_errors",
  "binding_errors",
  "gt_objects",
  "recalled_objects",
  "words",
)


def _as_scene(scene: Scene | Mapping[str, Any]) -> Scene:
  return scene if isinstance(scene, Scene) else Scene.from_dict(dict(scene))


def response_hallucination_counts(text: str, scene: Scene | Mapping[str, Any]) -> dict[str, int]:
  """The counts (COUNT_KEYS) of one answer about one scene; sum them to aggregate.

  mentions: parsed non-negated mentions; hallucinated_mentions: those no object matches, split
  into object_hallucinations (shape absent) and attribute_errors (shape present, colour wrong);
  binding_errors: the attribute errors whose colour another object of the scene has (the right
  colour and shape, wrongly paired); coloured_mentions: mentions with a colour whose shape is
  present (attribute_errors' base);
  recalled_objects: scene objects some correct mention matches (an uncoloured mention matches
  every object of its shape); words: whitespace-separated words of the answer.
  """
  scene = _as_scene(scene)
  present_shapes = {o.shape for o in scene.objects}
  present_colours = {o.colour for o in scene.objects}
  mentions = parse_mentions(text)
  object_hallucinations = attribute_errors = binding_errors = coloured = 0
  recalled: set[int] = set()
  for colour, shape in mentions:
    if shape not in present_shapes:
      object_hallucinations += 1
      continue
    coloured += colour is not None
    matches = {
      i for i, o in enumerate(scene.objects) if o.shape == shape and colour in (None, o.colour)
    }
    attribute_errors += not matches
    binding_errors += not matches and colour in present_colours
    recalled |= matches
  hallucinated = object_hallucinations + attribute_errors
  return {
    "responses": 1,
    "responses_with_mentions": int(bool(mentions)),
    "hallucinated_responses": int(hallucinated > 0),
    "mentions": len(mentions),
    "hallucinated_mentions": hallucinated,
    "object_hallucinations": object_hallucinations,
    "coloured_mentions": coloured,
    "attribute_errors": attribute_errors,
    "binding_errors": binding_errors,
    "gt_objects": len(scene.objects),
    "recalled_objects": len(recalled),
    "words": len(text.split()),
  }


def ground_truth_score(counts: Mapping[str, int], recall_weight: float) -> float:
  """The scene's score of one answer from its counts: -(hallucinated mentions) + recall_weight *
  (scene objects recalled). The ground-truth judge of the iterative loop and PPO's oracle."""
  return -counts["hallucinated_mentions"] + recall_weight * counts["recalled_objects"]


def _ratio(num: float, den: float) -> float:
  return num / den if den else 0.0


def aggregate_hallucination_counts(counts: Sequence[Mapping[str, int]]) -> dict[str, float]:
  """Sums per-response (or per-shard) counts and derives the rates from the sums.

  chair_i: hallucinated mentions / mentions. chair_s (= hallucination_rate): responses with a
  hallucinated mention / responses. chair_s_refine: the same over responses that mention any
  object (RLAIF-V's response-level rate). object_chair_i: mentions of absent shapes / mentions.
  attribute_error_rate: wrong-colour mentions / coloured mentions of present shapes;
  binding_error_rate: those of them whose colour is another object's, over the same base.
  object_recall: recalled scene objects / scene objects. mean_answer_words: words / responses.
  A rate with a zero denominator is 0.
  """
  total = {k: sum(int(c[k]) for c in counts) for k in COUNT_KEYS}
  chair_s = _ratio(total["hallucinated_responses"], total["responses"])
  return {
    **total,
    "chair_i": _ratio(total["hallucinated_mentions"], total["mentions"]),
    "chair_s": chair_s,
    "hallucination_rate": chair_s,
    "chair_s_refine": _ratio(total["hallucinated_responses"], total["responses_with_mentions"]),
    "object_chair_i": _ratio(total["object_hallucinations"], total["mentions"]),
    "attribute_error_rate": _ratio(total["attribute_errors"], total["coloured_mentions"]),
    "binding_error_rate": _ratio(total["binding_errors"], total["coloured_mentions"]),
    "object_recall": _ratio(total["recalled_objects"], total["gt_objects"]),
    "mean_answer_words": _ratio(total["words"], total["responses"]),
  }


def hallucination_metrics(
  texts: Sequence[str], scenes: Sequence[Scene | Mapping[str, Any]]
) -> dict[str, float]:
  """CHAIR-like metrics of answers `texts[i]` about `scenes[i]` (Scenes or their dicts)."""
  if len(texts) != len(scenes):
    raise ValueError(f"{len(texts)} texts for {len(scenes)} scenes")
  return aggregate_hallucination_counts(
    [response_hallucination_counts(t, s) for t, s in zip(texts, scenes)]
  )


# ------------------------------------------------------------------------------------------
# Short answers: yes/no, multiple choice, counts.
# ------------------------------------------------------------------------------------------


def parse_yes_no(text: str) -> str:
  """POPE's rule: in the first sentence, "No", "no" or "not" as a word means no; else yes."""
  first = text.split(".")[0].replace(",", "")
  return "no" if {"No", "no", "not"} & set(first.split(" ")) else "yes"


def score_yes_no(text: str, label: str) -> bool:
  """Whether the answer, read by POPE's rule, equals `label` ("yes" or "no")."""
  return parse_yes_no(text) == label.strip().lower()


_LETTER_ALONE = re.compile(r"^\(?([A-D])\)?\s*[.:)]?\s*$")
_LETTER_FIRST = re.compile(r"^\(?([A-D])(?:\)|\.|:)")
_LETTER_SAID = re.compile(r"\b(?i:answer|option|choice)\s*(?:is\s*)?:?\s*\(?([A-D])\b")


def extract_choice_letter(text: str, options: Sequence[str] | None = None) -> str | None:
  """The option letter an answer picks, or None.

  In order: the bare letter ("B", "(B)", "B."), a leading "B." / "B)" / "B:", "the answer is
  B" / "option B", and, given the options, the one option whose text the answer contains as
  words. A leading "A" followed by a space is not read, since it is usually the article.
  """
  stripped = text.strip()
  for pattern in (_LETTER_ALONE, _LETTER_FIRST):
    if m := pattern.match(stripped):
      return m.group(1)
  if m := _LETTER_SAID.search(stripped):
    return m.group(1).upper()
  if options:
    words = f" {' '.join(_tokens(stripped))} "
    hits = [k for k, o in enumerate(options) if f" {' '.join(_tokens(o))} " in words]
    if len(hits) == 1:
      return "ABCD"[hits[0]]
  return None


def score_multiple_choice(
  text: str, answer_letter: str, options: Sequence[str] | None = None
) -> bool:
  """Whether the extracted letter equals `answer_letter`."""
  return extract_choice_letter(text, options) == answer_letter


def parse_count(text: str) -> int | None:
  """The first number in the answer: digits, "one".."ten", or "no"/"none"/"zero" as 0.

  An interjected "No," / "No." is not a count ("No, there are two." reads 2).
  """
  tokens = _tokens(text)
  for i, t in enumerate(tokens):
    if t.isdigit():
      return int(t)
    if t in _NUMBERS:
      return _NUMBERS[t]
    if t == "none" or (t == "no" and not (i + 1 < len(tokens) and tokens[i + 1] in _PUNCTUATION)):
      return 0
  return None


def score_count(text: str, count: int) -> bool:
  """Whether the first number in the answer equals `count`."""
  return parse_count(text) == count


# ------------------------------------------------------------------------------------------
# Corrections: RLHF-V's fine-grained human feedback, with the scene as the annotator.
# ------------------------------------------------------------------------------------------

_OBJECT_PHRASE = re.compile(
  r"\b(?:(?P<article>an?)\s+)?(?:(?P<size>small|large)\s+)?(?:(?P<colour>{colours})\s+)?"
  r"(?P<shape>{shapes})\b".format(colours="|".join(COLOURS), shapes="|".join(SHAPES)),
  re.IGNORECASE,
)


def _replacement(
  wrong: tuple[str | None, str], pool: list[SceneObject], scene: Scene
) -> SceneObject:
  """The object a corrector would name instead of `wrong`: one the answer has not named yet,
  sharing its shape (a colour fix) or else its colour (a shape fix), else any; when every
  object is named already, any object sharing the shape or colour, else the first."""
  colour, shape = wrong
  preferences = (
    [o for o in pool if o.shape == shape],
    [o for o in pool if o.colour == colour],
    pool,
    [o for o in scene.objects if o.shape == shape],
    [o for o in scene.objects if o.colour == colour],
    list(scene.objects),
  )
  return next(objects[0] for objects in preferences if objects)


def corrected_response(text: str, scene: Scene | Mapping[str, Any]) -> str | None:
  """`text` with each hallucinated "[a] [size] [colour] shape" phrase rewritten to name a
  scene object (`_replacement`), everything else kept as written: the minimal edit RLHF-V's
  annotators make, so that a (corrected, original) pair differs only where the answer is
  wrong. Singular phrases in the vocabulary's own words only (what our policies write).

  None when the answer has no hallucinated mention, or when a hallucination sits in a phrase
  this rewrite does not reach (a plural, a predicate colour "the circle is red"): the result
  is re-scored and returned only if it has no hallucinated mention left.
  """
  scene = _as_scene(scene)
  if not scene.objects or response_hallucination_counts(text, scene)["hallucinated_mentions"] == 0:
    return None
  named = {(c, s) for c, s in parse_mentions(text)}
  pool = [
    o for o in scene.objects if (o.colour, o.shape) not in named and (None, o.shape) not in named
  ]

  def fix(m: re.Match) -> str:
    colour = m["colour"].lower() if m["colour"] else None
    shape = m["shape"].lower()
    absent = (
      all(o.shape != shape for o in scene.objects)
      if colour is None
      else (colour, shape) not in scene.pairs
    )
    if not absent:
      return m[0]
    obj = _replacement((colour, shape), pool, scene)
    if obj in pool:
      pool.remove(obj)
    words = [w for w in (m["size"] and obj.size, colour and obj.colour, obj.shape) if w]
    phrase = " ".join(words)
    if m["article"]:
      phrase = f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"
    return phrase[0].upper() + phrase[1:] if m[0][0].isupper() else phrase

  fixed = _OBJECT_PHRASE.sub(fix, text)
  if response_hallucination_counts(fixed, scene)["hallucinated_mentions"]:
    return None
  return fixed
