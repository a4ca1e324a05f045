"""Reward-model pairs from the policy's own samples, ordered by the shapes scene (CPU, seconds):

  python experiments/shapes_policy_reward_pairs.py --out=/tmp/rm_pairs.jsonl \\
      /tmp/iter/rlaifv/round_2 /tmp/iter/rlaifv/round_3 [--recall_weight=0.5] \\
      [--prefix_pairs --tokenizer=/tmp/sft_hf] [--holdout_prompts=128] \\
      [--max_response_pairs=10000] [--max_pairs=40000]
  python -m lmm_align.main --config=configs/shapes/reward.py --workdir=/tmp/rm_policy \\
      --config.init_from=/tmp/sft_hf --config.data.source=pairs_jsonl \\
      --config.data.json_path=/tmp/rm_pairs.jsonl

Each ROUND_DIR is a round of the iterative loop: prompts/prompts.jsonl carries the scenes,
candidates/candidates.jsonl K samples per prompt. Every same-prompt pair whose scene scores
(PPO's oracle: -(hallucinated mentions) + recall_weight * (objects recalled)) differ by at
least --min_score_gap becomes {chosen, rejected} with the scene's facts, the "sampled pairs
labelled by ground truth" of the shapes reward data. A reward model trained on synthetic
pairs (one injected error per caption) ranks such samples little better than a coin
(`shapes_reward_on_policy.py`); these are the responses PPO asks it to rank.

--prefix_pairs adds what PPO's `dense_reward=segments` asks of the RM: each response is cut
into prefixes before separator tokens, exactly as PPO cuts it (`rewards.segment_ends` on the
tokenizer's ids), and each two consecutive prefixes whose scene scores differ by at least
--prefix_min_gap become a pair. A segment that names an absent object makes the shorter
prefix the chosen one; a segment that finds a new object, the longer. The RM thus learns the
increments PPO pays per segment, not only the order of whole answers. The policy's answers
find objects more often than they invent them, so the longer prefix wins most such pairs; as
many of those are kept as there are shorter-chosen pairs (a seeded subsample), so an RM that
cannot tell a right object from a wrong one learns no preference for length.

--holdout_prompts=N leaves out each round's first N prompt ids (sorted), the prompts
`shapes_reward_on_policy.py --num_prompts=N` reads, so that report stays held out.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


SEPARATORS = (",", ".", ";", "and")  # PPO's default ppo.segment_separators


def prefix_pairs(
  candidates: Sequence[dict[str, Any]],
  scenes: dict[str, Any],
  tokenizer: Any,
  recall_weight: float,
  min_gap: float,
  separators: Sequence[str] = SEPARATORS,
) -> tuple[list[dict[str, Any]], collections.Counter]:
  """Consecutive-prefix pairs of each response, the higher scene score chosen (see the module
  doc). Prefix texts are decoded from the response's token ids, as PPO's RM rows are."""
  from lmm_align.rl import rewards
  from lmm_align.shapes import metrics as shapes_metrics

  separator_ids = rewards.separator_token_ids(tokenizer, separators)
  pairs, stats = [], collections.Counter()
  for c in candidates:
    tokens = tokenizer.encode(c["response"], add_special_tokens=False)
    texts = [
      tokenizer.decode(tokens[: end + 1]) for end in rewards.segment_ends(tokens, separator_ids)
    ]
    scene = scenes[c["prompt_id"]]
    scores = [
      shapes_metrics.ground_truth_score(
        shapes_metrics.response_hallucination_counts(text, scene), recall_weight
      )
      for text in texts
    ]
    for k in range(1, len(texts)):
      gap = scores[k] - scores[k - 1]
      if abs(gap) < min_gap:
        stats["prefix_pairs_small_gap"] += 1
        continue
      (lo, hi) = (k - 1, k) if gap > 0 else (k, k - 1)
      pairs.append({
        "id": f"{c['id']}@{k}", "image": c["image"], "question": c["question"],
        "chosen": texts[hi], "rejected": texts[lo],
        "chosen_score": scores[hi], "rejected_score": scores[lo],
      })  # fmt: skip
      stats["prefix_pairs_longer_chosen" if gap > 0 else "prefix_pairs_shorter_chosen"] += 1
  return pairs, stats


def is_prefix_pair(pair: dict[str, Any]) -> bool:
  """Whether a pair is two prefixes of one response (its id is '<candidate id>@<k>') rather
  than two whole answers ('<id>|<id>')."""
  return "@" in pair["id"]


def balance_prefix_pairs(
  pairs: Sequence[dict[str, Any]], seed: int
) -> tuple[list[dict[str, Any]], int]:
  """(pairs with the longer-chosen and shorter-chosen prefix pairs equal in number, how many
  were dropped); whole-answer pairs and the order of what is kept are untouched."""
  import numpy as np

  is_prefix = [is_prefix_pair(p) for p in pairs]
  longer = [
    i for i, p in enumerate(pairs) if is_prefix[i] and len(p["chosen"]) > len(p["rejected"])
  ]
  shorter = [
    i for i, p in enumerate(pairs) if is_prefix[i] and len(p["chosen"]) < len(p["rejected"])
  ]
  big, small = (longer, shorter) if len(longer) > len(shorter) else (shorter, longer)
  rng = np.random.default_rng(seed)
  dropped = set(rng.choice(big, len(big) - len(small), replace=False).tolist())
  return [p for i, p in enumerate(pairs) if i not in dropped], len(dropped)


def round_pairs(
  round_dir: pathlib.Path,
  recall_weight: float,
  min_score_gap: float,
  tokenizer: Any = None,
  prefix_min_gap: float = 0.5,
  holdout_prompts: int = 0,
) -> tuple[list[dict[str, Any]], collections.Counter]:
  """The scene-ordered pairs of one round's candidates, images as absolute paths; with a
  tokenizer also its prefix pairs. The first `holdout_prompts` prompt ids are left out."""
  from lmm_align.feedback import candidates as candidates_lib
  from lmm_align.feedback import rlaifv
  from lmm_align.shapes import loop_feedback
  from lmm_align.shapes.data import scene_facts

  prompts_dir = round_dir / "prompts"
  candidates_path = round_dir / "candidates" / "candidates.jsonl"
  for path in (prompts_dir / "prompts.jsonl", candidates_path):
    if not path.exists():
      raise SystemExit(f"{round_dir}: no {path.relative_to(round_dir)} (not a loop round?)")
  scenes = loop_feedback.read_scenes(prompts_dir)
  candidates = candidates_lib.read_candidates(candidates_path)
  for c in candidates:
    if c["prompt_id"] not in scenes:
      raise SystemExit(
        f"{candidates_path}: candidate {c['id']!r}, prompt_id {c['prompt_id']!r} has no scene in "
        "prompts.jsonl"
      )
  held_out = set(sorted({c["prompt_id"] for c in candidates})[:holdout_prompts])
  candidates = [c for c in candidates if c["prompt_id"] not in held_out]
  labelled = loop_feedback.ground_truth_feedback(candidates, scenes, recall_weight)
  pairs, stats = rlaifv.build_preference_pairs(
    labelled, min_score_gap=min_score_gap, pairs_per_prompt=None, balance_lengths=False
  )
  stats = collections.Counter({k: v for k, v in stats.items() if isinstance(v, int)})
  stats["response_pairs"] = stats.pop("pairs")
  if tokenizer is not None:
    found, counts = prefix_pairs(candidates, scenes, tokenizer, recall_weight, prefix_min_gap)
    pairs += found
    stats.update(counts)
  for pair in pairs:
    pair["image"] = str((prompts_dir / pair["image"]).resolve())
    pair["facts"] = scene_facts(scenes[candidates_lib.pair_prompt_id(pair)])
  stats["candidates"] += len(candidates)
  stats["held_out_prompts"] += len(held_out)
  return pairs, stats


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("round_dirs", nargs="+", type=pathlib.Path)
  p.add_argument("--out", required=True, type=pathlib.Path)
  p.add_argument("--recall_weight", type=float, default=0.5, help="PPO's ppo.scene_recall_weight")
  p.add_argument("--min_score_gap", type=float, default=1.0)
  p.add_argument("--prefix_pairs", action="store_true", help="also consecutive-prefix pairs")
  p.add_argument("--prefix_min_gap", type=float, default=0.5, help="one object found at 0.5")
  p.add_argument("--tokenizer", default="", help="a model folder; its tokenizer cuts prefixes")
  p.add_argument("--holdout_prompts", type=int, default=0, help="leave out each round's first N")
  p.add_argument(
    "--max_response_pairs", type=int, default=0,
    help="a seeded subsample of the whole-answer pairs (0: all); with --prefix_pairs, so the "
    "prefix pairs are not a small minority of what the RM learns",
  )  # fmt: skip
  p.add_argument("--max_pairs", type=int, default=0, help="a seeded uniform subsample (0: all)")
  p.add_argument("--seed", type=int, default=0, help="of the subsample")
  args = p.parse_args(argv)
  if args.min_score_gap < 1:
    p.error("--min_score_gap must be >= 1 (one hallucinated mention)")
  if args.prefix_pairs != bool(args.tokenizer):
    p.error("--prefix_pairs and --tokenizer go together (the tokenizer cuts the prefixes)")
  if args.prefix_min_gap <= 0 or min(args.holdout_prompts, args.max_pairs,
                                     args.max_response_pairs) < 0:
    p.error("--prefix_min_gap must be > 0; --holdout_prompts and the maxima >= 0")
  import numpy as np

  from lmm_align.feedback import rlaifv

  tokenizer = None
  if args.prefix_pairs:
    from lmm_align.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
  pairs, stats = [], collections.Counter()
  for round_dir in args.round_dirs:
    found, counts = round_pairs(
      round_dir, args.recall_weight, args.min_score_gap, tokenizer, args.prefix_min_gap,
      args.holdout_prompts,
    )  # fmt: skip
    pairs += found
    stats.update(counts)
  if args.prefix_pairs:
    pairs, dropped = balance_prefix_pairs(pairs, args.seed)
    stats["prefix_pairs_over_balance"] = dropped
  rng = np.random.default_rng(args.seed)
  whole = [i for i, pair in enumerate(pairs) if not is_prefix_pair(pair)]
  if args.max_response_pairs and len(whole) > args.max_response_pairs:
    stats["response_pairs_over_max"] = len(whole) - args.max_response_pairs
    dropped = set(rng.choice(whole, len(whole) - args.max_response_pairs, replace=False).tolist())
    pairs = [pair for i, pair in enumerate(pairs) if i not in dropped]
  if args.max_pairs and len(pairs) > args.max_pairs:
    stats["pairs_over_max"] = len(pairs) - args.max_pairs
    keep = np.sort(rng.choice(len(pairs), args.max_pairs, replace=False))
    pairs = [pairs[i] for i in keep]
  args.out.parent.mkdir(parents=True, exist_ok=True)
  rlaifv.write_preference_pairs(args.out, pairs)
  report = {"pairs": len(pairs), **dict(sorted(stats.items()))}
  print(json.dumps(report, indent=1))
  return report


if __name__ == "__main__":
  main()
