"""The models the iterative loop's AI feedback comes from, in the shapes world: the records
that train the labeler and the critic, and their accuracy against the scene.

  labeler  a small LLaVA answering yes/no questions about a scene (RLAIF-V's labeler):
           `labeler_training_records` picks among existence questions (`labeler_records`:
           "exist", "hard", "binding", "claims"), the rule questions of a policy's own claims
           (`policy_claim_records`) and shape near misses (`shape_near_miss_records`);
           `labeler_report` measures it, and the SFT policy asked the same way, on held-out
           sets of each kind.
  critic   a pairwise judge (LLaVA-Critic): `critic_records` asks `make_critic_records` pairs
           with a compact prompt (`COMPACT_CRITIC_PROMPT`); `critic_report` measures its
           verdicts on held-out pairs, one order and both (MT-Bench's swap rule).

The scene is the ground truth throughout (`scene_claim_truth`). experiments/
shapes_iterative_dpo.py trains both models and runs the loop with them.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from lmm_align.feedback import claims, critic
from lmm_align.judges import agreement
from lmm_align.judges.base import JudgeRequest
from lmm_align.judges.verdicts import parse_pairwise
from lmm_align.shapes import metrics as shapes_metrics
from lmm_align.shapes import world as shapes
from lmm_align.shapes.critic_records import make_critic_records
from lmm_align.shapes.evaluation import DESCRIBE_QUESTION, answer_questions
from lmm_align.trainers import iterative

# Seeds of the data each model draws, apart from SFT (0), ground-truth DPO (1), the loop's
# prompts (2024) and evaluation (12345).
LABELER_DATA_SEED, LABELER_EVAL_SEED = 31, 32
CRITIC_DATA_SEED, CRITIC_EVAL_SEED = 41, 42
LABELER_DATA = ("hard", "exist", "binding", "policy_claims", "claims")
# The critic's pairwise prompt (our wording). critic.pairwise_prompt's default instruction is
# about 160 tokens of English the shapes tokenizer splits into pieces; this one keeps critic
# training and judging sequences near 300 tokens instead of 500 on CPU.
COMPACT_CRITIC_PROMPT = (
  "Which response describes the image more accurately?\n"
  "Question: [{question}]\nThe first response: [{first}]\nThe second response: [{second}]"
)

# Yes/no items: (questions, images, truths), one entry per question.
YesNoItems = tuple[list[str], list, list[bool]]


# --------------------------------------------------------------------------------------------
# The labeler's training records.
# --------------------------------------------------------------------------------------------


def _negative(scene, scenes, rng, world, binding_share: float) -> tuple[str, str]:
  """An absent (colour, shape). With chance `binding_share` (when the scene has one) a binding
  negative: the colour of one present object with the shape of another (a common false claim
  of the SFT policy, which a labeler that sees colours and shapes but not which goes with
  which accepts); otherwise, with equal chance, another scene's object (as popular as real
  objects), or a present object with its shape or its colour changed (near misses)."""
  present = scene.pairs
  binding = sorted({(c, s) for c, _ in present for _, s in present} - present)
  if binding_share and binding and rng.random() < binding_share:
    return binding[int(rng.integers(len(binding)))]
  kind = int(rng.integers(3))
  for _ in range(50):
    if kind == 0:
      other = scenes[int(rng.integers(len(scenes)))]
      pair = other.pairs and sorted(other.pairs)[int(rng.integers(len(other.pairs)))]
    else:
      colour, shape = sorted(present)[int(rng.integers(len(present)))]
      if kind == 1:
        shape = world.shapes[int(rng.integers(len(world.shapes)))]
      else:
        colour = world.colours[int(rng.integers(len(world.colours)))]
      pair = (colour, shape)
    if pair and pair not in present:
      return pair
  absent = [(c, s) for s in world.shapes for c in world.colours if (c, s) not in present]
  return absent[int(rng.integers(len(absent)))]


def hard_existence_records(
  n: int, world: shapes.ShapesWorldConfig, seed: int, binding_share: float = 0.0
) -> list[dict[str, Any]]:
  """Existence questions in the exist task's wording, half "yes", whose "no" objects are
  drawn like the hallucinations a policy makes rather than uniformly over absent pairs.

  The exist task's negatives are uniform over the absent (colour, shape) pairs, so they are
  mostly unpopular objects: a labeler trained on them learns "popular object -> yes" and
  accepts the popular objects a policy hallucinates (measured: it rejected 17% of the SFT
  policy's false claims). Here a negative is drawn by `_negative`: popular objects and near
  misses, and a share `binding_share` of binding negatives.
  """
  scenes = shapes.make_scenes(n, world, seed=seed)
  rng = np.random.default_rng([seed, 1])
  records = []
  for scene in scenes:
    present = sorted(scene.pairs)
    is_yes = bool(rng.random() < 0.5)
    colour, shape = (
      present[int(rng.integers(len(present)))]
      if is_yes
      else _negative(scene, scenes, rng, world, binding_share)
    )
    name = f"{colour} {shape}"
    question, answer = shapes.existence_exchange(name, is_yes, rng)
    records.append({
      "id": f"{scene.id}-exist",
      "image": shapes.render(scene, world.image_size),
      "conversations": [
        {"from": "human", "value": f"<image>\n{question}"},
        {"from": "gpt", "value": answer},
      ],
      "metadata": {"scene": scene.to_dict(), "answer": "yes" if is_yes else "no",
                   "object": [colour, shape]},
    })  # fmt: skip
  return records


def scene_claim_truth(claim: str, scene: shapes.Scene) -> tuple[str, bool | None]:
  """(kind, truth) of a claim, as the metrics read it. Kind "objects": it names objects, and
  is true when every object it names is there (colour and shape; size and place are not
  checked). Kind "picture": it names none, and is true when the background colour and the
  number of shapes it states are the scene's; truth None when it states neither (no ground
  truth)."""
  counts = shapes_metrics.response_hallucination_counts(claim, scene)
  if counts["mentions"]:
    return "objects", counts["hallucinated_mentions"] == 0
  text = claim.lower()
  checks = []
  backgrounds = "|".join(shapes.BACKGROUNDS)
  if m := re.search(rf"\b({backgrounds})\s+(image|background|picture)\b", text):
    checks.append(m.group(1) == scene.background)
  numbers = "|".join(shapes.NUMBER_WORDS[1:])
  if m := re.search(rf"\b({numbers})\s+(shape|shapes|object|objects)\b", text):
    checks.append(shapes.NUMBER_WORDS.index(m.group(1)) == len(scene.objects))
  return "picture", (all(checks) if checks else None)


def _false_scene_question(question: str, scene, world, rng) -> str | None:
  """The question with the scene's background or number word swapped for another (a false
  picture claim), or None when it states neither."""
  bg = re.search(rf"\b{scene.background}\b(?=\s+(image|background|picture))", question)
  n_word = shapes.NUMBER_WORDS[len(scene.objects)]
  count = re.search(rf"\b{n_word}\b(?=\s+(shape|object))", question, re.IGNORECASE)
  options = []
  if bg:
    other = [b for b in world.backgrounds if b != scene.background]
    options.append((bg, other[int(rng.integers(len(other)))]))
  if count and n_word != "one":  # "one shape" <-> "two shapes" would need the noun changed too
    numbers = shapes.NUMBER_WORDS[max(2, world.min_objects) : world.max_objects + 1]
    other = [w for w in numbers if w != n_word]
    if other:
      options.append((count, other[int(rng.integers(len(other)))]))
  if not options:
    return None
  match, word = options[int(rng.integers(len(options)))]
  if match.group(0)[0].isupper():
    word = word.capitalize()
  return question[: match.start()] + word + question[match.end() :]


def _short_answer_record(
  record_id: str, image, question: str, is_yes: bool, metadata: dict[str, Any] | None = None
) -> dict[str, Any]:
  """A labeler record: the question in LLaVA's short-answer form, answered Yes or No."""
  record = {
    "id": record_id,
    "image": image,
    "conversations": [
      {"from": "human", "value": f"<image>\n{question}\n{shapes.SHORT_ANSWER_PROMPT}"},
      {"from": "gpt", "value": "Yes" if is_yes else "No"},
    ],
  }
  return record if metadata is None else {**record, "metadata": metadata}


def claim_records(
  n: int, world: shapes.ShapesWorldConfig, seed: int, picture_share: float | None = None
) -> list[dict[str, Any]]:
  """About `n` records whose questions are what the loop asks: the rule questions of the claims
  in SFT-style captions of fresh scenes (half with an injected hallucination), answered by the
  scene (`scene_claim_truth`); each true claim about the picture also gets a false variant
  (another background or count), since captions state the picture right. Balanced yes/no
  within object claims and within picture claims (metadata "kind": objects / picture): with
  one pool, picture questions came out three quarters "no" and a labeler trained on them said
  "no" to every picture claim of the policy. The two kinds come in the captions' proportion
  (about 45% picture), or with `picture_share` of the records about the picture: at the
  captions' proportion in a mix with as many existence records, labelers stayed at chance on
  held-out background questions, which 150 steps on those alone teach."""
  caption_world = dataclasses.replace(world, task_mix=(("caption", 1.0),), hallucination_rate=0.5)
  rng = np.random.default_rng([seed, 7])
  pools = {"objects": ([], []), "picture": ([], [])}  # (yes, no) per kind of claim
  captions = max(1, n // 2) if picture_share is None else max(1, n)
  for r in shapes.make_sft_records(captions, caption_world, seed=[seed, 8]):
    scene = shapes.Scene.from_dict(r["metadata"]["scene"])
    for claim in claims.split_claims_rules(r["conversations"][1]["value"]):
      kind, truth = scene_claim_truth(claim, scene)
      if truth is None:
        continue
      yes, no = pools[kind]
      question = claims.claim_to_question(claim)
      (yes if truth else no).append((question, r["image"]))
      if truth and (false := _false_scene_question(question, scene, world, rng)):
        no.append((false, r["image"]))
  balanced = {kind: min(len(yes), len(no)) for kind, (yes, no) in pools.items()}
  if picture_share is None:
    scale = min(1.0, (n // 2) / max(1, sum(balanced.values())))
    per_kind = {kind: int(b * scale) for kind, b in balanced.items()}
  else:
    picture = int(round(n / 2 * picture_share))
    wanted = {"picture": picture, "objects": n // 2 - picture}
    per_kind = {kind: min(wanted[kind], balanced[kind]) for kind in pools}
  picked = []
  for kind, (yes, no) in pools.items():
    k = per_kind[kind]
    picked += [(*yes[i], "Yes", kind) for i in rng.permutation(len(yes))[:k]]
    picked += [(*no[i], "No", kind) for i in rng.permutation(len(no))[:k]]
  return [
    _short_answer_record(
      f"claim-{i}", image, question, answer == "Yes", {"kind": kind, "answer": answer.lower()}
    )
    for i, (question, image, answer, kind) in enumerate(picked)
  ]


def shape_near_miss_records(
  n: int, world: shapes.ShapesWorldConfig, seed: int
) -> list[dict[str, Any]]:
  """`n` yes/no questions about one object of a fresh scene each: half about the object as it
  is, half with its shape swapped for one its colour does not come in there (a present blue
  star asked as a blue triangle), half in the existence form and half with its size and place,
  as the policy's claims word it. Most of the SFT policy's false claims are such swaps (93 of
  118 name an absent shape in a present colour), and a labeler trained on the other kinds of
  records, on a tower that reads 99.8% of shapes, still said yes to 64% of circles asked as
  squares and 81% of stars asked as triangles: those records rarely ask about a present
  object's shape."""
  rng = np.random.default_rng([seed, 9])
  records = []
  for scene in shapes.make_scenes(n, world, seed=[seed, 9]):
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    is_yes = bool(rng.random() < 0.5)
    shape = obj.shape
    if not is_yes:
      others = [s for s in world.shapes if (obj.colour, s) not in scene.pairs]
      shape = others[int(rng.integers(len(others)))]
    if rng.random() < 0.5:
      question = f"Is there a {obj.colour} {shape} in the image?"
    else:
      place = shapes.POSITIONS[obj.row][obj.col]
      question = f"Is there a {obj.size} {obj.colour} {shape} in the {place}?"
    metadata = {"scene": scene.to_dict(), "answer": "yes" if is_yes else "no",
                "object": [obj.colour, shape], "shown": [obj.colour, obj.shape]}  # fmt: skip
    image = shapes.render(scene, world.image_size)
    records.append(_short_answer_record(f"near-{scene.id}", image, question, is_yes, metadata))
  return records


def labeler_records(
  kind: str, n: int, world: shapes.ShapesWorldConfig, seed: int, picture_share: float | None = None
) -> list[dict[str, Any]]:
  """`n` labeler records: "exist" (task_mix exist), "hard" (`hard_existence_records`),
  "binding" (the same with half of the negatives binding negatives), or "claims"
  (`claim_records` with `picture_share`, the rest binding)."""
  if kind == "claims":
    records = claim_records(n // 2, world, seed, picture_share)
    return records + hard_existence_records(n - len(records), world, seed, binding_share=0.5)
  if kind == "exist":
    exist_world = dataclasses.replace(world, task_mix=(("exist", 1.0),))
    return shapes.make_sft_records(n, exist_world, seed=seed)
  return hard_existence_records(n, world, seed, binding_share=0.5 if kind == "binding" else 0.0)


def policy_claim_records(
  n: int,
  world: shapes.ShapesWorldConfig,
  seed: int,
  policy_folders: Sequence[str],
  template: str,
  picture_share: float = 0.0,
) -> list[dict[str, Any]]:
  """About `n` labeler records: half are the rule questions of the claims in the policies' own
  greedy descriptions of `n` fresh scenes (split among the policies, each its own scenes: seed
  [seed, 5], then [seed, 5, i] for the i-th policy), answered by the scene, as many false
  claims as true ones (or as the policies make); `picture_share` of them balanced questions
  about the picture (`claim_records`: the policy's own picture claims are nearly all true, so
  they cannot teach "no"); the rest `hard_existence_records`. LLaVA-Critic
  trains its judge on model answers labelled by a stronger judge; here the scene is that judge,
  and the labeler learns the errors of the answers it will label, on scenes the loop never
  uses."""
  if not policy_folders:
    raise ValueError("policy_claim_records: no policy to describe scenes")
  questions, claim_images, truths = [], [], []
  for i, folder in enumerate(policy_folders):
    scenes_here = n // len(policy_folders) + (i < n % len(policy_folders))
    scene_seed = [seed, 5] if i == 0 else [seed, 5, i]
    described = _policy_descriptions(scenes_here, world, scene_seed, folder, template, 64)
    for items, more in zip((questions, claim_images, truths), _claims_of(*described)):
      items.extend(more)
  rng = np.random.default_rng([seed, 6])
  false = [i for i, t in enumerate(truths) if not t]
  true = [i for i, t in enumerate(truths) if t]
  true = list(rng.permutation(true)[: max(len(false), n // 2 - len(false))])
  records = [
    _short_answer_record(f"policy-claim-{i}", claim_images[i], questions[i], truths[i])
    for i in sorted(false + true)
  ]
  pictures = (
    claim_records(int(round(n * picture_share)), world, seed, picture_share=1.0)
    if picture_share
    else []
  )
  rest = max(n - len(records) - len(pictures), 0)
  return records + pictures + hard_existence_records(rest, world, seed)


def labeler_training_records(
  kind: str,
  n: int,
  world: shapes.ShapesWorldConfig,
  *,
  near_miss_share: float = 0.0,
  picture_share: float = 0.0,
  policy_folders: Sequence[str] = (),
  template: str = "vicuna_v1",
  seed: int = LABELER_DATA_SEED,
) -> list[dict[str, Any]]:
  """`n` labeler records: `near_miss_share` of them `shape_near_miss_records` (last), the rest
  of `kind` (one of LABELER_DATA): "policy_claims" (`policy_claim_records` of the exported
  policies in `policy_folders`, asked with `template`) or `labeler_records`' kinds, each with
  `picture_share` (0: the kind's own proportion of questions about the picture)."""
  if kind not in LABELER_DATA:
    raise ValueError(f"labeler data {kind!r}: use one of {LABELER_DATA}")
  near_misses = int(round(n * near_miss_share))
  rest = n - near_misses
  if kind == "policy_claims":
    records = policy_claim_records(rest, world, seed, policy_folders, template, picture_share)
  else:
    records = labeler_records(kind, rest, world, seed, picture_share or None)
  return records + shape_near_miss_records(near_misses, world, seed)


def critic_records(
  n: int, world: shapes.ShapesWorldConfig, seed: int, prompt_file: str, answer: str = "reason"
) -> list[dict[str, Any]]:
  """Pairwise shapes critic records (a fifth are ties) asked with the prompt in `prompt_file`;
  answer "reason": the reason naming each wrong object, then the verdict line; "verdict":
  the verdict line alone."""
  template = critic.PromptTemplate.from_file(prompt_file, "pairwise")
  records = make_critic_records(n, world, seed=seed, pairwise_fraction=1.0, tie_fraction=0.2)
  for r in records:
    first, second = r["metadata"]["responses"]
    prompt = critic.pairwise_prompt(r["metadata"]["question"], first, second, template=template)
    r["conversations"][0]["value"] = prompt
    if answer == "verdict":
      r["conversations"][1]["value"] = critic.PAIRWISE_VERDICT_LINES[r["metadata"]["winner"]]
  return records


# --------------------------------------------------------------------------------------------
# How good the labeler and the critic are, against the ground truth.
# --------------------------------------------------------------------------------------------


def _yes_no_items(records: list[dict[str, Any]]) -> YesNoItems:
  """(question, image, truth) of yes/no records (the suffix stripped: the labeler adds its
  own)."""
  questions = [
    r["conversations"][0]["value"].replace("<image>\n", "").split("\n")[0] for r in records
  ]
  return (
    questions,
    [r["image"] for r in records],
    [r["metadata"]["answer"] == "yes" for r in records],
  )


def _existence_items(kind: str, n: int, world) -> YesNoItems:
  """Held-out existence questions."""
  return _yes_no_items(labeler_records(kind, n, world, LABELER_EVAL_SEED))


def _claim_items(n: int, world) -> YesNoItems:
  """Rule questions of the claims of held-out captions (half with an injected hallucination);
  a claim is true when every object it mentions is in the scene. Claims that mention no object
  ("There is a white image") have no ground truth here and are left out."""
  world = dataclasses.replace(world, task_mix=(("caption", 1.0),), hallucination_rate=0.5)
  records = shapes.make_sft_records(n, world, seed=LABELER_EVAL_SEED + 1)
  scenes = [shapes.Scene.from_dict(r["metadata"]["scene"]) for r in records]
  texts = [r["conversations"][1]["value"] for r in records]
  return _claims_of(texts, scenes, [r["image"] for r in records])


def _picture_claim_items(n: int, world) -> YesNoItems:
  """Held-out questions about the picture (background, count) from `claim_records`, half
  true: the policy's own picture claims are nearly all true, so they measure only a yes rate."""
  return _yes_no_items(claim_records(n, world, LABELER_EVAL_SEED + 3, picture_share=1.0))


def _policy_descriptions(
  n: int, world, seed, policy_folder: str, template: str, batch_size: int
) -> tuple[list[str], list, list]:
  """(texts, scenes, images): the policy's greedy descriptions of `n` scenes drawn with `seed`."""
  policy = iterative.load_policy(policy_folder, template)
  scenes = shapes.make_scenes(n, world, seed=seed)
  images = [shapes.render(s, world.image_size) for s in scenes]
  texts, _ = answer_questions(
      policy.model, policy.params, policy.tokenizer, policy.image_config,
      [DESCRIBE_QUESTION] * n, images, template=template, batch_size=batch_size,
      max_new_tokens=48,
  )  # fmt: skip
  return texts, scenes, images


def _claims_of(texts, scenes, images, about: str = "objects") -> YesNoItems:
  """(rule question, image, truth) for every claim of each text that mentions an object
  (about="objects"), or that states the background or the count and names no object
  (about="picture")."""
  splitter = iterative.PerItem(claims.RuleClaimSplitter())
  questions, claim_images, truths = [], [], []
  for text, scene, image in zip(texts, scenes, images):
    for claim in splitter.split([("Describe the image.", text)])[0] or []:
      kind, truth = scene_claim_truth(claim, scene)
      if truth is None or kind != about:
        continue
      questions.append(claims.claim_to_question(claim))
      claim_images.append(image)
      truths.append(truth)
  return questions, claim_images, truths


def yes_no_accuracy(
  folder: str, loop_config: ml_collections.ConfigDict, items: YesNoItems
) -> dict[str, float]:
  """Accuracy of a model's p_yes > p_no against the truth, asked as the loop asks it (nan
  where a set has no items: a few held-out descriptions can make no picture claim)."""
  questions, images, truths = items
  if not truths:
    return {"accuracy": float("nan"), "accuracy_true_claims": float("nan"),
            "accuracy_false_claims": float("nan"), "items": 0}  # fmt: skip
  labeler = iterative.yes_no_labeler(
    loop_config, iterative.load_policy(folder, loop_config.data.template)
  )
  said_yes = ~labeler.score(questions, images).rejected
  truths = np.asarray(truths, dtype=bool)
  return {
    "accuracy": float(np.mean(said_yes == truths)),
    "accuracy_true_claims": float(np.mean(said_yes[truths])) if truths.any() else float("nan"),
    "accuracy_false_claims": (
      float(np.mean(~said_yes[~truths])) if (~truths).any() else float("nan")
    ),
    "items": len(truths),
  }  # fmt: skip


def labeler_report(
  world: shapes.ShapesWorldConfig,
  loop_config: ml_collections.ConfigDict,
  labeler: str,
  sft_hf: str,
  n: int,
) -> dict[str, dict[str, dict[str, float]]]:
  """Yes/no accuracy (`yes_no_accuracy`) of the labeler and of the SFT policy asked the same
  way (the `self` labeler), each on `n`-item held-out sets: existence questions ("exist",
  "hard"), the claims of captions (half with an injected hallucination) and questions about the
  picture, and the SFT policy's own claims about held-out scenes, naming objects (true when
  every object named is there) or the picture (what object sets leave out: "There is a white
  image.")."""
  template = loop_config.data.template
  described = _policy_descriptions(n, world, LABELER_EVAL_SEED + 2, sft_hf, template, batch_size=32)
  sets = {
    "existence": _existence_items("exist", n, world),
    "hard_existence": _existence_items("hard", n, world),
    "caption_claims": _claim_items(n, world),
    "picture_claims": _picture_claim_items(n, world),
    "sft_policy_claims": _claims_of(*described),
    "sft_policy_picture_claims": _claims_of(*described, about="picture"),
  }
  return {
    who: {name: yes_no_accuracy(folder, loop_config, items) for name, items in sets.items()}
    for who, folder in (("labeler", labeler), ("sft_policy_as_labeler", sft_hf))
  }


def critic_report(
  world: shapes.ShapesWorldConfig, loop_config: ml_collections.ConfigDict, n: int
) -> dict[str, dict[str, Any]]:
  """Pairwise accuracy of the loop's critic (`loop_config.feedback.critic`, asked with its
  `critic_prompt`) on `n` held-out critic pairs (a fifth are ties): the verdict on the shown
  order, and the swap-rule verdict over both orders; with ties (3-way) and without."""
  prompt_file = loop_config.feedback.critic_prompt
  records = critic_records(n, world, CRITIC_EVAL_SEED, prompt_file)
  template = critic.PromptTemplate.from_file(prompt_file, "pairwise")
  judge = iterative.critic_judge(loop_config)
  labels, one_order, both_orders = [], [], []
  with tempfile.TemporaryDirectory() as tmp:
    requests = []
    for i, r in enumerate(records):
      image = os.path.join(tmp, f"{i}.png")
      r["image"].save(image)
      first, second = r["metadata"]["responses"]
      question = r["metadata"]["question"]
      for a, b in ((first, second), (second, first)):
        prompt = critic.pairwise_prompt(question, a, b, template=template)
        limit = loop_config.feedback.critic_max_tokens
        requests.append(JudgeRequest(prompt, image=image, max_tokens=limit))
    replies = judge.complete(requests)
  for i, r in enumerate(records):
    ab, ba = (parse_pairwise(x.text) if x.ok else "invalid" for x in replies[2 * i : 2 * i + 2])
    labels.append(r["metadata"]["winner"])
    one_order.append(ab)
    both_orders.append(critic.debiased_winner(ab, ba))
  report = {}
  for name, predictions in (("one_order", one_order), ("both_orders", both_orders)):
    for ties in ("keep", "drop"):
      acc = agreement.pairwise_accuracy(predictions, labels, ties=ties)
      report[f"{name}/{'with' if ties == 'keep' else 'without'}_ties"] = acc.__dict__
  return report
