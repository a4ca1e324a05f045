"""How a reward model scores the policy's own samples, against the shapes scene (CPU):

  python experiments/shapes_reward_on_policy.py --reward_model=/tmp/rm_fact_hf \\
      --round_dir=/tmp/iter/rlaifv/round_1 [--num_prompts=128] [--out=report.json]

ROUND_DIR is a round of the iterative loop (lmm_align.trainers.iterative): its
prompts/prompts.jsonl carries each scene and candidates/candidates.jsonl K samples per prompt
from the round's starting policy, the responses PPO would score. Held-out accuracy on
synthetic pairs says little about these (an RM at 0.88 there ranks them little better than a
coin), so this reports what PPO acts on:

  pair_agreement   of the same-prompt pairs whose scene scores differ, the share the RM
                   orders the same way (PPO's `reward/rm_pair_agreement`, offline)
  segments         each response cut into prefixes before separator tokens (PPO's
                   `dense_reward=segments`): for segments that name an object the scene does
                   not have, how often the RM's score goes down over the segment and by how
                   much on average; the same for segments that name a present object (where it
                   should go up) and for the rest

The scene score is PPO's oracle: -(hallucinated mentions) + recall_weight * (objects recalled).

--facts=swapped is a probe of whether the RM reads its facts at all: each prompt's responses
are scored with the facts of another prompt's scene (the next prompt id in sorted order, a
cycle), the image unchanged. The report is still against the image's scene, and
`against_facts_scene` adds the same report against the scene the facts describe. An RM that
judges by the facts follows the facts' scene here; one that follows the image's scene as
closely as with its own facts, or neither, does not use them (it scores by the image or by a
prior over what answers usually say), and PPO is free to exploit it.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SEPARATORS = (",", ".", ";", "and")


def _segment_rows(
  rm, tokenizer, image_config, prompts, candidates, separators, template, seed, facts_of
):
  """One RM row per (response, segment end): (rows, pixels, meta = (prompt id, sample, text)).
  `facts_of[pid]`: the prompt whose scene's facts the RM reads (pid itself, unless swapped)."""
  from PIL import Image

  from lmm_align.data import conversation, reward_data
  from lmm_align.data.images import preprocess_image
  from lmm_align.rl import rewards
  from lmm_align.shapes.data import scene_facts
  from lmm_align.shapes.world import Scene

  config = rm.model.config
  separator_ids = rewards.separator_token_ids(tokenizer, separators)
  rng = np.random.default_rng(seed)
  rows, pixels, meta = [], [], []
  eos = tokenizer.eos_token_id
  for pid, samples in candidates.items():
    prompt = prompts[pid]
    facts = scene_facts(Scene.from_dict(prompts[facts_of[pid]]["scene"]))
    question, suffix = reward_data.reward_texts(
      prompt["question"], rm.prompt, facts, rng, fact_augmented=rm.fact_augmented,
      facts_position=rm.facts_position,
    )  # fmt: skip
    query = conversation.encode_generation_prompt(
      question, tokenizer, template, config.num_image_tokens, config.image_token_id,
      record_id=pid,
    ).input_ids  # fmt: skip
    suffix = reward_data.suffix_ids(suffix, tokenizer)
    with Image.open(prompt["image_path"]) as image:
      pixel_values = preprocess_image(image.convert("RGB"), image_config)
    for s, sample in enumerate(samples):
      response = [*tokenizer.encode(sample["response"], add_special_tokens=False), eos]
      for end in rewards.segment_ends(response, separator_ids):
        rows.append([*query, *response[: end + 1], *suffix])
        pixels.append(pixel_values)
        text = tokenizer.decode([t for t in response[: end + 1] if t != eos])
        meta.append((pid, s, text))
  return rows, pixels, meta


def _rm_scores(rm, rows, pixels, pad_id: int, batch_size: int) -> np.ndarray:
  import jax

  from lmm_align.models.heads import ScalarHead
  from lmm_align.rl.scoring import reward_scores
  from lmm_align.sampling import bucket_length
  from lmm_align.trainers.ppo import forward_chunks, right_pad

  head = ScalarHead()
  score = jax.jit(lambda b: reward_scores(rm.model, head, rm.backbone, rm.head, b))
  ids, mask = right_pad(rows, bucket_length(max(len(r) for r in rows)), pad_id)
  batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": np.stack(pixels)[:, None]}
  return forward_chunks(score, batch, batch_size)


def summarize(
  meta: Sequence[tuple[str, int, str]],
  rm_scores: np.ndarray,
  scenes: dict[str, Any],
  recall_weight: float,
) -> dict[str, Any]:
  """The report from per-prefix RM scores (`meta` rows in response order, each response's
  prefixes consecutive and ending with the whole response)."""
  from lmm_align.rl.oracles import same_order_pairs
  from lmm_align.shapes import metrics as shapes_metrics

  previous: dict[tuple[str, int], tuple[float, float, int]] = {}
  full: dict[tuple[str, int], tuple[float, float]] = {}
  kinds: dict[str, list[float]] = collections.defaultdict(list)
  for (pid, s, text), rm in zip(meta, rm_scores):
    counts = shapes_metrics.response_hallucination_counts(text, scenes[pid])
    truth = shapes_metrics.ground_truth_score(counts, recall_weight)
    rm_before, truth_before, wrong_before = previous.get((pid, s), (0.0, 0.0, 0))
    if counts["hallucinated_mentions"] > wrong_before:
      kinds["wrong_object"].append(float(rm) - rm_before)
    elif truth > truth_before:
      kinds["right_object"].append(float(rm) - rm_before)
    else:
      kinds["other"].append(float(rm) - rm_before)
    previous[(pid, s)] = (float(rm), truth, counts["hallucinated_mentions"])
    full[(pid, s)] = (float(rm), truth)
  by_prompt = collections.defaultdict(list)
  for (pid, _), scores in full.items():
    by_prompt[pid].append(scores)
  counts = [same_order_pairs([t for _, t in x], [r for r, _ in x]) for x in by_prompt.values()]
  agree, ordered = sum(a for a, _ in counts), sum(o for _, o in counts)
  segments = {}
  for kind, increments in sorted(kinds.items()):
    x = np.asarray(increments)
    segments[kind] = {
      "count": len(x),
      "rm_down_share": float(np.mean(x < 0)),
      "rm_up_share": float(np.mean(x > 0)),
      "rm_mean_increment": float(x.mean()),
    }
  return {
    "prompts": len(by_prompt),
    "responses": len(full),
    "prefixes": len(meta),
    "ordered_pairs": ordered,
    "pair_agreement": agree / ordered if ordered else float("nan"),
    "segments": segments,
  }


def facts_sources(prompt_ids: Sequence[str], facts: str) -> dict[str, str]:
  """The prompt whose facts each prompt's rows carry: its own, or (swapped) the next one in
  the given order, the last taking the first's; a single prompt cannot be swapped."""
  if facts == "own":
    return {pid: pid for pid in prompt_ids}
  if facts != "swapped":
    raise ValueError(f"facts={facts!r}: use 'own' or 'swapped'")
  if len(prompt_ids) < 2:
    raise ValueError("facts=swapped needs at least 2 prompts (another scene's facts)")
  return {pid: prompt_ids[(i + 1) % len(prompt_ids)] for i, pid in enumerate(prompt_ids)}


def run(args: argparse.Namespace) -> dict[str, Any]:
  from transformers import PreTrainedTokenizerFast

  from lmm_align.data import jsonl
  from lmm_align.feedback.candidates import read_candidates
  from lmm_align.hf.reward import load_reward_model
  from lmm_align.inference import image_config_from_folder

  round_dir = pathlib.Path(args.round_dir)
  prompts = {}
  for line, record in jsonl.numbered_records(round_dir / "prompts" / "prompts.jsonl"):
    if not record.get("scene"):
      raise ValueError(
        f"{round_dir}/prompts/prompts.jsonl: line {line}, prompt {record.get('id')!r}: field "
        "'scene' missing"
      )
    record["image_path"] = str(round_dir / "prompts" / record["image"])
    prompts[record["id"]] = record
  candidates: dict[str, list[dict]] = collections.defaultdict(list)
  candidates_path = round_dir / "candidates" / "candidates.jsonl"
  for record in read_candidates(candidates_path):  # fields checked, naming file, line and field
    if record["prompt_id"] not in prompts:
      raise ValueError(
        f"{candidates_path}: candidate {record['id']!r}, prompt_id {record['prompt_id']!r} is not "
        "in prompts.jsonl"
      )
    candidates[record["prompt_id"]].append(record)
  chosen = sorted(candidates)[: args.num_prompts]
  candidates = {pid: candidates[pid] for pid in chosen}
  rm = load_reward_model(args.reward_model)
  tokenizer = PreTrainedTokenizerFast.from_pretrained(args.reward_model)
  image_config = image_config_from_folder(args.reward_model, "crop")
  facts_of = facts_sources(chosen, args.facts)
  rows, pixels, meta = _segment_rows(
    rm, tokenizer, image_config, prompts, candidates, SEPARATORS, args.template, args.seed,
    facts_of,
  )  # fmt: skip
  scores = _rm_scores(rm, rows, pixels, tokenizer.pad_token_id, args.batch_size)
  scenes = {pid: prompts[pid]["scene"] for pid in chosen}
  report = {"reward_model": args.reward_model, "round_dir": str(round_dir), "facts": args.facts}
  report.update(summarize(meta, scores, scenes, args.recall_weight))
  if args.facts == "swapped":
    facts_scenes = {pid: prompts[facts_of[pid]]["scene"] for pid in chosen}
    report["against_facts_scene"] = summarize(meta, scores, facts_scenes, args.recall_weight)
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(report, indent=2))
  return report


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--reward_model", required=True, help="an exported reward model folder")
  p.add_argument("--round_dir", required=True, help="an iterative round with prompts/candidates")
  p.add_argument("--num_prompts", type=int, default=128)
  p.add_argument("--recall_weight", type=float, default=0.5, help="as ppo.scene_recall_weight")
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--template", default="vicuna_v1")
  p.add_argument("--seed", type=int, default=0, help="of the facts' order")
  p.add_argument(
    "--facts", default="own", choices=("own", "swapped"),
    help="swapped: each prompt's RM rows carry another prompt's scene facts (see the doc)",
  )  # fmt: skip
  p.add_argument("--out", default="", help="also write the report here (JSON)")
  return p.parse_args(argv)


if __name__ == "__main__":
  print(json.dumps(run(parse_args(sys.argv[1:])), indent=2))
