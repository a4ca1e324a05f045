"""One process of test_multiprocess_loop.py (run as a script), and the loop config both sides
use: one round of the iterative loop on a tiny random LLaVA folder, its models on a mesh over
all (global) devices.

The feedback kind "yes_probability" (registered here) asks the round's policy, as a
`YesNoLabeler` on the loop's mesh, one yes/no question per candidate and scores it P(yes), so
that the feedback stage runs sharded over every process and each prompt's two candidates get
different scores (best vs worst: one pair per prompt) from a random model.

Usage: python multiprocess_loop_worker.py FOLDER PROMPTS_JSONL WORKDIR OUT_JSON (the
distributed setup comes from LMM_ALIGN_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID).
"""

from __future__ import annotations

import json
import pathlib
import sys
from collections.abc import Sequence

import jax

from configs.shapes import iterative_dpo as shapes_iterative_dpo
from lmm_align import sharding
from lmm_align.data import images as images_lib
from lmm_align.data import jsonl
from lmm_align.feedback import registry as feedback_registry
from lmm_align.trainers import iterative

TEMPLATE = "vicuna_v1"
MESH_SIZES = (1, 4, 2)  # fsdp across the 2 processes' 8 devices, tensor within each
NUM_PROMPTS = 4  # one pair each: one DPO batch of 4 rows over data x fsdp = 4
QUESTION = "Is the answer right?"


@feedback_registry.register_kind("yes_probability", pair_method="best_worst")
def _yes_probability_kind(config, policy, candidates, prompts_dir, out_path) -> None:
  """score = P(yes) of the policy asked QUESTION about each candidate's image."""
  labeler = iterative.yes_no_labeler(config, policy())
  pictures = {}
  for c in candidates:
    if c["image"] is not None and c["image"] not in pictures:
      pictures[c["image"]] = images_lib.load_image(str(prompts_dir / c["image"]))
  scores = labeler.score(
    [f"{c['response']} {QUESTION}" for c in candidates],
    [None if c["image"] is None else pictures[c["image"]] for c in candidates],
  )
  records = [
    {key: c[key] for key in ("id", "prompt_id", "question", "image", "response")}
    | {"score": float(p), "status": "ok"}
    for c, p in zip(candidates, scores.p_yes, strict=True)
  ]
  with open(out_path, "w", encoding="utf-8") as f:
    jsonl.append_jsonl(f, records)


def loop_config(folder: str, prompts: str, sizes: Sequence[int] = MESH_SIZES):
  """One round, 4 prompts x 2 samples of 4 tokens, P(yes) feedback, one DPO step, no eval;
  the loop's models and DPO on a mesh of `sizes` over all devices."""
  config = shapes_iterative_dpo.get_config("feedback=rlaifv,runlocal")
  config.init_from, config.rounds, config.data.template = folder, 1, TEMPLATE
  config.prompts.update(source="prompts_jsonl", path=prompts, num_per_round=NUM_PROMPTS)
  config.sampling.update(num_samples=2, max_new_tokens=4, temperature=1.0)
  config.feedback.update(kind="yes_probability", batch_size=4, question_suffix="")
  config.feedback.yes_words, config.feedback.no_words = ("yes", "Yes"), ("no", "No")
  config.mesh.update(sizes=tuple(sizes), num_devices=0)
  config.eval.kind = "none"
  t = config.train
  t.batch_size, t.total_steps, t.checkpoint_every, t.log_every = NUM_PROMPTS, 1, 1, 1
  t.optim.lr, t.optim.warmup_steps = 1e-2, 0
  t.data.buckets, t.data.max_length = (256,), 256
  t.mesh.sizes, t.mesh.num_devices = tuple(sizes), 0
  config.epochs_per_round = 0.0
  return config


def main(argv: Sequence[str]) -> None:
  folder, prompts, workdir, out_json = argv
  sharding.initialize_distributed()
  assert jax.process_count() == 2 and jax.device_count() == 8, (jax.process_count(), jax.devices())
  config = loop_config(folder, prompts)
  first = iterative.run(config, workdir)
  # Every stage is done now: a rerun skips them all on every process and reads the same files.
  again = iterative.run(config, workdir)
  result = {"process_index": jax.process_index(), "summary": first, "rerun": again}
  pathlib.Path(out_json).write_text(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
  main(sys.argv[1:])
