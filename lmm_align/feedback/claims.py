"""RLAIF-V's "divide" step: a response -> atomic claims -> one yes/no question per claim.

RLAIF-V (arXiv 2405.17220) does not ask a labeler whether a whole response is good. It splits
the response into atomic claims, turns each claim into a yes/no question, and lets a labeler
answer the questions one by one (`labeler.py`); the response's score is minus the number of
claims the labeler rejects (`rlaifv.py`). Both steps come in two interchangeable forms:

* model-based (`ModelClaimSplitter`, `ModelQuestionMaker`): a prompt asks a language model,
  through any `Judge`, for a list with one item per line; `parse_list_reply` reads the list
  whatever bullets or headers the model wraps it in. The default prompts are our own wording;
  a published prompt is used by passing its file path (see `load_prompt_template` for the
  placeholders). As published, the answer is cut to its first 300 space-separated words.
* rule-based (`RuleClaimSplitter`, `RuleQuestionMaker`): deterministic, offline, for tests and
  for the shapes world, whose responses are short declarative English. `split_claims_rules`
  splits sentences, then coordinated clauses and noun-phrase lists ("There is a red circle and
  a blue square." -> two claims); `claim_to_question` moves the copula or auxiliary to the
  front ("The circle is red." -> "Is the circle red?"), uses do-support for a few common
  verbs ("The image shows X." -> "Does the image show X?"), and otherwise falls back to
  "Is it true that <claim>?".

A splitter or question maker that could not produce a list for an item (the judge failed)
returns None for it, so one bad item is counted and skipped instead of ending a long run.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Protocol

from lmm_align.judges.base import Judge, JudgeRequest

# --------------------------------------------------------------------------------------------
# Interfaces.
# --------------------------------------------------------------------------------------------


class ClaimSplitter(Protocol):
  def split(self, items: Sequence[tuple[str, str]]) -> list[list[str] | None]:
    """(question, response) pairs -> each response's claims (None where it failed)."""
    ...


class QuestionMaker(Protocol):
  def questions(self, claims: Sequence[Sequence[str]]) -> list[list[str] | None]:
    """Each response's claims -> its yes/no questions (None where it failed)."""
    ...


# --------------------------------------------------------------------------------------------
# Prompts and reply parsing for the model-based forms.
# --------------------------------------------------------------------------------------------

QUESTION_PLACEHOLDER, ANSWER_PLACEHOLDER, CLAIMS_PLACEHOLDER = "{question}", "{answer}", "{claims}"

DEFAULT_SPLIT_PROMPT = """\
Below are a question about an image and an answer to it. Break the answer into atomic claims: \
short statements that can each be checked against the image on their own. Every claim must \
stand alone (write out what "it" or "they" refer to) and state one fact. Leave out opinions, \
guesses about feelings, and remarks about the answer itself.

Question: {question}
Answer: {answer}

Write one claim per line, starting each line with "- ", and nothing else."""

DEFAULT_QUESTION_PROMPT = """\
Rewrite each statement below as a yes/no question that asks whether the statement is true. \
Keep the tense and every detail; if a statement is negative (no, not, never, none), keep the \
negation in the question. Add nothing.

Statements:
{claims}

Write the questions in the same order, one per line, starting each line with "- ", and \
nothing else."""

# Published RLAIF-V truncates the answer it sends to the split model to 300 words.
MAX_ANSWER_WORDS = 300


def load_prompt_template(path: str | os.PathLike, placeholders: Sequence[str]) -> str:
  """A prompt template from a text file; each placeholder must appear in it.

  Placeholders are literal strings replaced with `str.replace`, not `str.format` fields, so a
  template may hold other braces (published prompts show "{Extracted fact 1}" as a format
  example). The split prompt takes `{question}` and `{answer}`; the question prompt takes
  `{claims}`, which becomes the claims as "- claim" lines.
  """
  with open(path, encoding="utf-8") as f:
    template = f.read()
  missing = [p for p in placeholders if p not in template]
  if missing:
    raise ValueError(f"prompt template {os.fspath(path)!r}: placeholder(s) {missing} not found")
  return template


def split_prompt(
  question: str,
  answer: str,
  template: str = DEFAULT_SPLIT_PROMPT,
  max_words: int = MAX_ANSWER_WORDS,
) -> str:
  """The prompt asking for `answer`'s claims; the answer is cut to its first `max_words` words."""
  answer = " ".join(answer.split(" ")[:max_words])
  # Replace the answer last, so a "{question}" typed inside an answer stays text.
  return template.replace(QUESTION_PLACEHOLDER, question).replace(ANSWER_PLACEHOLDER, answer)


def question_prompt(claims: Sequence[str], template: str = DEFAULT_QUESTION_PROMPT) -> str:
  """The prompt asking for one yes/no question per claim."""
  return template.replace(CLAIMS_PLACEHOLDER, "\n".join(f"- {c}" for c in claims))


# "- item", "-item", "* item", "1. item", "2) item", "(3) item"; a number needs a space after it
# so that "1.5 metres" is not a bullet.
_BULLET = re.compile(r"^(?:[-*\u2022]\s*|(?:\d+[.)]|\(\d+\))\s+)")
_HEADER = re.compile(r"^#+|:$")


def parse_list_reply(text: str) -> list[str]:
  """The items of a list a model wrote, one per line.

  Lines holding "###" are section headers (the published output format) and are skipped, as
  are lines that end with ":" and carry no bullet ("Here are the claims:"). When any line has
  a bullet ("-", "*", "1.", "2)", "(3)") only bulleted lines count, so a chatty preamble or
  closing remark is ignored; otherwise every remaining line is an item. Quotes around an item
  are dropped; empty items are dropped.
  """
  lines = [line.replace("**", "").strip() for line in text.splitlines()]
  lines = [line for line in lines if line and "###" not in line]
  bulleted = [line for line in lines if _BULLET.match(line) and _BULLET.sub("", line)]
  if bulleted:
    lines = [_BULLET.sub("", line) for line in bulleted]
  else:
    lines = [line for line in lines if not _HEADER.search(line)]
  items = [line.strip().strip("\"'\u201c\u201d").strip() for line in lines]
  return [item for item in items if item]


class ModelClaimSplitter:
  """Claims from a language model behind a Judge (one request per response, one batch)."""

  def __init__(
    self,
    judge: Judge,
    template: str = DEFAULT_SPLIT_PROMPT,
    max_answer_words: int = MAX_ANSWER_WORDS,
    max_tokens: int = 256,
  ):
    self.judge, self.template = judge, template
    self.max_answer_words, self.max_tokens = max_answer_words, max_tokens

  def split(self, items: Sequence[tuple[str, str]]) -> list[list[str] | None]:
    requests = [
      JudgeRequest(
        split_prompt(q, a, self.template, self.max_answer_words),
        max_tokens=self.max_tokens,
        request_id=f"split:{i}",
      )
      for i, (q, a) in enumerate(items)
    ]
    return [parse_list_reply(r.text) if r.ok else None for r in self.judge.complete(requests)]


class ModelQuestionMaker:
  """Questions from a language model behind a Judge: one request holds a response's claims.

  The reply may list a different number of questions than there were claims; the pairing
  step drops responses whose judged-question count does not match their claim count.
  """

  def __init__(self, judge: Judge, template: str = DEFAULT_QUESTION_PROMPT, max_tokens: int = 512):
    self.judge, self.template, self.max_tokens = judge, template, max_tokens

  def questions(self, claims: Sequence[Sequence[str]]) -> list[list[str] | None]:
    # A response without claims needs no request.
    asked = [i for i, c in enumerate(claims) if c]
    requests = [
      JudgeRequest(
        question_prompt(claims[i], self.template),
        max_tokens=self.max_tokens,
        request_id=f"questions:{i}",
      )
      for i in asked
    ]
    out: list[list[str] | None] = [[] for _ in claims]
    for i, reply in zip(asked, self.judge.complete(requests) if requests else []):
      out[i] = parse_list_reply(reply.text) if reply.ok else None
    return out


# --------------------------------------------------------------------------------------------
# Rule-based splitting.
# --------------------------------------------------------------------------------------------

_ABBREVIATIONS = {"e.g.", "i.e.", "etc.", "vs.", "mr.", "mrs.", "ms.", "dr.", "st."}
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s|$)")
_CONTRACTIONS = {
  "there's": "there is",
  "it's": "it is",
  "that's": "that is",
  "isn't": "is not",
  "aren't": "are not",
  "wasn't": "was not",
  "weren't": "were not",
  "doesn't": "does not",
  "don't": "do not",
  "didn't": "did not",
  "can't": "can not",
  "cannot": "can not",
  "won't": "will not",
  "hasn't": "has not",
  "haven't": "have not",
}
_CONTRACTION = re.compile(r"\b(" + "|".join(map(re.escape, _CONTRACTIONS)) + r")\b", re.IGNORECASE)
# A leading interjection is not part of the claim: "Yes, there is a red circle."
_INTERJECTION = re.compile(r"^(?:yes|no|sure|certainly|well|okay|ok|indeed)\s*[,!]\s+", re.I)
# Sentences about the conversation rather than the image.
_FILLER = re.compile(
  r"^(?:i hope|let me know|feel free|if you have|is there anything|as an ai|thank|sure|"
  r"certainly|of course|here (?:is|are|'s) (?:a |an |the |my )?(?:description|summary|"
  r"breakdown|list|answer|overview))\b",
  re.IGNORECASE,
)
# A comma needs a space after it, so that "1,000" stays one word.
_SEPARATOR = re.compile(r"(\s*;\s*|\s*,\s+(?:and\s+|but\s+)?|\s+(?:and|but)\s+)")

_BE = {"is", "are", "was", "were"}
_MODALS = {"can", "could", "will", "would", "should", "may", "might", "must", "shall"}
_AUXILIARIES = _BE | _MODALS | {"do", "does", "did"}
# Verbs a description of an image commonly uses, third person singular -> base form.
_COMMON_VERBS = {
  "shows": "show",
  "contains": "contain",
  "has": "have",
  "sits": "sit",
  "appears": "appear",
  "includes": "include",
  "features": "feature",
  "depicts": "depict",
  "displays": "display",
  "holds": "hold",
  "stands": "stand",
  "lies": "lie",
  "looks": "look",
  "seems": "seem",
  "wears": "wear",
  "covers": "cover",
  "touches": "touch",
  "faces": "face",
}
_PLURAL_VERBS = set(_COMMON_VERBS.values())
_VERBS = _AUXILIARIES | set(_COMMON_VERBS) | _PLURAL_VERBS | {"am", "be", "been", "have", "had"}
_SINGULAR_DETERMINERS = {"a", "an", "one", "another", "this", "that", "single", "each", "every"}
_PLURAL_DETERMINERS = {"two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"} | {
  "these",
  "those",
  "some",
  "several",
  "many",
  "both",
  "multiple",
}
_DETERMINERS = (
  _SINGULAR_DETERMINERS | _PLURAL_DETERMINERS | {"the", "his", "her", "its", "their", "my", "our"}
)
_PREPOSITIONS = {
  "in", "on", "at", "to", "near", "next", "behind", "above", "below", "under", "beside",
  "from", "with", "inside", "outside", "across", "along", "around", "between", "over",
}  # fmt: skip


def _words(text: str) -> list[str]:
  return [w.strip(",;:").lower() for w in text.split()]


def _expand_contractions(text: str) -> str:
  def expand(m: re.Match) -> str:
    out = _CONTRACTIONS[m.group(0).lower()]
    return out[0].upper() + out[1:] if m.group(0)[0].isupper() else out

  return _CONTRACTION.sub(expand, text.replace("\u2019", "'"))


def split_sentences(text: str) -> list[str]:
  """Sentences of a text: split after . ! ? followed by a space (not after "e.g." and the
  like, not inside "3.5") and at line breaks; list bullets ("- ", "1. ") are dropped."""
  sentences = []
  for line in text.splitlines():
    line = _BULLET.sub("", line.strip())
    start = 0
    for m in _SENTENCE_END.finditer(line):
      last_word = line[start : m.end()].split()[-1].lower() if line[start : m.end()].split() else ""
      if last_word in _ABBREVIATIONS:
        continue
      sentences.append(line[start : m.end()].strip())
      start = m.end()
    sentences.append(line[start:].strip())
  return [s for s in sentences if s]


def _has_verb(words: list[str]) -> bool:
  """A finite verb among lowercase words: a known verb, or (the catch-all for verbs we do not
  list, "a man rides a bike") a word ending in -s right before a determiner."""
  if any(w in _VERBS for w in words):
    return True
  return any(
    w.endswith("s") and not w.endswith("ss") and nxt in _DETERMINERS
    for w, nxt in zip(words[1:], words[2:])
  )


def _kind(part: str) -> str:
  """'clause' (has a finite verb), 'np' (starts with a determiner or number) or 'other'."""
  words = _words(part)
  if not words:
    return "other"
  if _has_verb(words):
    return "clause"
  if words[0] in _DETERMINERS or words[0].isdecimal():
    return "np"
  return "other"


def _conjuncts(sentence: str) -> list[tuple[str, str]]:
  """A sentence cut at commas, semicolons and "and"/"but" into (text, kind) units.

  A piece that is neither a clause nor a noun phrase ("red" of "red and blue circles", "in
  the top left" of "..., in the top left") is glued back to its neighbour with its separator:
  forwards when it opens the sentence or is a prepositional phrase before a clause ("On the
  left, there is ..."), backwards otherwise.
  """
  pieces = _SEPARATOR.split(sentence)
  parts, seps = pieces[0::2], pieces[1::2]
  units: list[list[str]] = []
  carry = ""
  for i, part in enumerate(parts):
    text = carry + part
    carry = ""
    kind = _kind(text)
    if kind == "other" and i + 1 < len(parts):
      words = _words(text)
      leads_clause = bool(words) and words[0] in _PREPOSITIONS and _kind(parts[i + 1]) == "clause"
      if not units or leads_clause:
        carry = text + seps[i]
        continue
    if kind == "other" and units:
      units[-1][0] += seps[i - 1] + text
      continue
    units.append([text, kind])
  return [(text.strip(), kind) for text, kind in units if text.strip()]


def _is_plural(noun_phrase: str) -> bool:
  first = _words(noun_phrase)[0]
  if first in _PLURAL_DETERMINERS:
    return True
  return first.isdecimal() and int(first) != 1


def _np_prefix(clause: str) -> str | None:
  """What a noun phrase conjunct inherits from the clause before it: the words up to the
  first determiner after the verb ("The image shows a red circle" -> "The image shows").

  None (the conjunct becomes "There is <NP>") when that determiner follows a preposition: in
  "A circle is on the left, and a square" the square is the subject of an elided predicate,
  not a second thing the circle is on.
  """
  words = clause.split()
  lower = _words(clause)
  verb = next((i for i, w in enumerate(lower) if w in _VERBS), None)
  if verb is None:
    return None
  det = next((i for i in range(verb + 1, len(lower)) if lower[i] in _DETERMINERS), None)
  if det is None:
    return " ".join(words[: verb + 1])
  return None if lower[det - 1] in _PREPOSITIONS else " ".join(words[:det])


def _np_claim(noun_phrase: str, prefix: str | None = None) -> str:
  """A noun phrase as a claim: after its clause's prefix, or as "There is/are <NP>"; a prefix
  ending in "there is"/"there are" takes the verb that agrees with the phrase."""
  noun_phrase = _lowercase_lead(noun_phrase.split())
  verb = "are" if _is_plural(noun_phrase) else "is"
  if prefix is None:
    return f"There {verb} {noun_phrase}"
  words = prefix.split()
  if len(words) >= 2 and _words(prefix)[-2:] in (["there", "is"], ["there", "are"]):
    words[-1] = verb
  return " ".join(words + [noun_phrase])


def _finish(text: str) -> str:
  text = text.strip().rstrip(".!?;,: ").strip()
  return text[0].upper() + text[1:] + "." if text else ""


def _claims_of_sentence(sentence: str) -> list[str]:
  if sentence.rstrip().endswith("?"):
    return []
  sentence = _INTERJECTION.sub("", sentence.strip()).rstrip(".!").strip()
  if not sentence or _FILLER.match(sentence) or len(sentence.split()) < 2:
    return []
  head, colon, tail = sentence.partition(":")
  if not colon and _kind(sentence) == "np":
    # A verbless "A gray image with a red circle and a blue square" reads like the colon form.
    head, with_, tail = sentence.partition(" with ")
    colon = with_ if _words(tail)[:1] and _words(tail)[0] in _DETERMINERS else ""
  if colon and tail.strip():
    # "Two shapes on a white background: a red circle and a blue square": the head is a
    # claim of its own, and the list after the colon (or "with") names things that are there.
    units = _conjuncts(tail.strip())
    claims = _claims_of_sentence(head)
    claims += [_finish(_np_claim(t) if k == "np" else t) for t, k in units]
    return [c for c in claims if len(c.split()) >= 2]
  claims, prefix = [], None
  for text, kind in _conjuncts(sentence):
    if kind == "clause":
      prefix = _np_prefix(text)
    claims.append(_finish(_np_claim(text, prefix) if kind == "np" else text))
  return [c for c in claims if len(c.split()) >= 2]


def split_claims_rules(text: str) -> list[str]:
  """Atomic claims of a response by rule; each claim is a sentence ending with ".".

  Sentences are split first; questions, single words ("Yes.") and remarks about the
  conversation ("I hope this helps.") are dropped, and a leading "Yes," / "No," is removed.
  Each sentence is then cut at coordination: independent clauses become claims of their own,
  and a list of noun phrases inherits the start of the clause before it ("The image shows a
  red circle and a blue square." -> "The image shows a red circle.", "The image shows a blue
  square."), with "There is"/"There are" agreeing with each phrase. A noun phrase with no
  clause before it becomes "There is <NP>."; a list after a colon, or after "with" in a verbless
  sentence ("A gray image with a red circle and a blue square."), is a list of things that are
  there, and the part before it a claim of its own. Disjunctions ("or") are never split.
  """
  claims = []
  for sentence in split_sentences(_expand_contractions(text)):
    claims += _claims_of_sentence(sentence)
  return claims


class RuleClaimSplitter:
  """`split_claims_rules` behind the ClaimSplitter interface (the question is not used)."""

  def split(self, items: Sequence[tuple[str, str]]) -> list[list[str] | None]:
    return [split_claims_rules(response) for _, response in items]


# --------------------------------------------------------------------------------------------
# Rule-based questions.
# --------------------------------------------------------------------------------------------


def _lowercase_lead(words: list[str]) -> str:
  """Words that moved away from the start of a sentence, with the sentence-initial capital
  dropped unless the first word looks like a name: "I", all caps, a capital inside it, or
  followed by another capitalised word ("Leptis Magna"). A one-word name ("Paris") cannot be
  told from a sentence-initial word and is lowercased."""
  first = words[0]
  keep = (
    first == "I"
    or (len(first) > 1 and first.isupper())
    or any(c.isupper() for c in first[1:])
    or (len(words) > 1 and words[1][:1].isupper())
  )
  return " ".join([first if keep else first[0].lower() + first[1:]] + words[1:])


def claim_to_question(claim: str) -> str:
  """A yes/no question asking whether `claim` holds.

  "There is/are X ..." -> "Is/Are there X ...?"; "<subject> is/are/was/can ... Y" -> "Is/
  Are/Was/Can <subject> ... Y?" (negation kept: "The circle is not red." -> "Is the circle
  not red?"); "<subject> shows/has/contains ... X" -> "Does <subject> show/have/contain ...
  X?" for the verbs in `_COMMON_VERBS` (and "Do" for their plural forms). The verb must come
  within the first eight words and not after a relative pronoun (so "The circle that is red
  ..." is not turned inside out); anything else becomes "Is it true that <claim>?". A leading prepositional phrase set off by a
  comma moves to the end ("On the left, there is a circle." -> "Is there a circle on the
  left?").
  """
  text = _expand_contractions(claim.strip()).rstrip(".!?").strip()
  words = text.split()
  if not words:
    raise ValueError("cannot make a question from an empty claim")
  lower = [w.lower() for w in words]
  opener, comma, rest = text.partition(", ")
  if comma and lower[0] in _PREPOSITIONS and rest.strip():
    # "On the left, there is a circle." -> "Is there a circle on the left?"
    return f"{claim_to_question(rest)[:-1]} {opener[0].lower()}{opener[1:]}?"
  if len(words) > 2 and lower[0] == "there" and lower[1] in _BE:
    return f"{lower[1].capitalize()} there {' '.join(words[2:])}?"
  for i, w in enumerate(lower[:8]):
    if w in ("that", "which", "who", "whose", "where", "when", "if", "because"):
      break
    if i == 0:
      continue
    if w in _AUXILIARIES and i + 1 < len(words):
      return f"{w.capitalize()} {_lowercase_lead(words[:i])} {' '.join(words[i + 1 :])}?"
    if w in _COMMON_VERBS or w in _PLURAL_VERBS:
      aux, base = ("Does", _COMMON_VERBS[w]) if w in _COMMON_VERBS else ("Do", w)
      rest = " ".join([base] + words[i + 1 :])
      return f"{aux} {_lowercase_lead(words[:i])} {rest}?"
  return f"Is it true that {_lowercase_lead(words)}?"


class RuleQuestionMaker:
  """`claim_to_question` behind the QuestionMaker interface (always one question per claim)."""

  def questions(self, claims: Sequence[Sequence[str]]) -> list[list[str] | None]:
    return [[claim_to_question(c) for c in response] for response in claims]
