"""Best-of-N on held-out shapes scenes: does picking among N samples cut hallucinations?

  python experiments/shapes_best_of_n.py --policy=HF_DIR --reward_model=RM_DIR \\
      [--reference=HF_DIR --beta=0.1] --n=4 --num_scenes=64 [--workdir=RUN] [--out=FILE.json]

Every scene is asked "Describe the image." and answered five ways:

  greedy        the policy's greedy answer (the number `evaluate shapes` reports)
  sampled       the first of the N samples: plain sampling at --temperature, BoN's baseline
  bon_rm        best of the N by the reward model (fact-augmented: the scene's facts listed)
  bon_implicit  best of the N by the DPO implicit reward (beta / T) log pi/pi_ref, with
                --reference the model the policy was DPO-trained from (omitted without it)
  bon_oracle    best of the N by the ground truth (fewest hallucinated mentions): the most
                any scorer could get from these samples

All best-of-N rows choose among the *same* N samples per scene, so they differ by their scorer
alone. For each row the table gives the hallucination rate (share of answers with a
hallucinated mention), CHAIR-i, object recall and the mean answer length (tokens, words), from
`shapes_metrics.hallucination_metrics` against the exact scenes. The shapes world (image size,
object counts, the held-out seed) is configs/shapes/sft.py's, or that of `--workdir`, a
training run whose config.json sets it. `--out` writes the table and a few examples as JSON.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METRICS = ("hallucination_rate", "chair_i", "object_recall", "mean_answer_tokens",
           "mean_answer_words")  # fmt: skip
NUM_EXAMPLES = 4


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--policy", required=True, help="the policy's HF folder (lmm-align export)")
  p.add_argument("--reward_model", required=True, help="a reward model folder (reward export)")
  p.add_argument("--reference", default="", help="the DPO reference's HF folder (implicit BoN)")
  p.add_argument("--beta", type=float, default=0.1, help="DPO beta of the implicit reward")
  p.add_argument("--n", type=int, default=4, help="samples per scene")
  p.add_argument("--num_scenes", type=int, default=64)
  p.add_argument("--temperature", type=float, default=0.7)
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--max_new_tokens", type=int, default=48)
  p.add_argument("--seed", type=int, default=0, help="sampling key and fact order")
  p.add_argument("--batch_size", type=int, default=8, help="greedy rows / scoring rows per call")
  p.add_argument("--workdir", default="", help="a shapes training run: its world config")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--out", default="", help="write the table and examples here (JSON)")
  return p.parse_args(argv)


def world_and_template(workdir: str) -> tuple[Any, int, str]:
  """(ShapesWorldConfig, held-out seed, template) of a run, or of configs/shapes/sft.py."""
  from lmm_align import config_files
  from lmm_align.shapes import data as shapes_data

  if workdir:
    from lmm_align.run_config import load_workdir_config

    config = load_workdir_config(workdir)
  else:
    config = config_files.load_config("configs/shapes/sft.py", str(REPO))
  return shapes_data.world_config(config.data), config.data.shapes.eval_seed, config.data.template


def answer_metrics(texts: list[str], token_counts: list[int], scenes: list) -> dict[str, float]:
  from lmm_align.shapes import metrics as shapes_metrics

  metrics = shapes_metrics.hallucination_metrics(texts, scenes)
  row = {k: float(metrics[k]) for k in METRICS if k in metrics}
  row["mean_answer_tokens"] = sum(token_counts) / max(1, len(token_counts))
  return row


def oracle_scores(candidates, scenes) -> Any:
  """-(hallucinated mentions) of every candidate: [P, N]."""
  import numpy as np

  from lmm_align.shapes import metrics as shapes_metrics

  return np.array([
    [-shapes_metrics.response_hallucination_counts(t, s)["hallucinated_mentions"] for t in texts]
    for texts, s in zip(candidates.texts, scenes)
  ], np.float64)  # fmt: skip


def _load(args: argparse.Namespace, template: str):
  from lmm_align import hf
  from lmm_align.data.tokenizer import load_tokenizer
  from lmm_align.hf.reward import load_reward_model
  from lmm_align.inference import image_config_from_folder, load_model_folder
  from lmm_align.models.config import RuntimeConfig

  policy = load_model_folder(args.policy, template=template, dtype=args.dtype)
  rm = load_reward_model(
    args.reward_model, runtime=RuntimeConfig(dtype=args.dtype, param_dtype=args.dtype)
  )
  # The reward model reads the policy's prompt ids and preprocessed images.
  if load_tokenizer(args.reward_model).get_vocab() != policy.tokenizer.get_vocab():
    raise SystemExit(f"{args.reward_model} and {args.policy} must share a tokenizer")
  if image_config_from_folder(args.reward_model) != policy.image_config:
    raise SystemExit(f"{args.reward_model} and {args.policy} preprocess images differently")
  reference = None
  if args.reference:
    ref_model, reference = hf.load_pretrained(args.reference, dtype=args.dtype)
    if ref_model.config != policy.model.config:
      raise SystemExit(f"{args.reference} is not the same architecture as {args.policy}")
  return policy, rm, reference


def run(args: argparse.Namespace) -> dict[str, Any]:
  """The table {row: metrics} and examples; see the module docstring."""
  import jax

  from lmm_align import sampling
  from lmm_align.data import conversation
  from lmm_align.data.images import preprocess_image
  from lmm_align.rl import best_of_n as bon
  from lmm_align.shapes import world as shapes
  from lmm_align.shapes.data import scene_facts
  from lmm_align.shapes.evaluation import DESCRIBE_QUESTION, answer_questions

  world, seed, template = world_and_template(args.workdir)
  policy, rm, reference = _load(args, template)
  scenes = shapes.make_scenes(args.num_scenes, world, seed=seed)
  images = [shapes.render(s, world.image_size) for s in scenes]
  config, tok = policy.model.config, policy.tokenizer
  greedy, greedy_tokens = answer_questions(
    policy.model, policy.params, tok, policy.image_config, [DESCRIBE_QUESTION] * len(scenes),
    images, template=template, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
  )  # fmt: skip
  prompts = [
    bon.BestOfNPrompt(
      s.id,
      conversation.encode_generation_prompt(
        DESCRIBE_QUESTION, tok, template, config.num_image_tokens, config.image_token_id
      ).input_ids,
      preprocess_image(image, policy.image_config),
      tuple(scene_facts(s)),
      DESCRIBE_QUESTION,
    )
    for s, image in zip(scenes, images)
  ]
  settings = sampling.SamplingSettings(
    temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
    stop_token_ids=(tok.eos_token_id,),
  )  # fmt: skip
  candidates = bon.sample_candidates(
    policy.model, policy.params, prompts, tok, n=args.n, settings=settings,
    rng=jax.random.key(args.seed),
  )  # fmt: skip
  scorers = {
    "bon_rm": bon.RewardModelScorer(
      rm, tok, fact_seed=args.seed, batch_size=args.batch_size, template=template
    )
  }
  if reference is not None:
    scorers["bon_implicit"] = bon.ImplicitRewardScorer(
      policy.model, policy.params, reference, pad_id=tok.pad_token_id, beta=args.beta,
      batch_size=args.batch_size,
    )  # fmt: skip
  scores = {name: scorer(prompts, candidates) for name, scorer in scorers.items()}
  scores["bon_oracle"] = oracle_scores(candidates, scenes)
  choices = {"sampled": [0] * len(prompts)}
  for name, table in scores.items():
    choices[name] = [r.chosen_index for r in bon.select_best(prompts, candidates, table)]

  table = {"greedy": answer_metrics(greedy, greedy_tokens, scenes)}
  for name, chosen in choices.items():
    texts = [candidates.texts[p][k] for p, k in enumerate(chosen)]
    lengths = [
      len(candidates.tokens[p][k]) - int(candidates.stopped[p, k]) for p, k in enumerate(chosen)
    ]
    table[name] = answer_metrics(texts, lengths, scenes)
  examples = [
    {"scene": s.id, "greedy": greedy[p], "candidates": candidates.texts[p],
     **{f"{name}_scores": [float(x) for x in scores[name][p]] for name in scores}}
    for p, s in enumerate(scenes[:NUM_EXAMPLES])
  ]  # fmt: skip
  return {"table": table, "examples": examples, "n": args.n, "num_scenes": len(scenes)}


def format_table(table: dict[str, dict[str, float]]) -> str:
  lines = [f"{'':14s}" + "".join(f"{m:>20s}" for m in METRICS)]
  for row, metrics in table.items():
    lines.append(f"{row:14s}" + "".join(f"{metrics.get(m, float('nan')):20.3f}" for m in METRICS))
  return "\n".join(lines)


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.n < 1 or args.num_scenes < 1:
    raise SystemExit("--n and --num_scenes must be >= 1")
  result = run(args)
  print(f"best-of-{args.n} on {result['num_scenes']} held-out scenes")
  print(format_table(result["table"]))
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
  return result


if __name__ == "__main__":
  main()
