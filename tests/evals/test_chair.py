"""CHAIR / Object HalBench: the singularizer, object extraction (synonyms, plurals, two-word
phrases, the protocol's special cases), ground truth from tiny COCO files, metrics computed
by hand, LLM extraction through a FunctionJudge, the published synonyms file, bad input."""

from __future__ import annotations

import json
import math

import pytest

from lmm_align.evals import chair
from lmm_align.judges.base import FunctionJudge

VOCAB = chair.load_vocabulary()


def _classes(text: str, vocabulary: chair.CocoVocabulary = VOCAB) -> list[str]:
  return [m.coco_class for m in chair.mentioned_objects(text, vocabulary)]


@pytest.mark.parametrize(
  "plural, singular",
  [("dogs", "dog"), ("puppies", "puppy"), ("ponies", "pony"), ("ties", "tie"), ("pies", "pie"),
   ("glasses", "glass"), ("benches", "bench"), ("sandwiches", "sandwich"), ("boxes", "box"),
   ("toothbrushes", "toothbrush"), ("buses", "bus"), ("knives", "knife"), ("calves", "calf"),
   ("stoves", "stove"), ("gloves", "glove"), ("men", "man"), ("women", "woman"),
   ("policemen", "policeman"), ("children", "child"), ("mice", "mouse"), ("geese", "goose"),
   ("oxen", "ox"), ("skis", "ski"), ("vases", "vase"), ("canoes", "canoe"), ("tvs", "tv"),
   # not plurals, or plural-only
   ("bus", "bus"), ("glass", "glass"), ("tennis", "tennis"), ("scissors", "scissors"),
   ("sheep", "sheep"), ("people", "people"), ("specimen", "specimen"), ("is", "is"),
   ("was", "was"), ("dog", "dog")],
)  # fmt: skip
def test_singularize(plural, singular):
  assert chair.singularize(plural) == singular


def test_tokenize_keeps_punctuation_so_no_phrase_spans_it():
  assert chair.tokenize("Hot dogs, a cat's toy.") == [
    "hot",
    "dog",
    ",",
    "a",
    "cat",
    "'",
    "s",
    "toy",
    ".",
  ]
  assert _classes("a hot dog") == ["hot dog"]
  assert _classes("it was hot, dog days") == ["dog"]


@pytest.mark.parametrize(
  "text, expected",
  [
    ("Two hot dogs and a dog.", ["hot dog", "dog"]),  # the phrase wins; 'dog' alone still counts
    ("A teddy bear and a bear on the dining table.", ["teddy bear", "bear", "dining table"]),
    ("Puppies, kittens and a sofa.", ["dog", "cat", "couch"]),  # synonyms and plurals
    ("Women ride motorbikes past traffic lights.", ["person", "motorcycle", "traffic light"]),
    ("A dog, another dog and a dog.", ["dog", "dog", "dog"]),  # every mention counts
    ("A baby elephant and an adult giraffe.", ["elephant", "giraffe"]),
    ("A passenger jet over a passenger train.", ["airplane", "train"]),
    ("A man in a bow tie.", ["person", "tie"]),
    ("The seat of the toilet is up.", ["toilet"]),  # no chair when a toilet is there
    ("A toilet seat.", ["toilet"]),
    ("A chair seat.", ["chair", "chair"]),
    ("The train track and home plate.", []),  # these phrases swallow 'train' and 'plate'
    ("Two wine glasses and a cup.", ["wine glass", "cup"]),
    ("A sunny beach.", []),
  ],
)
def test_mentioned_objects(text, expected):
  assert _classes(text) == expected


def test_default_table_covers_the_80_coco_classes_once():
  assert len(chair.DEFAULT_SYNONYMS) == 80
  words = [w for name, syn in chair.DEFAULT_SYNONYMS.items() for w in (name, *syn)]
  assert len(words) == len(set(words)), "a word is listed under two classes"
  assert all(len(w.split(" ")) <= 2 for w in words), "only two-word phrases are ever merged"


def test_published_synonyms_file(shared_reference_data):
  path = shared_reference_data / "rlaifv_eval" / "synonyms_refine.txt"
  table = chair.parse_synonyms_file(str(path))
  assert list(table) == list(chair.DEFAULT_SYNONYMS)  # the same 80 classes, same order
  assert table["dog"][:2] == ("puppy", "beagle")
  vocabulary = chair.load_vocabulary(str(path))
  assert _classes("A puppy, a bow and two hot dogs near a couch.", vocabulary) == [
    "dog", "tie", "hot dog", "couch"]  # fmt: skip
  assert _classes("The toilet seat and the seat of the toilet.", vocabulary) == ["toilet", "toilet"]
  # The file writes 'iPhone' with a capital; text is lower-cased, so it never matches.
  assert _classes("an iphone", vocabulary) == []


@pytest.mark.parametrize(
  "lines, message",
  [("dog, puppy\ncat, puppy\n", "line 2: 'puppy' is already a synonym of 'dog'"),
   ("dog, puppy\ndog, hound\n", "line 2: class 'dog' is listed twice"),
   ("\n\n", "no synonym lines")],
)  # fmt: skip
def test_bad_synonyms_file(tmp_path, lines, message):
  path = tmp_path / "synonyms.txt"
  path.write_text(lines)
  with pytest.raises(chair.ChairDataError, match=message):
    chair.parse_synonyms_file(str(path))


# --------------------------------------------------------------------------------------------
# A tiny COCO: four images, instances and captions, and answers with known hallucinations.
# --------------------------------------------------------------------------------------------

CATEGORIES = {1: "person", 17: "cat", 18: "dog", 34: "frisbee", 58: "hot dog", 59: "pizza",
              67: "dining table"}  # fmt: skip
INSTANCES = [(1, 18), (1, 1), (1, 1), (2, 59), (2, 67), (3, 58), (4, 17), (99, 18)]
CAPTIONS = [(1, "A man with a frisbee on the grass."),
            (2, "A pizza on a table next to a cup of coffee."),
            (3, "Two hot dogs with mustard.")]  # fmt: skip
GROUND_TRUTH = {1: {"dog", "person", "frisbee"}, 2: {"pizza", "dining table", "cup"},
                3: {"hot dog"}, 4: {"cat"}}  # fmt: skip
ANSWERS = [
  (1, "A puppy catches a frisbee while two men and a cat watch."),  # cat hallucinated
  (2, "Pizzas and a knife sit on the dining table, and another knife lies by the table."),
  (3, "Hot dogs on a plate."),  # 'hot dog' is no dog
  (4, "It is a sunny day."),  # no COCO object
]
# By hand: mentions 4 + 5 + 1 + 0, hallucinated 1 + 2 + 0 + 0 (cat; knife twice); correct
# classes 3 + 2 + 1 + 0 of ground truth 3 + 3 + 1 + 1; words 12 + 16 + 5 + 5.
EXPECTED = {"chair_s": 2 / 4, "response_hallucination_rate": 2 / 3, "chair_i": 3 / 10,
            "object_recall": 6 / 8, "average_words": 38 / 4, "responses": 4,
            "responses_with_objects": 3, "mentions": 10, "hallucinated_mentions": 3}  # fmt: skip


def _write_json(path, data) -> str:
  path.write_text(json.dumps(data))
  return str(path)


def _write_jsonl(path, records) -> str:
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


@pytest.fixture
def coco(tmp_path):
  images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in (1, 2, 3, 4, 99)]
  instances = {
    "images": images,
    "annotations": [
      {"id": n, "image_id": i, "category_id": c} for n, (i, c) in enumerate(INSTANCES)
    ],
    "categories": [{"id": k, "name": v} for k, v in CATEGORIES.items()],
  }
  captions = {
    "images": images,
    "annotations": [{"id": n, "image_id": i, "caption": c} for n, (i, c) in enumerate(CAPTIONS)],
  }
  return (_write_json(tmp_path / "instances_val2014.json", instances),
          _write_json(tmp_path / "captions_val2014.json", captions))  # fmt: skip


def test_ground_truth_from_instances_and_captions(coco):
  instances, captions = coco
  got = chair.load_coco_ground_truth(VOCAB, [instances], [captions], image_ids={1, 2, 3, 4})
  assert got == GROUND_TRUTH
  assert set(chair.load_coco_ground_truth(VOCAB, [instances], [])) == {1, 2, 3, 4, 99}


def test_metrics_by_hand_rlaifv_layout(tmp_path, coco):
  answers = _write_jsonl(
    tmp_path / "answers.jsonl",
    [
      {"image_id": i, "question": "Describe the image.", "text": f"Assistant: {t}"}
      for i, t in ANSWERS
    ],
  )
  metrics, results = chair.score_chair_files(answers, [coco[0]], [coco[1]], expected_images=4)
  assert metrics == pytest.approx(EXPECTED | {"invalid": 0})
  first = results[0]
  assert first.text == ANSWERS[0][1]  # 'Assistant:' stripped
  assert [(m.word, m.coco_class) for m in first.hallucinated] == [("cat", "cat")]
  assert [m.coco_class for m in results[2].mentions] == ["hot dog"]


def test_llava_layout_with_a_questions_file(tmp_path, coco):
  questions = _write_jsonl(
    tmp_path / "questions.jsonl",
    [{"question_id": 10 + n, "image": f"COCO_val2014_{i:012d}.jpg", "text": "Describe."}
     for n, (i, _) in enumerate(ANSWERS)],
  )  # fmt: skip
  answers = _write_jsonl(
    tmp_path / "answers.jsonl",
    [{"question_id": 10 + n, "prompt": "Describe.", "text": t} for n, (_, t) in enumerate(ANSWERS)],
  )
  metrics, results = chair.score_chair_files(
    answers, [coco[0]], [coco[1]], questions_path=questions
  )
  assert metrics == pytest.approx(EXPECTED | {"invalid": 0})
  assert [r.key for r in results] == [10, 11, 12, 13]


def test_ratios_with_no_mentions_are_nan():
  result = chair.score_response(0, 1, "Nothing here.", [], frozenset())
  metrics = chair.chair_metrics([result])
  assert metrics["chair_s"] == 0.0
  assert all(
    math.isnan(metrics[k]) for k in ("response_hallucination_rate", "chair_i", "object_recall")
  )


# --------------------------------------------------------------------------------------------
# LLM extraction.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "reply, expected",
  [("dog, frisbee, man", ["dog", "frisbee", "man"]),
   ("Here they are:\n\ndog, red car.", ["dog", "red car"]),
   ("none", []), ("None.", []),
   ('```json\n["dog", "cat"]\n```', ["dog", "cat"]),
   ('Objects found:\n["wine glass"]', ["wine glass"]),
   ("", None), ("  \n", None), (None, None)],
)  # fmt: skip
def test_parse_object_list(reply, expected):
  assert chair.parse_object_list(reply) == expected


def test_objects_from_phrases_dedupes_and_maps_heads():
  got = chair.objects_from_phrases(
    [
      "puppies",
      "wooden dining table",
      "red sports car",
      "dog",
      "plate",
      "home plate",
      "cell phone",
    ],
    VOCAB,
  )
  assert [(m.word, m.coco_class) for m in got] == [
    ("puppy", "dog"), ("dining table", "dining table"), ("car", "car"), ("dog", "dog"),
    ("cell phone", "cell phone")]  # fmt: skip


def test_llm_extraction_with_a_function_judge(tmp_path, coco):
  replies = {
    ANSWERS[0][1]: "puppy, frisbee, men, cat",
    ANSWERS[1][1]: '```json\n["pizzas", "knife", "knife", "wooden dining table"]\n```',
    ANSWERS[2][1]: "hot dogs, plate",
    "A dog jumps over a fence.": None,  # the backend failed: counted, left out
  }
  seen = []

  def reply(request):
    seen.append(request)
    answer = next(a for a in replies if a in request.prompt)
    assert "Describe the image." in request.prompt
    return replies[answer]

  rows = [*ANSWERS[:3], (4, "A sunny day."), (1, "A dog jumps over a fence.")]
  answers = _write_jsonl(
    tmp_path / "answers.jsonl",
    [{"question_id": n, "image_id": i, "prompt": "Describe the image.", "text": t}
     for n, (i, t) in enumerate(rows)],
  )  # fmt: skip
  metrics, results = chair.score_chair_files(
    answers, [coco[0]], [coco[1]], judge=FunctionJudge(reply)
  )
  assert len(seen) == 4  # the 3-word answer gets no request
  # By hand: mentions 4 + 3 + 1 + 0 (knife once), hallucinated cat and knife.
  assert metrics == pytest.approx(
    {"chair_s": 2 / 4, "response_hallucination_rate": 2 / 3, "chair_i": 2 / 8,
     "object_recall": 6 / 8, "average_words": (12 + 16 + 5 + 3) / 4, "responses": 4,
     "responses_with_objects": 3, "mentions": 8, "hallucinated_mentions": 2, "invalid": 1}
  )  # fmt: skip
  assert [r.key for r in results] == [0, 1, 2, 3]


def test_extraction_prompt_file(tmp_path):
  path = tmp_path / "prompt.txt"
  path.write_text('List objects as ["a", "b"].\nQ: {question}\nA: {answer}\n')
  template = chair.load_extraction_prompt(str(path))
  prompts = []
  chair.extract_objects_with_judge(
    [("What is it?", "A big brown dog runs.")],
    FunctionJudge(lambda r: prompts.append(r.prompt) or "[]"),
    prompt_template=template,
  )
  assert prompts == ['List objects as ["a", "b"].\nQ: What is it?\nA: A big brown dog runs.\n']
  path.write_text("no placeholder")
  with pytest.raises(chair.ChairDataError, match="prompt.txt.*'{answer}'"):
    chair.load_extraction_prompt(str(path))


# --------------------------------------------------------------------------------------------
# Bad input.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "records, message",
  [([{"image_id": 1, "text": "a"}, {"image_id": 1, "text": "b"}], "line 2: id 1 repeats line 1"),
   ([{"question_id": 5, "image_id": 1, "text": "a"}, {"question_id": 5, "image_id": 2, "text": "b"}],
    "line 2: id 5 repeats line 1"),
   ([{"image_id": 1}], "line 1: needs a string field 'text' or 'answer'"),
   ([{"question_id": 3, "text": "a"}], "line 1: no image"),
   ([{"image": "photo.gif", "text": "a"}], "line 1, field 'image'"),
   ([{"image_id": 7, "text": "a"}], "answer 7: image 7 is in no annotation file")],
)  # fmt: skip
def test_bad_answers(tmp_path, coco, records, message):
  answers = _write_jsonl(tmp_path / "answers.jsonl", records)
  with pytest.raises(chair.ChairDataError, match=message):
    chair.score_chair_files(answers, [coco[0]], [coco[1]])


def test_wrong_number_of_images(tmp_path, coco):
  answers = _write_jsonl(tmp_path / "answers.jsonl", [{"image_id": 1, "text": "a"}])
  with pytest.raises(chair.ChairDataError, match="cover 1 images, expected 300"):
    chair.score_chair_files(answers, [coco[0]], [coco[1]], expected_images=300)


@pytest.mark.parametrize(
  "data, message",
  [({"images": [], "annotations": [{"image_id": 1, "category_id": 3}], "categories": []},
    "annotation 0: unknown category_id 3"),
   ({"images": [], "annotations": [{"image_id": 1}], "categories": [{"id": 1, "name": "person"}]},
    "annotation 0: field 'category_id' is missing"),
   ({"images": [], "annotations": [], "categories": [{"id": 1, "name": "unicorn"}]},
    "category 0: 'unicorn' is not in the synonym table"),
   ({"images": [], "annotations": []}, "field 'categories' must be a list")],
)  # fmt: skip
def test_bad_instances_file(tmp_path, data, message):
  path = _write_json(tmp_path / "instances.json", data)
  with pytest.raises(chair.ChairDataError, match=f"instances.json: {message}"):
    chair.load_coco_ground_truth(VOCAB, [path], [])
