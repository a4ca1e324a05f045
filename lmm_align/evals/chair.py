"""CHAIR and RLAIF-V's Object HalBench: which COCO objects a response names, and how many of
them are not in the image.

The pipeline, as in the published scorers (LisaAnne/Hallucination `chair.py`, RLAIF-V
`eval_gpt_obj_halbench.py`):

1. A synonym table maps every word for a COCO object to one of the 80 classes ("puppy" -> dog).
   `parse_synonyms_file` reads the published `synonyms_refine.txt` (one class a line, class
   first, comma-separated); `DEFAULT_SYNONYMS` is our own table, used when no file is given.
2. Rule-based extraction (`mentioned_objects`): lower-case, tokenize (punctuation stays a
   token, so no phrase spans a comma), singularize each token (`singularize`: a small rule
   set plus an irregular-plurals table, standing in for the published lemmatizer), merge
   two-word phrases before looking at single words ("hot dog" is never "dog"), apply the
   protocol's special cases (baby/adult <animal> -> animal, passenger jet/train -> jet/train,
   bow tie -> tie, toilet seat -> toilet, "home plate" and "train track" swallow their words,
   "seat" is dropped when "toilet" is present), keep the words in the table. Every mention
   counts; only phrases of exactly two words are merged, as published.
3. Ground truth per image (`load_coco_ground_truth`): the classes of its COCO instance
   annotations plus the classes that step 2 finds in its reference captions.
4. Optional LLM extraction (`extract_objects_with_judge`): a `Judge` lists the objects; each
   listed phrase is mapped by its two-word phrases, else by the whole phrase, else by its last
   word (the head of an English noun phrase; the published code uses spaCy's noun tags here).
   Objects are deduplicated per response, answers of at most 3 words get no objects, and a
   reply that cannot be read is counted invalid and its response left out.
5. Metrics (`chair_metrics`), over responses:
     CHAIR_s = responses with a hallucinated mention / responses
     response hallucination rate (RLAIF-V's CHAIRs_refine) = the same over the responses that
       mention at least one COCO object
     CHAIR_i = hallucinated mentions / mentions
     object recall = sum over responses of distinct correctly named classes / sum of |ground truth|
   A ratio with a zero denominator is NaN. RLAIF-V reports the rate and CHAIR_i times 100.

Answers (`read_chair_answers`) are JSON Lines in RLAIF-V's layout (`image_id`, `question` or
`prompt`, `text` or `answer`) or LLaVA's (`question_id`, `prompt`, `text`) with the image
taken from an `image` file name or, by `question_id`, from a questions file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from lmm_align.data.jsonl import read_jsonl
from lmm_align.judges.base import Judge, JudgeReply, JudgeRequest


class ChairDataError(ValueError):
  pass


# --------------------------------------------------------------------------------------------
# Synonym tables.
# --------------------------------------------------------------------------------------------

# Our own table: the 80 COCO class names (as in the instance annotations), each with words
# that name the same thing. Plurals come from `singularize`, so only singular forms are listed.
DEFAULT_SYNONYMS: dict[str, tuple[str, ...]] = {
  "person": ("people", "man", "woman", "boy", "girl", "child", "kid", "baby", "toddler",
             "infant", "adult", "teenager", "lady", "guy", "gentleman", "player", "rider",
             "skier", "snowboarder", "surfer", "skateboarder", "pedestrian", "worker", "chef",
             "cook", "officer", "policeman", "driver", "passenger", "student", "tourist",
             "athlete", "batter", "catcher", "pitcher", "umpire", "spectator", "bride",
             "groom", "mother", "father", "son", "daughter", "customer", "biker", "cyclist"),
  "bicycle": ("bike", "tricycle", "bmx"),
  "car": ("automobile", "sedan", "suv", "taxi", "cab", "van", "minivan", "jeep", "limousine",
          "hatchback", "coupe"),
  "motorcycle": ("motorbike", "motor bike", "scooter", "moped", "dirt bike"),
  "airplane": ("plane", "aeroplane", "jet", "jetliner", "airliner", "aircraft", "biplane",
               "seaplane"),
  "bus": ("minibus", "school bus", "double decker"),
  "train": ("locomotive", "tram", "streetcar"),
  "truck": ("lorry", "pickup", "firetruck", "fire truck", "tow truck", "dump truck"),
  "boat": ("ship", "sailboat", "yacht", "canoe", "kayak", "ferry", "speedboat", "rowboat",
           "vessel", "barge", "tugboat"),
  "traffic light": ("traffic signal", "stoplight", "stop light"),
  "fire hydrant": ("hydrant",),
  "stop sign": (),
  "parking meter": (),
  "bench": ("park bench",),
  "bird": ("pigeon", "seagull", "gull", "duck", "goose", "swan", "parrot", "sparrow", "crow",
           "owl", "eagle", "hawk", "pelican", "flamingo", "hen", "rooster", "penguin", "heron",
           "finch", "robin"),
  "cat": ("kitten", "kitty", "tabby", "feline"),
  "dog": ("puppy", "pup", "doggy", "doggie", "canine", "poodle", "terrier", "retriever",
          "labrador", "bulldog", "beagle", "husky", "pug", "dachshund", "sheepdog", "collie",
          "chihuahua"),
  "horse": ("pony", "foal", "colt", "mare", "stallion"),
  "sheep": ("lamb", "ewe", "ram"),
  "cow": ("cattle", "calf", "bull", "ox", "heifer"),
  "elephant": (),
  "bear": ("grizzly", "polar bear", "brown bear", "black bear"),
  "zebra": (),
  "giraffe": (),
  "backpack": ("knapsack", "rucksack", "back pack"),
  "umbrella": ("parasol",),
  "handbag": ("purse", "tote"),
  "tie": ("necktie", "bow tie"),
  "suitcase": ("luggage", "suit case"),
  "frisbee": ("flying disc",),
  "skis": ("ski",),
  "snowboard": (),
  "sports ball": ("ball", "football", "soccer ball", "basketball", "tennis ball", "volleyball"),
  "kite": (),
  "baseball bat": (),
  "baseball glove": ("baseball mitt", "mitt"),
  "skateboard": ("skate board",),
  "surfboard": ("surf board", "longboard", "bodyboard"),
  "tennis racket": ("racket", "racquet", "tennis racquet"),
  "bottle": (),
  "wine glass": ("wineglass",),
  "cup": ("mug", "teacup", "coffee cup"),
  "fork": (),
  "knife": (),
  "spoon": (),
  "bowl": (),
  "banana": (),
  "apple": (),
  "sandwich": ("sub", "hoagie", "burger", "hamburger", "panini"),
  "orange": ("tangerine",),
  "broccoli": (),
  "carrot": (),
  "hot dog": ("hotdog", "frankfurter"),
  "pizza": (),
  "donut": ("doughnut",),
  "cake": ("cupcake", "cheesecake"),
  "chair": ("stool", "armchair", "seat"),
  "couch": ("sofa", "loveseat"),
  "potted plant": ("houseplant", "house plant"),
  "bed": (),
  "dining table": ("table", "desk", "coffee table", "kitchen table"),
  "toilet": (),
  "tv": ("television", "monitor"),
  "laptop": ("laptop computer",),
  "mouse": ("computer mouse",),
  "remote": ("remote control",),
  "keyboard": (),
  "cell phone": ("cellphone", "phone", "smartphone", "mobile phone", "iphone"),
  "microwave": ("microwave oven",),
  "oven": ("stove", "stovetop"),
  "toaster": (),
  "sink": ("washbasin",),
  "refrigerator": ("fridge", "freezer"),
  "book": ("novel", "textbook"),
  "clock": (),
  "vase": (),
  "scissors": (),
  "teddy bear": ("teddy",),
  "hair drier": ("hair dryer", "hairdryer", "blow dryer"),
  "toothbrush": ("tooth brush",),
}  # fmt: skip


def parse_synonyms_file(path: str) -> dict[str, tuple[str, ...]]:
  """{class: synonyms} from a `synonyms_refine.txt`-style file: one class a line, the class
  name first, then its synonyms, comma-separated. Blank lines are skipped; a class listed
  twice or a word listed under two classes is an error naming the line."""
  table: dict[str, tuple[str, ...]] = {}
  class_of: dict[str, str] = {}
  with open(path) as f:
    for number, line in enumerate(f, start=1):
      words = [w.strip() for w in line.split(",") if w.strip()]
      if not words:
        continue
      name = words[0]
      if name in table:
        raise ChairDataError(f"{path}: line {number}: class {name!r} is listed twice")
      for word in words:
        if class_of.setdefault(word, name) != name:
          raise ChairDataError(
            f"{path}: line {number}: {word!r} is already a synonym of {class_of[word]!r}"
          )
      table[name] = tuple(dict.fromkeys(words[1:]))  # repeats within a line are harmless
  if not table:
    raise ChairDataError(f"{path}: no synonym lines")
  return table


# The protocol's special phrases: (phrase, the word it stands for).
_ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
            "giraffe", "animal", "cub")  # fmt: skip
_SPECIAL_PHRASES = (
  *((f"baby {a}", a) for a in _ANIMALS),
  *((f"adult {a}", a) for a in _ANIMALS),
  ("passenger jet", "jet"), ("passenger train", "train"),
  ("bow tie", "tie"), ("toilet seat", "toilet"), ("wine glas", "wine glass"),
  # Not objects, but their words must not count alone ("train track" is no train).
  ("home plate", "home plate"), ("train track", "train track"),
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class CocoVocabulary:
  """Every word for a COCO object, and the two-word phrases merged before single words."""

  class_of: Mapping[str, str]  # synonym (class names included) -> COCO class
  phrases: Mapping[str, str]  # two-word phrase -> the word that replaces it

  @classmethod
  def from_synonyms(cls, table: Mapping[str, Sequence[str]]) -> CocoVocabulary:
    class_of = {}
    for name, synonyms in table.items():
      for word in (name, *synonyms):
        class_of[word] = name
    phrases = {w: w for w in class_of if len(w.split(" ")) >= 2}
    phrases.update(_SPECIAL_PHRASES)
    return cls(class_of=class_of, phrases=phrases)


def load_vocabulary(synonyms_path: str | None = None) -> CocoVocabulary:
  """The vocabulary of a synonyms file, or of `DEFAULT_SYNONYMS` without one."""
  table = DEFAULT_SYNONYMS if synonyms_path is None else parse_synonyms_file(synonyms_path)
  return CocoVocabulary.from_synonyms(table)


# --------------------------------------------------------------------------------------------
# Tokens and singular forms.
# --------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"[^\W_]+(?:-[^\W_]+)*|\S")

_IRREGULAR_PLURALS = {
  "men": "man", "women": "woman", "children": "child", "mice": "mouse", "geese": "goose",
  "feet": "foot", "teeth": "tooth", "oxen": "ox", "dice": "die", "cacti": "cactus",
  "knives": "knife", "wives": "wife", "lives": "life", "leaves": "leaf", "loaves": "loaf",
  "halves": "half", "calves": "calf", "wolves": "wolf", "shelves": "shelf", "scarves": "scarf",
  "thieves": "thief", "hooves": "hoof", "selves": "self", "skis": "ski",
  "buses": "bus", "lenses": "lens", "tomatoes": "tomato", "potatoes": "potato",
  "mangoes": "mango", "buffaloes": "buffalo", "heroes": "hero", "volcanoes": "volcano",
  "cookies": "cookie", "movies": "movie", "hoagies": "hoagie", "brownies": "brownie",
}  # fmt: skip
# Words ending in -s that are not plurals, or plurals used as the singular.
_NOT_PLURAL = {"as", "was", "has", "its", "yes", "gas", "lens", "canvas", "atlas", "always",
               "perhaps", "towards", "sometimes", "news", "series", "species", "scissors",
               "pants", "jeans", "shorts", "clothes", "cattle", "people"}  # fmt: skip
# -men words that are not plurals of -man.
_NOT_MEN_PLURAL = {"amen", "omen", "semen", "ramen", "yemen", "stamen", "hymen", "acumen",
                   "abdomen", "regimen", "specimen", "albumen", "bitumen"}  # fmt: skip


def singularize(word: str) -> str:
  """The singular of a lower-case English noun ('puppies' -> 'puppy', 'women' -> 'woman');
  other words come back unchanged or harmlessly cut (a rule set, not a dictionary)."""
  if word in _IRREGULAR_PLURALS:
    return _IRREGULAR_PLURALS[word]
  if word.endswith("men") and len(word) > 3 and word not in _NOT_MEN_PLURAL:
    return word[:-3] + "man"  # policemen, gentlemen
  if (
    len(word) <= 2
    or word in _NOT_PLURAL
    or not word.endswith("s")
    or word.endswith(("ss", "us", "is"))
  ):
    return word
  if word.endswith("ies") and len(word) > 4:
    return word[:-3] + "y"  # ponies; 'ties' and 'pies' fall through to 'tie', 'pie'
  if word.endswith(("sses", "shes", "ches", "xes", "zzes")):
    return word[:-2]
  return word[:-1]


def tokenize(text: str) -> list[str]:
  """Lower-case word tokens, singularized; each punctuation mark is a token of its own."""
  return [singularize(t) for t in _TOKEN.findall(text.lower())]


# --------------------------------------------------------------------------------------------
# Objects in a text.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ObjectMention:
  word: str  # as matched, after singularizing and phrase merging ('puppy', 'hot dog')
  coco_class: str


def _merge_phrases(words: Sequence[str], vocabulary: CocoVocabulary) -> tuple[list[str], list[str]]:
  """(the words with each known two-word phrase replaced by its word, those replacements
  alone), scanning left to right."""
  merged, replacements, i = [], [], 0
  while i < len(words):
    pair = " ".join(words[i : i + 2])
    if i + 1 < len(words) and pair in vocabulary.phrases:
      merged.append(vocabulary.phrases[pair])
      replacements.append(vocabulary.phrases[pair])
      i += 2
    else:
      merged.append(words[i])
      i += 1
  return merged, replacements


def _to_mentions(words: Sequence[str], vocabulary: CocoVocabulary) -> list[ObjectMention]:
  # "the seat of the toilet" would otherwise count a chair.
  if "toilet" in words and "seat" in words:
    words = [w for w in words if w != "seat"]
  return [ObjectMention(w, vocabulary.class_of[w]) for w in words if w in vocabulary.class_of]


def mentioned_objects(text: str, vocabulary: CocoVocabulary) -> list[ObjectMention]:
  """Every COCO object mention in a text, in order, repeats included (rule-based)."""
  return _to_mentions(_merge_phrases(tokenize(text), vocabulary)[0], vocabulary)


def objects_from_phrases(phrases: Sequence[str], vocabulary: CocoVocabulary) -> list[ObjectMention]:
  """COCO mentions of object phrases listed by an LLM, each object once: a phrase maps by
  its two-word phrases, else as a whole, else by its last word."""
  words: list[str] = []
  for phrase in phrases:
    tokens = [t for t in tokenize(phrase) if t[0].isalnum()]
    found = _merge_phrases(tokens, vocabulary)[1]
    whole = " ".join(tokens)
    if found:
      words.extend(found)
    elif whole in vocabulary.class_of:
      words.append(whole)
    elif tokens:
      words.append(tokens[-1])
  return _to_mentions(list(dict.fromkeys(words)), vocabulary)


# --------------------------------------------------------------------------------------------
# Ground truth from COCO annotation files.
# --------------------------------------------------------------------------------------------


def _load_coco_json(path: str, fields: tuple[str, ...]) -> dict[str, Any]:
  try:
    with open(path) as f:
      data = json.load(f)
  except json.JSONDecodeError as error:
    raise ChairDataError(f"{path}: not JSON ({error.msg}, line {error.lineno})") from None
  if not isinstance(data, dict):
    raise ChairDataError(f"{path}: a COCO annotation file must be a JSON object")
  for field in fields:
    if not isinstance(data.get(field), list):
      raise ChairDataError(f"{path}: field {field!r} must be a list")
  return data


def _field(path: str, what: str, index: int, record: Any, field: str) -> Any:
  if not isinstance(record, dict) or field not in record:
    raise ChairDataError(f"{path}: {what} {index}: field {field!r} is missing")
  return record[field]


def load_coco_ground_truth(
  vocabulary: CocoVocabulary,
  instances_paths: Sequence[str],
  captions_paths: Sequence[str],
  image_ids: Collection[int] | None = None,
) -> dict[int, frozenset[str]]:
  """{image id: COCO classes in the image} for every image the files list (or only those in
  `image_ids`): the classes of its instance annotations (`instances_*.json`: images,
  annotations with image_id and category_id, categories with id and name) plus the classes
  named in its reference captions (`captions_*.json`: images, annotations with image_id and
  caption). Pass train and val files together to cover both splits, as RLAIF-V does."""
  wanted = None if image_ids is None else set(image_ids)
  objects: dict[int, set[str]] = {}

  def add_images(path: str, data: dict[str, Any]) -> None:
    for index, image in enumerate(data["images"]):
      image_id = _field(path, "image", index, image, "id")
      if wanted is None or image_id in wanted:
        objects.setdefault(image_id, set())

  for path in instances_paths:
    data = _load_coco_json(path, ("images", "annotations", "categories"))
    add_images(path, data)
    class_of_category = {}
    for index, category in enumerate(data["categories"]):
      name = _field(path, "category", index, category, "name")
      if name not in vocabulary.class_of:
        raise ChairDataError(f"{path}: category {index}: {name!r} is not in the synonym table")
      class_of_category[_field(path, "category", index, category, "id")] = vocabulary.class_of[name]
    for index, annotation in enumerate(data["annotations"]):
      image_id = _field(path, "annotation", index, annotation, "image_id")
      category_id = _field(path, "annotation", index, annotation, "category_id")
      if category_id not in class_of_category:
        raise ChairDataError(f"{path}: annotation {index}: unknown category_id {category_id!r}")
      if image_id in objects:
        objects[image_id].add(class_of_category[category_id])

  for path in captions_paths:
    data = _load_coco_json(path, ("images", "annotations"))
    add_images(path, data)
    for index, annotation in enumerate(data["annotations"]):
      image_id = _field(path, "annotation", index, annotation, "image_id")
      caption = _field(path, "annotation", index, annotation, "caption")
      if image_id in objects:
        objects[image_id].update(m.coco_class for m in mentioned_objects(caption, vocabulary))
  return {image_id: frozenset(classes) for image_id, classes in objects.items()}


# --------------------------------------------------------------------------------------------
# Metrics.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChairResult:
  """One response, scored."""

  key: Any  # the answer's question_id, else its image_id
  image_id: int
  text: str
  mentions: tuple[ObjectMention, ...]
  hallucinated: tuple[ObjectMention, ...]
  ground_truth: frozenset[str]


def score_response(
  key: Any,
  image_id: int,
  text: str,
  mentions: Sequence[ObjectMention],
  ground_truth: frozenset[str],
) -> ChairResult:
  """A response's mentions split into hallucinated ones (class not in the ground truth)."""
  hallucinated = tuple(m for m in mentions if m.coco_class not in ground_truth)
  return ChairResult(key, image_id, text, tuple(mentions), hallucinated, ground_truth)


def _ratio(numerator: float, denominator: float) -> float:
  return numerator / denominator if denominator else math.nan


def chair_metrics(results: Sequence[ChairResult]) -> dict[str, float]:
  """CHAIR_s, response-level hallucination rate, CHAIR_i and object recall (fractions, see
  the module docstring), with their counts and the mean answer length in words."""
  if not results:
    raise ChairDataError("no responses to score")
  hallucinated_responses = sum(bool(r.hallucinated) for r in results)
  responses_with_objects = sum(bool(r.mentions) for r in results)
  mentions = sum(len(r.mentions) for r in results)
  hallucinated_mentions = sum(len(r.hallucinated) for r in results)
  correct_classes = sum(len({m.coco_class for m in r.mentions} & r.ground_truth) for r in results)
  ground_truth_objects = sum(len(r.ground_truth) for r in results)
  return {
    "chair_s": hallucinated_responses / len(results),
    "response_hallucination_rate": _ratio(hallucinated_responses, responses_with_objects),
    "chair_i": _ratio(hallucinated_mentions, mentions),
    "object_recall": _ratio(correct_classes, ground_truth_objects),
    # RLAIF-V counts words as the pieces of the answer split on single spaces.
    "average_words": sum(len(r.text.strip().split(" ")) for r in results) / len(results),
    "responses": len(results),
    "responses_with_objects": responses_with_objects,
    "mentions": mentions,
    "hallucinated_mentions": hallucinated_mentions,
  }


# --------------------------------------------------------------------------------------------
# LLM-based object extraction.
# --------------------------------------------------------------------------------------------

DEFAULT_EXTRACTION_PROMPT = """\
Here is a question someone asked about a photo, and the answer they were given.

Question: {question}

Answer: {answer}

Take the answer at its word and list the physical objects it says can be seen in the photo.
Name only objects that the answer itself mentions. Give each object by its plain name, with no
colour, material, number or other attribute. Reply with a single line of object names
separated by commas, or with the word none if the answer names no object."""

# RLAIF-V gives answers this short no objects without asking the judge.
MAX_WORDS_WITHOUT_OBJECTS = 3


def load_extraction_prompt(path: str) -> str:
  """A prompt template from a file; it must contain '{answer}' (and may contain '{question}'),
  which are filled by plain replacement, so other braces in it are kept as they are."""
  with open(path) as f:
    template = f.read()
  if "{answer}" not in template:
    raise ChairDataError(f"{path}: an extraction prompt must contain the placeholder '{{answer}}'")
  return template


def parse_object_list(reply: str | None) -> list[str] | None:
  """Object names from a judge's reply, or None if it cannot be read. The reply is a
  comma-separated line ('none' for no object) or a JSON list of strings (the published
  prompt's format); the last non-empty line is read, a JSON list wherever it is."""
  if reply is None or not reply.strip():
    return None
  match = re.search(r"\[[^\[\]]*\]", reply)
  if match:
    try:
      items = json.loads(match.group(0))
    except json.JSONDecodeError:
      items = None
    if isinstance(items, list) and all(isinstance(x, str) for x in items):
      return [x.strip() for x in items if x.strip()]
  line = [x for x in reply.strip().splitlines() if x.strip()][-1].strip()
  if line.lower().rstrip(".") in ("none", "nothing"):
    return []
  return [name.strip(" \"'.`") for name in line.split(",") if name.strip(" \"'.`")]


def extract_objects_with_judge(
  questions_and_answers: Sequence[tuple[str, str]],
  judge: Judge,
  *,
  prompt_template: str = DEFAULT_EXTRACTION_PROMPT,
  max_tokens: int = 256,
) -> list[list[str] | None]:
  """Object phrases the judge lists for each (question, answer); None where its reply could
  not be read. Answers of at most 3 words get [] without a request, as published."""
  out: list[list[str] | None] = [[] for _ in questions_and_answers]
  asked, requests = [], []
  for index, (question, answer) in enumerate(questions_and_answers):
    if len(answer.strip().split()) <= MAX_WORDS_WITHOUT_OBJECTS:
      continue
    prompt = prompt_template.replace("{question}", question).replace("{answer}", answer)
    asked.append(index)
    requests.append(JudgeRequest(prompt, max_tokens=max_tokens, request_id=f"chair-{index}"))
  replies: list[JudgeReply] = judge.complete(requests) if requests else []
  if len(replies) != len(requests):
    raise RuntimeError(f"judge {judge.name!r} returned {len(replies)} replies for {len(requests)}")
  for index, reply in zip(asked, replies):
    out[index] = parse_object_list(reply.text)
  return out


# --------------------------------------------------------------------------------------------
# Answer files and the whole benchmark.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChairAnswer:
  key: Any
  image_id: int
  question: str
  text: str


_IMAGE_NUMBER = re.compile(r"(\d+)\.(?:jpe?g|png)$", re.IGNORECASE)


def _image_id(value: Any, where: str, field: str) -> int:
  """A COCO image id from an int, a numeric string or a file name 'COCO_val2014_000000123.jpg'."""
  if isinstance(value, int) and not isinstance(value, bool):
    return value
  if isinstance(value, str):
    if value.strip().isdigit():
      return int(value)
    match = _IMAGE_NUMBER.search(value)
    if match:
      return int(match.group(1))
  raise ChairDataError(f"{where}, field {field!r}: {value!r} is not a COCO image id or file name")


def _question_images(questions_path: str) -> dict[Any, int]:
  out = {}
  for number, record in enumerate(read_jsonl(questions_path), start=1):
    where = f"{questions_path}: line {number}"
    if "question_id" not in record:
      raise ChairDataError(f"{where}: field 'question_id' is missing")
    field = "image_id" if "image_id" in record else "image"
    if field not in record:
      raise ChairDataError(f"{where}: needs field 'image_id' or 'image'")
    out[record["question_id"]] = _image_id(record[field], where, field)
  return out


def read_chair_answers(answers_path: str, questions_path: str | None = None) -> list[ChairAnswer]:
  """Answers from JSON Lines. Text: 'text', else 'answer' ('Assistant:' removed, stripped, as
  RLAIF-V does); question: 'prompt', else 'question', else ''; image: 'image_id', else an
  'image' file name, else the `questions_path` record with the same 'question_id'. Answers
  are keyed by question_id where they have one, else by image_id; a repeated key is an error."""
  question_images = _question_images(questions_path) if questions_path else {}
  answers: list[ChairAnswer] = []
  seen: dict[Any, int] = {}
  for number, record in enumerate(read_jsonl(answers_path), start=1):
    where = f"{answers_path}: line {number}"
    text_field = "text" if "text" in record else "answer"
    if not isinstance(record.get(text_field), str):
      raise ChairDataError(f"{where}: needs a string field 'text' or 'answer'")
    if "image_id" in record:
      image_id = _image_id(record["image_id"], where, "image_id")
    elif "image" in record:
      image_id = _image_id(record["image"], where, "image")
    elif record.get("question_id") in question_images:
      image_id = question_images[record["question_id"]]
    else:
      raise ChairDataError(
        f"{where}: no image: needs 'image_id' or 'image', or a 'question_id' found in "
        f"{questions_path or 'a questions file (none given)'}"
      )
    key = record.get("question_id", image_id)
    if key in seen:
      raise ChairDataError(f"{where}: id {key!r} repeats line {seen[key]}")
    seen[key] = number
    question = record.get("prompt", record.get("question", ""))
    text = record[text_field].replace("Assistant:", "").strip()
    answers.append(ChairAnswer(key, image_id, str(question), text))
  if not answers:
    raise ChairDataError(f"{answers_path}: no answers")
  return answers


def score_chair_files(
  answers_path: str,
  instances_paths: Sequence[str],
  captions_paths: Sequence[str],
  *,
  synonyms_path: str | None = None,
  questions_path: str | None = None,
  judge: Judge | None = None,
  extraction_prompt_path: str | None = None,
  expected_images: int | None = None,
) -> tuple[dict[str, float], list[ChairResult]]:
  """(metrics, one result per scored answer) of an answers file against COCO annotations.
  Objects are found by rule, or by `judge` when one is given (answers whose reply cannot be
  read are left out and counted in metrics['invalid']). `expected_images` checks the number
  of distinct images (Object HalBench has 300)."""
  vocabulary = load_vocabulary(synonyms_path)
  answers = read_chair_answers(answers_path, questions_path)
  image_ids = {a.image_id for a in answers}
  if expected_images is not None and len(image_ids) != expected_images:
    raise ChairDataError(
      f"{answers_path}: answers cover {len(image_ids)} images, expected {expected_images}"
    )
  ground_truth = load_coco_ground_truth(vocabulary, instances_paths, captions_paths, image_ids)
  for answer in answers:
    if answer.image_id not in ground_truth:
      raise ChairDataError(
        f"{answers_path}: answer {answer.key!r}: image {answer.image_id} is in no annotation file"
      )
  if judge is None:
    mentions: list[list[ObjectMention] | None] = [
      mentioned_objects(a.text, vocabulary) for a in answers
    ]
  else:
    template = (
      load_extraction_prompt(extraction_prompt_path)
      if extraction_prompt_path
      else DEFAULT_EXTRACTION_PROMPT
    )
    phrases = extract_objects_with_judge(
      [(a.question, a.text) for a in answers], judge, prompt_template=template
    )
    mentions = [None if p is None else objects_from_phrases(p, vocabulary) for p in phrases]
  results = [
    score_response(a.key, a.image_id, a.text, found, ground_truth[a.image_id])
    for a, found in zip(answers, mentions)
    if found is not None
  ]
  metrics = chair_metrics(results)
  metrics["invalid"] = len(answers) - len(results)
  return metrics, results
