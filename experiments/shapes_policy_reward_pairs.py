"""Reward-model pairs from the policy's own samples, ordered by the shapes scene (CPU, seconds):

  python experiments/shapes_policy_reward_pairs.py --out=/tmp/rm_pairs.jsonl \\
      /tmp/iter/rlaifv/round_2 /tmp/iter/rlaifv/round_3 [--recall_weight=0.5]
  python -m lmm_align.main --config=configs/shapes_reward.py --workdir=/tmp/rm_policy \\
      --config.init_from=/tmp/sft_hf --config.data.source=pairs_jsonl \\
      --config.data.json_path=/tmp/rm_pairs.jsonl

Each ROUND_DIR is a round of the iterative loop: prompts/prompts.jsonl carries the scenes,
candidates/candidates.jsonl K samples per prompt. Every same-prompt pair whose scene scores
(PPO's oracle: -(hallucinated mentions) + recall_weight * (objects recalled)) differ by at
least --min_score_gap becomes {chosen, rejected} with the scene's facts, the "sampled pairs
labelled by ground truth" of the shapes reward data. A reward model trained on synthetic
pairs (one injected error per caption) ranks such samples little better than a coin
(`shapes_reward_on_policy.py`); these are the responses PPO asks it to rank.
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


def round_pairs(
  round_dir: pathlib.Path, recall_weight: float, min_score_gap: float
) -> tuple[list[dict[str, Any]], collections.Counter]:
  """The scene-ordered pairs of one round's candidates, images as absolute paths."""
  from lmm_align.data import preference_sources
  from lmm_align.feedback import candidates as candidates_lib
  from lmm_align.feedback import rlaifv
  from lmm_align.trainers import iterative

  prompts_dir = round_dir / "prompts"
  candidates_path = round_dir / "candidates" / "candidates.jsonl"
  for path in (prompts_dir / "prompts.jsonl", candidates_path):
    if not path.exists():
      raise SystemExit(f"{round_dir}: no {path.relative_to(round_dir)} (not a loop round?)")
  scenes = iterative.read_scenes(prompts_dir)
  candidates = candidates_lib.read_candidates(candidates_path)
  for c in candidates:
    if c["prompt_id"] not in scenes:
      raise SystemExit(
        f"{candidates_path}: candidate {c['id']!r}, prompt_id {c['prompt_id']!r} has no scene in "
        "prompts.jsonl"
      )
  labelled = iterative.ground_truth_feedback(candidates, scenes, recall_weight)
  pairs, stats = rlaifv.build_preference_pairs(
    labelled, min_score_gap=min_score_gap, pairs_per_prompt=None, balance_lengths=False
  )
  for pair in pairs:
    pair["image"] = str((prompts_dir / pair["image"]).resolve())
    pair["facts"] = preference_sources.scene_facts(scenes[iterative.pair_prompt_id(pair)])
  stats = collections.Counter({k: v for k, v in stats.items() if isinstance(v, int)})
  stats["candidates"] += len(candidates)
  return pairs, stats


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("round_dirs", nargs="+", type=pathlib.Path)
  p.add_argument("--out", required=True, type=pathlib.Path)
  p.add_argument("--recall_weight", type=float, default=0.5, help="PPO's ppo.scene_recall_weight")
  p.add_argument("--min_score_gap", type=float, default=1.0)
  args = p.parse_args(argv)
  if args.min_score_gap < 1:
    p.error("--min_score_gap must be >= 1 (one hallucinated mention)")
  from lmm_align.feedback import rlaifv

  pairs, stats = [], collections.Counter()
  for round_dir in args.round_dirs:
    found, counts = round_pairs(round_dir, args.recall_weight, args.min_score_gap)
    pairs += found
    stats.update(counts)
  args.out.parent.mkdir(parents=True, exist_ok=True)
  rlaifv.write_preference_pairs(args.out, pairs)
  report = {"pairs": len(pairs), **dict(sorted(stats.items()))}
  print(json.dumps(report, indent=1))
  return report


if __name__ == "__main__":
  main()
