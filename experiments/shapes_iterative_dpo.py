"""Iterative DPO with AI feedback in the shapes world, from one command (CPU):

  python experiments/shapes_iterative_dpo.py --workdir=/tmp/iter                 # rlaifv
  python experiments/shapes_iterative_dpo.py --workdir=/tmp/iter --feedback=all  # 3 loops
  python experiments/shapes_iterative_dpo.py --workdir=/tmp/iter --sft_from=/tmp/chain/sft_hf \\
      [--labeler_from=HF] [--critic_from=HF] [--set train.optim.lr=2e-5] [--quick]

It trains what is missing, each into WORKDIR and skipped when already there:

  tower     (--tower=auto, the default) the shapes world's vision tower, pretrained
            (lmm_align/shapes/tower.py) -> WORKDIR/tower; the SFT policy and the
            labeler start from it and keep it frozen, as LLaVA keeps CLIP
  sft       configs/shapes/sft.py -> WORKDIR/sft, exported to WORKDIR/sft_hf (or --sft_from)
  labeler   (rlaifv) a separate small LLaVA trained by SFT on yes/no questions about scenes
            ("Is there a red circle in the image?" -> Yes/No; --labeler_data), with the
            policy's tokenizer, on the policy's frozen tower or (--labeler_variant=
            shapes-judge) a larger one pretrained into WORKDIR/labeler_tower ->
            WORKDIR/labeler_hf (or --labeler_from). Its yes/no
            accuracy is measured on held-out existence questions and on the claims of
            held-out captions (half of them with an injected hallucination), beside the SFT
            policy's own accuracy (the `self` labeler) -> WORKDIR/labeler_accuracy.json
  critic    (critic) the SFT policy fine-tuned on pairwise `critic_records.make_critic_records`
            (shapes critiques: the verdict line, or with --critic_answer=reason a reason
            naming every hallucinated object first; asked with COMPACT_CRITIC_PROMPT, saved
            as WORKDIR/critic_prompt.txt) ->
            WORKDIR/critic_hf (or --critic_from); its pairwise accuracy against ground truth
            on held-out pairs, with and without ties, one order and both orders (MT-Bench's
            swap rule) -> WORKDIR/critic_accuracy.json

then runs `lmm_align.trainers.iterative` (configs/shapes/iterative_dpo.py) into
WORKDIR/<feedback>/ for each feedback kind asked and prints the hallucination rate per round.
WORKDIR/summary.json gathers the round tables and the labeler and critic accuracies (results of
earlier commands into the same WORKDIR are kept). A killed command rerun as it was resumes
where it stopped. `--models_only` stops before the loops. `--quick` uses the runlocal configs:
every stage in minutes, numbers meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LOOP_FEEDBACK = ("rlaifv", "self", "critic", "ground_truth", "correction")
# Seeds of the data each stage draws, apart from SFT (0), ground-truth DPO (1), the loop's
# prompts (2024) and evaluation (12345).
LABELER_DATA_SEED, LABELER_EVAL_SEED = 31, 32
CRITIC_DATA_SEED, CRITIC_EVAL_SEED = 41, 42
# The critic's pairwise prompt (our wording). critic.pairwise_prompt's default instruction is
# about 160 tokens of English the shapes tokenizer splits into pieces; this one keeps critic
# training and judging sequences near 300 tokens instead of 500 on CPU.
COMPACT_CRITIC_PROMPT = (
  "Which response describes the image more accurately?\n"
  "Question: [{question}]\nThe first response: [{first}]\nThe second response: [{second}]"
)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--feedback", default="rlaifv", help=f"one of {LOOP_FEEDBACK}, or 'all'")
  p.add_argument("--quick", action="store_true", help="runlocal configs: checks the plumbing")
  p.add_argument("--sft_from", default="", help="an exported SFT policy (skips SFT)")
  p.add_argument("--labeler_from", default="", help="an exported labeler (skips its training)")
  p.add_argument("--critic_from", default="", help="an exported critic (skips its training)")
  p.add_argument(
    "--tower", default="auto",
    help="the pretrained vision tower the SFT policy (when trained here) and the labeler start "
    "from, frozen: auto (pretrain into WORKDIR/tower), a CLIPVisionModel folder, or none "
    "(towers trained from scratch through the language loss)",
  )  # fmt: skip
  p.add_argument(
    "--labeler_data", default="hard",
    choices=("hard", "exist", "binding", "policy_claims", "claims"),
    help="exist: the SFT mixture's existence task alone; hard: existence questions whose "
    "negatives are as popular as the objects and near misses (see hard_existence_records); "
    "binding: hard with half the negatives a present colour on another present shape "
    "(measured: it catches 39%% of the SFT policy's false claims instead of 18%%, but accepts "
    "83%% of its true ones instead of 96%%, and three RLAIF-V rounds then do not lower the "
    "hallucination rate); policy_claims: half the claims of the SFT policy's own "
    "descriptions of fresh scenes, answered by the scene (see policy_claim_records); claims: "
    "half the rule questions of caption claims the loop asks, about objects, the background "
    "and the count, answered by the scene with false variants (see claim_records), half "
    "binding",
  )  # fmt: skip
  p.add_argument(
    "--labeler_init", default="",
    help="an exported model the labeler is fine-tuned from (e.g. an earlier labeler) instead "
    "of a new decoder on the pretrained tower",
  )  # fmt: skip
  p.add_argument(
    "--labeler_image_size", type=int, default=0,
    help="the labeler's vision input side (0: the SFT config's 48); 96 with 16-pixel patches "
    "sees each grid cell as 2x2 patches instead of one",
  )  # fmt: skip
  p.add_argument(
    "--labeler_tower_lr", type=float, default=0.0,
    help="0: the labeler keeps the pretrained tower frozen; > 0: the tower trains too, at this "
    "multiple of the labeler's learning rate (RLAIF-V's labeler sees better than its policy)",
  )  # fmt: skip
  p.add_argument(
    "--labeler_variant", default="shapes", choices=("shapes", "shapes-wide", "shapes-judge"),
    help="the labeler's model: the policy's size, a twice-as-wide decoder on the same tower, or "
    "that decoder on a larger tower of its own, pretrained into WORKDIR/labeler_tower (a "
    "labeler that sees better than the policy: the policy's tower misreads the shapes its "
    "false claims confuse)",
  )  # fmt: skip
  p.add_argument(
    "--labeler_picture_share", type=float, default=0.0,
    help="with --labeler_data=claims: the share of claim records about the picture (background, "
    "count), 0: the captions' proportion; with policy_claims: the share of records that are "
    "such picture questions (0: none)",
  )  # fmt: skip
  p.add_argument(
    "--labeler_near_miss_share", type=float, default=0.0,
    help="the share of labeler records that ask about a present object with its shape swapped "
    "(or as it is): shape_near_miss_records; the rest are --labeler_data's",
  )  # fmt: skip
  p.add_argument(
    "--labeler_claims_from", default="",
    help="with --labeler_data=policy_claims: comma-separated exported policies whose claims "
    "(about fresh scenes each) the labeler learns, e.g. a finished loop's later rounds, whose "
    "remaining errors differ from the SFT policy's (default: the SFT policy)",
  )  # fmt: skip
  p.add_argument("--labeler_steps", type=int, default=1500)
  p.add_argument("--labeler_records", type=int, default=12000)
  p.add_argument(
    "--critic_answer", default="verdict", choices=("verdict", "reason"),
    help="what the critic learns to write: the verdict line alone, or LLaVA-Critic's reason "
    "then verdict (measured: 400 CPU steps leave the reasons garbled and no verdict parses)",
  )  # fmt: skip
  p.add_argument("--critic_steps", type=int, default=400)
  p.add_argument("--critic_records", type=int, default=3000)
  p.add_argument("--eval_items", type=int, default=256, help="held-out labeler / critic items")
  p.add_argument("--set", action="append", default=[], help="loop config key=value overrides")
  p.add_argument("--models_only", action="store_true", help="train and measure, skip the loop")
  args = p.parse_args(argv)
  for flag in ("labeler_picture_share", "labeler_near_miss_share"):
    if not 0.0 <= getattr(args, flag) < 1.0:
      p.error(f"--{flag}={getattr(args, flag)}: use a share in [0, 1)")
  kinds = ("rlaifv", "self", "critic") if args.feedback == "all" else (args.feedback,)
  if any(k not in LOOP_FEEDBACK for k in kinds):
    p.error(f"--feedback={args.feedback!r}: use one of {LOOP_FEEDBACK} or 'all'")
  args.kinds = kinds
  if args.labeler_claims_from and args.labeler_data != "policy_claims":
    p.error("--labeler_claims_from names the policies of --labeler_data=policy_claims")
  if args.labeler_tower_lr and args.tower == "none":
    p.error("--labeler_tower_lr scales a pretrained tower's learning rate: not with --tower=none")
  if args.labeler_image_size and args.tower != "none":
    p.error("--labeler_image_size changes the tower's input: use it with --tower=none")
  if args.quick:
    args.labeler_steps, args.critic_steps = min(args.labeler_steps, 4), min(args.critic_steps, 4)
    args.labeler_records, args.critic_records = 32, 16
    args.eval_items = min(args.eval_items, 8)
  return args


def _overrides(items: list[str]) -> dict[str, Any]:
  out = {}
  for item in items:
    key, _, raw = item.partition("=")
    if not key or not raw:
      raise SystemExit(f"--set {item!r}: use key=value, e.g. train.optim.lr=2e-5")
    try:
      out[key] = json.loads(raw)
    except json.JSONDecodeError:
      out[key] = raw
  return out


def _load(spec: str):
  from lmm_align import config_files

  return config_files.load_config(spec, str(REPO))


def _sft_spec(args) -> str:
  """configs/shapes/sft.py with runlocal and the pretrained tower as asked."""
  parts = ["runlocal"] if args.quick else []
  if getattr(args, "tower_dir", ""):
    parts.append(f"tower={args.tower_dir}")
  return f"configs/shapes/sft.py:{','.join(parts)}"


def ensure_tower(args, root: pathlib.Path) -> str:
  """The tower folder per --tower ("" for none)."""
  if args.tower == "none":
    return ""
  if args.tower != "auto":
    return args.tower
  from lmm_align.shapes import tower as shapes_tower

  sft_config = _load(f"configs/shapes/sft.py:{'runlocal' if args.quick else ''}")
  shapes_tower.ensure_tower(sft_config, root / "tower", args.quick)
  return str(root / "tower")


def _world(quick: bool):
  from lmm_align.shapes import data as shapes_data

  config = _load(f"configs/shapes/sft.py:{'runlocal' if quick else ''}")
  return shapes_data.world_config(config.data)


# --------------------------------------------------------------------------------------------
# Models the loop needs: each trained once, exported, marked done.
# --------------------------------------------------------------------------------------------


def _train_and_export(config, workdir: pathlib.Path, out: pathlib.Path) -> str:
  """SFT in `workdir` (resuming), then export to `out`; `out/done` marks a finished export."""
  from lmm_align.trainers import export, sft

  if not (out / "done").exists():
    if not (workdir / "summary.json").exists():
      sft.train(config, str(workdir))
    export.export_workdir(str(workdir), str(out))
    (out / "done").write_text("exported\n")
  return str(out)


def ensure_sft(args, root: pathlib.Path) -> str:
  if args.sft_from:
    return args.sft_from
  config = _load(_sft_spec(args))
  if args.quick:  # long enough to describe scenes in shapes words, so feedback finds pairs
    config.total_steps, config.checkpoint_every, config.optim.lr = 40, 40, 3e-3
  print(f"=== sft -> {root / 'sft'}")
  return _train_and_export(config, root / "sft", root / "sft_hf")


def _json_sft_config(args, data_json: pathlib.Path, **fields):
  """configs/shapes/sft.py reading a saved LLaVA JSON (its images beside it), no evaluation."""
  from lmm_align import main

  config = _load(_sft_spec(args))
  base = {
    "data.source": "llava_json",
    "data.json_path": str(data_json),
    "data.image_folder": str(data_json.parent),
    "eval.enabled": False,
  }
  return main.apply_overrides(config, {**base, **fields})


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
  n: int, world, seed: int, binding_share: float = 0.0
) -> list[dict[str, Any]]:
  """Existence questions in the exist task's wording, half "yes", whose "no" objects are
  drawn like the hallucinations a policy makes rather than uniformly over absent pairs.

  The exist task's negatives are uniform over the absent (colour, shape) pairs, so they are
  mostly unpopular objects: a labeler trained on them learns "popular object -> yes" and
  accepts the popular objects a policy hallucinates (measured: it rejected 17% of the SFT
  policy's false claims). Here a negative is drawn by `_negative`: popular objects and near
  misses, and a share `binding_share` of binding negatives.
  """
  import numpy as np

  from lmm_align.shapes import world as shapes

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


def scene_claim_truth(claim: str, scene) -> tuple[str, bool | None]:
  """(kind, truth) of a claim, as the metrics read it. Kind "objects": it names objects, and
  is true when every object it names is there (colour and shape; size and place are not
  checked). Kind "picture": it names none, and is true when the background colour and the
  number of shapes it states are the scene's; truth None when it states neither (no ground
  truth)."""
  import re

  from lmm_align.shapes import metrics as shapes_metrics
  from lmm_align.shapes import world as shapes

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
  import re

  from lmm_align.shapes import world as shapes

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
  from lmm_align.shapes import world as shapes

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
  n: int, world, seed: int, picture_share: float | None = None
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
  import dataclasses

  import numpy as np

  from lmm_align.feedback import claims
  from lmm_align.shapes import world as shapes

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


def shape_near_miss_records(n: int, world, seed: int) -> list[dict[str, Any]]:
  """`n` yes/no questions about one object of a fresh scene each: half about the object as it
  is, half with its shape swapped for one its colour does not come in there (a present blue
  star asked as a blue triangle), half in the existence form and half with its size and place,
  as the policy's claims word it. Most of the SFT policy's false claims are such swaps (93 of
  118 name an absent shape in a present colour), and a labeler trained on the other kinds of
  records, on a tower that reads 99.8% of shapes, still said yes to 64% of circles asked as
  squares and 81% of stars asked as triangles: those records rarely ask about a present
  object's shape."""
  import numpy as np

  from lmm_align.shapes import world as shapes

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
  kind: str, n: int, world, seed: int, picture_share: float | None = None
) -> list[dict[str, Any]]:
  """`n` labeler records: "exist" (task_mix exist), "hard" (`hard_existence_records`),
  "binding" (the same with half of the negatives binding negatives), or "claims"
  (`claim_records` with `picture_share`, the rest binding)."""
  import dataclasses

  from lmm_align.shapes import world as shapes

  if kind == "claims":
    records = claim_records(n // 2, world, seed, picture_share)
    return records + hard_existence_records(n - len(records), world, seed, binding_share=0.5)
  if kind == "exist":
    exist_world = dataclasses.replace(world, task_mix=(("exist", 1.0),))
    return shapes.make_sft_records(n, exist_world, seed=seed)
  return hard_existence_records(n, world, seed, binding_share=0.5 if kind == "binding" else 0.0)


def policy_claim_records(
  n: int,
  world,
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
  import numpy as np

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


def _saved_records(data_dir: pathlib.Path, make_records) -> pathlib.Path:
  """data_dir/data.json, a LLaVA JSON written from `make_records()` once (reruns reuse it)."""
  from lmm_align.data.llava_json import save_llava_dataset

  if not (data_dir / "data.json").exists():
    save_llava_dataset(make_records(), data_dir)
  return data_dir / "data.json"


def labeler_overrides(args) -> dict[str, Any]:
  """The labeler's changes to the SFT config: steps, sequence length, and its vision."""
  fields = {
    "total_steps": args.labeler_steps,
    "checkpoint_every": max(1, args.labeler_steps // 6),
    "keep_checkpoints": 6,
    "data.max_length": 128,
    "data.buckets": (96, 128),
    "model.variant": args.labeler_variant,
  }
  if args.labeler_image_size:
    fields["model.image_size"] = args.labeler_image_size
  if args.labeler_init:
    fields["init_from"] = args.labeler_init
    fields["model.vision_init"] = ""  # the tower comes with the model
  elif getattr(args, "labeler_tower_dir", ""):
    fields["model.vision_init"] = args.labeler_tower_dir
  if args.labeler_tower_lr:
    fields["trainable"] = (".*",)
    fields["optim.lr_groups"] = (("vision_tower/.*", args.labeler_tower_lr),)
  return fields


def labeler_data(args, sft_hf: str) -> list[dict[str, Any]]:
  """The labeler's records per --labeler_data, --labeler_records and the shares."""
  world = _world(args.quick)
  near_misses = int(round(args.labeler_records * args.labeler_near_miss_share))
  n = args.labeler_records - near_misses
  if args.labeler_data == "policy_claims":
    template = _load("configs/shapes/iterative_dpo.py").data.template
    policies = [f for f in args.labeler_claims_from.split(",") if f] or [sft_hf]
    records = policy_claim_records(
      n, world, LABELER_DATA_SEED, policies, template, args.labeler_picture_share
    )
  else:
    records = labeler_records(
      args.labeler_data, n, world, LABELER_DATA_SEED, args.labeler_picture_share or None
    )
  return records + shape_near_miss_records(near_misses, world, LABELER_DATA_SEED)


def ensure_labeler_tower(args, root: pathlib.Path) -> str:
  """The pretrained tower a new labeler starts from ("" when it has none: --labeler_init brings
  its own, --tower=none trains it from scratch): the policy's tower when the labeler variant
  has the policy's vision config, else one pretrained for the labeler's variant into
  WORKDIR/labeler_tower."""
  from lmm_align.models.config import get_variant

  if args.labeler_init or not args.tower_dir:
    return ""
  sft_config = _load(f"configs/shapes/sft.py:{'runlocal' if args.quick else ''}")
  if get_variant(args.labeler_variant).vision == get_variant(sft_config.model.variant).vision:
    return args.tower_dir
  from lmm_align.shapes import tower as shapes_tower

  sft_config.model.variant = args.labeler_variant
  shapes_tower.ensure_tower(sft_config, root / "labeler_tower", args.quick)
  return str(root / "labeler_tower")


def ensure_labeler(args, root: pathlib.Path, sft_hf: str) -> str:
  """A labeler trained on --labeler_data's yes/no records (the policy's tokenizer)."""
  if args.labeler_from:
    return args.labeler_from
  args.labeler_tower_dir = ensure_labeler_tower(args, root)
  data_json = _saved_records(root / "labeler_data", lambda: labeler_data(args, sft_hf))
  config = _json_sft_config(args, data_json, tokenizer=sft_hf, **labeler_overrides(args))
  print(f"=== labeler -> {root / 'labeler'}")
  return _train_and_export(config, root / "labeler", root / "labeler_hf")


def critic_prompt_file(root: pathlib.Path) -> str:
  """WORKDIR/critic_prompt.txt: the pairwise prompt the critic is trained and asked with."""
  path = root / "critic_prompt.txt"
  path.write_text(COMPACT_CRITIC_PROMPT)
  return str(path)


def critic_records(
  n: int, world, seed: int, prompt_file: str, answer: str = "reason"
) -> list[dict[str, Any]]:
  """Pairwise shapes critic records (a fifth are ties) asked with the prompt in `prompt_file`;
  answer "reason": the reason naming each wrong object, then the verdict line; "verdict":
  the verdict line alone."""
  from lmm_align.feedback import critic
  from lmm_align.shapes.critic_records import make_critic_records

  template = critic.PromptTemplate.from_file(prompt_file, "pairwise")
  records = make_critic_records(n, world, seed=seed, pairwise_fraction=1.0, tie_fraction=0.2)
  for r in records:
    first, second = r["metadata"]["responses"]
    prompt = critic.pairwise_prompt(r["metadata"]["question"], first, second, template=template)
    r["conversations"][0]["value"] = prompt
    if answer == "verdict":
      r["conversations"][1]["value"] = critic.PAIRWISE_VERDICT_LINES[r["metadata"]["winner"]]
  return records


def ensure_critic(args, root: pathlib.Path, sft_hf: str) -> str:
  """The SFT policy fine-tuned on pairwise shapes critic data, asked with the compact prompt."""
  if args.critic_from:
    return args.critic_from
  data_json = _saved_records(
    root / "critic_data",
    lambda: critic_records(
      args.critic_records,
      _world(args.quick),
      CRITIC_DATA_SEED,
      critic_prompt_file(root),
      args.critic_answer,
    ),
  )
  config = _json_sft_config(
    args, data_json, init_from=sft_hf, total_steps=args.critic_steps,
    checkpoint_every=max(1, args.critic_steps // 3), batch_size=16 if not args.quick else 8,
    **{"data.max_length": 320, "data.buckets": (256, 320), "optim.lr": 1e-4},
  )  # fmt: skip
  print(f"=== critic -> {root / 'critic'}")
  return _train_and_export(config, root / "critic", root / "critic_hf")


# --------------------------------------------------------------------------------------------
# How good the labeler and the critic are, against the ground truth.
# --------------------------------------------------------------------------------------------


def _yes_no_items(records: list[dict[str, Any]]) -> tuple[list[str], list, list[bool]]:
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


def _existence_items(kind: str, n: int, world) -> tuple[list[str], list, list[bool]]:
  """Held-out existence questions."""
  return _yes_no_items(labeler_records(kind, n, world, LABELER_EVAL_SEED))


def _claim_items(n: int, world) -> tuple[list[str], list, list[bool]]:
  """Rule questions of the claims of held-out captions (half with an injected hallucination);
  a claim is true when every object it mentions is in the scene. Claims that mention no object
  ("There is a white image") have no ground truth here and are left out."""
  import dataclasses

  from lmm_align.shapes import world as shapes

  world = dataclasses.replace(world, task_mix=(("caption", 1.0),), hallucination_rate=0.5)
  records = shapes.make_sft_records(n, world, seed=LABELER_EVAL_SEED + 1)
  scenes = [shapes.Scene.from_dict(r["metadata"]["scene"]) for r in records]
  texts = [r["conversations"][1]["value"] for r in records]
  return _claims_of(texts, scenes, [r["image"] for r in records])


def _picture_claim_items(n: int, world) -> tuple[list[str], list, list[bool]]:
  """Held-out questions about the picture (background, count) from `claim_records`, half
  true: the policy's own picture claims are nearly all true, so they measure only a yes rate."""
  return _yes_no_items(claim_records(n, world, LABELER_EVAL_SEED + 3, picture_share=1.0))


def _policy_descriptions(
  n: int, world, seed, policy_folder: str, template: str, batch_size: int
) -> tuple[list[str], list, list]:
  """(texts, scenes, images): the policy's greedy descriptions of `n` scenes drawn with `seed`."""
  from lmm_align.shapes import world as shapes
  from lmm_align.shapes.evaluation import DESCRIBE_QUESTION, answer_questions
  from lmm_align.trainers import iterative

  policy = iterative.load_policy(policy_folder, template)
  scenes = shapes.make_scenes(n, world, seed=seed)
  images = [shapes.render(s, world.image_size) for s in scenes]
  texts, _ = answer_questions(
      policy.model, policy.params, policy.tokenizer, policy.image_config,
      [DESCRIBE_QUESTION] * n, images, template=template, batch_size=batch_size,
      max_new_tokens=48,
  )  # fmt: skip
  return texts, scenes, images


def _claims_of(texts, scenes, images, about: str = "objects") -> tuple[list[str], list, list[bool]]:
  """(rule question, image, truth) for every claim of each text that mentions an object
  (about="objects"), or that states the background or the count and names no object
  (about="picture")."""
  from lmm_align.feedback import claims
  from lmm_align.trainers import iterative

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


def yes_no_accuracy(folder: str, loop_config, items) -> dict[str, float]:
  """Accuracy of a model's p_yes > p_no against the truth, asked as the loop asks it."""
  import numpy as np

  from lmm_align.trainers import iterative

  questions, images, truths = items
  labeler = iterative.yes_no_labeler(
    loop_config, iterative.load_policy(folder, loop_config.data.template)
  )
  said_yes = ~labeler.score(questions, images).rejected
  truths = np.asarray(truths)
  return {
    "accuracy": float(np.mean(said_yes == truths)),
    "accuracy_true_claims": float(np.mean(said_yes[truths])) if truths.any() else float("nan"),
    "accuracy_false_claims": (
      float(np.mean(~said_yes[~truths])) if (~truths).any() else float("nan")
    ),
    "items": len(truths),
  }  # fmt: skip


def labeler_report(args, root: pathlib.Path, loop_config, labeler: str, sft_hf: str) -> dict:
  path = root / "labeler_accuracy.json"
  if path.exists():
    return json.loads(path.read_text())
  world = _world(args.quick)
  template = loop_config.data.template
  # The policy's own claims about held-out scenes: those naming objects, true when every object
  # named is there; and what the object sets leave out ("There is a white image.").
  described = _policy_descriptions(
    args.eval_items, world, LABELER_EVAL_SEED + 2, sft_hf, template, batch_size=32
  )
  sets = {
    "existence": _existence_items("exist", args.eval_items, world),
    "hard_existence": _existence_items("hard", args.eval_items, world),
    "caption_claims": _claim_items(args.eval_items, world),
    "picture_claims": _picture_claim_items(args.eval_items, world),
    "sft_policy_claims": _claims_of(*described),
    "sft_policy_picture_claims": _claims_of(*described, about="picture"),
  }
  report = {
    who: {name: yes_no_accuracy(folder, loop_config, items) for name, items in sets.items()}
    for who, folder in (("labeler", labeler), ("sft_policy_as_labeler", sft_hf))
  }
  path.write_text(json.dumps(report, indent=2) + "\n")
  return report


def critic_report(args, root: pathlib.Path, loop_config, critic_folder: str) -> dict:
  """Pairwise accuracy on held-out critic pairs (a fifth are ties): the verdict on the shown
  order, and the swap-rule verdict over both orders; with ties (3-way) and without."""
  path = root / "critic_accuracy.json"
  if path.exists():
    return json.loads(path.read_text())
  import tempfile

  from lmm_align.feedback import critic
  from lmm_align.judges import agreement
  from lmm_align.judges.base import JudgeRequest
  from lmm_align.judges.verdicts import parse_pairwise
  from lmm_align.trainers import iterative

  prompt_file = loop_config.feedback.critic_prompt
  records = critic_records(args.eval_items, _world(args.quick), CRITIC_EVAL_SEED, prompt_file)
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
  path.write_text(json.dumps(report, indent=2) + "\n")
  return report


# --------------------------------------------------------------------------------------------
# The loop.
# --------------------------------------------------------------------------------------------


def loop_config(args, kind: str, sft_hf: str, labeler: str = "", critic_folder: str = ""):
  from lmm_align import main

  config = _load(
    f"configs/shapes/iterative_dpo.py:feedback={kind}{',runlocal' if args.quick else ''}"
  )
  fields = {"init_from": sft_hf, "feedback.labeler": labeler, "feedback.critic": critic_folder}
  if critic_folder:
    fields["feedback.critic_prompt"] = critic_prompt_file(pathlib.Path(args.workdir))
  return main.apply_overrides(config, {**fields, **_overrides(args.set)})


def run_experiment(args) -> dict[str, Any]:
  from lmm_align.trainers import iterative

  root = pathlib.Path(args.workdir)
  root.mkdir(parents=True, exist_ok=True)
  args.tower_dir = ensure_tower(args, root)
  sft_hf = ensure_sft(args, root)
  summary_path = root / "summary.json"
  # Another command may have run other feedback kinds into this workdir: keep their results.
  results = json.loads(summary_path.read_text()) if summary_path.exists() else {}
  results["sft"] = sft_hf
  labeler = critic_folder = ""
  if "rlaifv" in args.kinds:
    labeler = ensure_labeler(args, root, sft_hf)
    results["labeler_accuracy"] = labeler_report(
      args, root, loop_config(args, "rlaifv", sft_hf, labeler), labeler, sft_hf
    )
    print("labeler yes/no accuracy:", json.dumps(results["labeler_accuracy"], indent=1))
  if "critic" in args.kinds:
    critic_folder = ensure_critic(args, root, sft_hf)
    results["critic_accuracy"] = critic_report(
      args, root, loop_config(args, "critic", sft_hf, critic_folder=critic_folder), critic_folder
    )
    print("critic pairwise accuracy:", json.dumps(results["critic_accuracy"], indent=1))
  for kind in () if args.models_only else args.kinds:
    print(f"=== iterative DPO, {kind} feedback -> {root / kind}")
    config = loop_config(args, kind, sft_hf, labeler, critic_folder)
    results[kind] = iterative.run(config, str(root / kind))["rounds"]
  summary_path.write_text(json.dumps(results, indent=2) + "\n")
  for kind in () if args.models_only else args.kinds:
    print(f"\n{kind} feedback:\n{iterative.format_rounds_table(results[kind])}")
  return results


if __name__ == "__main__":
  os.environ.setdefault("LMM_ALIGN_PROGRESS", "0")
  from absl import logging

  logging.set_verbosity(logging.WARNING)
  run_experiment(parse_args())
