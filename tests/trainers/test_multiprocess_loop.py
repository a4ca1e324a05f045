"""The iterative loop in two processes on one shared workdir (a pod's hosts on GCS / NFS): two
local processes with 4 CPU devices each, joined by jax.distributed on 127.0.0.1, run one round
(prompts, candidates, feedback on the policy as a sharded labeler, pairs, one DPO step, export)
with the loop's models on a 1x4x2 mesh over the 8 global devices. Only process 0 writes the
stage files: candidates.jsonl holds each record once and equals a one-process, one-device run's
file byte for byte; a rerun skips every stage on both processes."""

from __future__ import annotations

import json
import pathlib
import sys

import local_ranks
import multiprocess_loop_worker as worker
import multiprocess_sampling_worker as sampling_worker
import numpy as np

from lmm_align import inference
from lmm_align.trainers import iterative

STAGES = ("prompts", "candidates", "feedback", "pairs", "dpo", "export", "eval")


def _write_prompts(root: pathlib.Path) -> pathlib.Path:
  """4 prompts over 2 random pictures."""
  paths = []
  for i, picture in enumerate(sampling_worker.pictures()):
    paths.append(root / f"{i}.png")
    picture.save(paths[-1])
  questions = ["Describe the image.", "What is red?", "Is there a cat?", "What shape is it?"]
  records = [
    {"id": f"p{i}", "question": q, "image": str(paths[i % 2])} for i, q in enumerate(questions)
  ]
  path = root / "prompts.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


def _flat(tree) -> dict:
  import jax

  return {
    jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
  }


def test_two_processes_run_a_round_on_a_shared_workdir(tmp_path):
  folder = sampling_worker.write_tiny_llava(tmp_path / "llava")
  prompts = _write_prompts(tmp_path)
  workdir = tmp_path / "shared"
  for rank in range(2):
    (tmp_path / f"tmp_{rank}").mkdir()
  procs = local_ranks.start(
    lambda rank: [sys.executable, worker.__file__, str(folder), str(prompts), str(workdir),
                  str(tmp_path / f"{rank}.json")],
    tmp_path, extra_env=lambda rank: {"TMPDIR": str(tmp_path / f"tmp_{rank}")},
  )  # fmt: skip
  try:
    # The one-process reference of the first two stages, on one device, while they run.
    config = worker.loop_config(str(folder), str(prompts), sizes=(1, 1, 1))
    config.mesh.num_devices = 1
    reference = tmp_path / "reference"
    (reference / "prompts").mkdir(parents=True)
    (reference / "candidates").mkdir()
    iterative.write_prompts(config, 1, reference / "prompts")
    policy = iterative.loop_model(config, str(folder))
    iterative.sample_candidates(config, 1, policy, reference / "prompts", reference / "candidates")
    iterative.load_policy.cache_clear()
    local_ranks.finish(procs, timeout=600)
  finally:
    local_ranks.kill(procs)
  results = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
  assert [r["process_index"] for r in results] == [0, 1]

  round_dir = workdir / "round_1"
  # Each candidate once (process 1 wrote its copy elsewhere), as one device samples them.
  text = (round_dir / "candidates" / "candidates.jsonl").read_text()
  records = [json.loads(line) for line in text.splitlines()]
  ids = [r["id"] for r in records]
  assert sorted(ids) == sorted(f"p{i}#{k}" for i in range(4) for k in range(2))
  assert text == (reference / "candidates" / "candidates.jsonl").read_text()
  assert (round_dir / "prompts" / "prompts.jsonl").read_text() == (
    reference / "prompts" / "prompts.jsonl"
  ).read_text()
  labelled = (round_dir / "feedback" / "labelled.jsonl").read_text().splitlines()
  assert [json.loads(line)["id"] for line in labelled] == ids
  for stage in STAGES:
    assert (round_dir / stage / "done").exists(), stage
  # Process 1's private copies are gone; the workdir holds only what process 0 wrote.
  assert not [p for p in (tmp_path / "tmp_1").iterdir() if p.name.startswith("lmm_align_")]
  assert sorted(p.name for p in workdir.iterdir()) == [
    "config.json", "round_0", "round_1", "summary.json",
  ]  # fmt: skip

  summary = json.loads((round_dir / "summary.json").read_text())
  assert summary["candidates"] == 8
  assert summary["pairs"]["pairs"] == 4
  assert summary["dpo"]["final_step"] == 1
  # Both processes read the same files into the same summaries, and a rerun (every stage
  # done) skips them all on both and returns them again.
  workdir_summary = json.loads((workdir / "summary.json").read_text())
  for result in results:
    assert result["summary"] == result["rerun"] == workdir_summary
  # The export loads, and one DPO step at lr 1e-2 moved the language model's weights.
  exported = inference.load_model_folder(str(round_dir / "export"), template=worker.TEMPLATE)
  start = inference.load_model_folder(str(folder), template=worker.TEMPLATE)
  after, before = _flat(exported.params), _flat(start.params)
  assert after.keys() == before.keys()
  moved = [k for k in after if "language_model" in k and not np.array_equal(after[k], before[k])]
  assert moved
  tower = [k for k in after if "vision_tower" in k]
  assert tower and all(np.array_equal(after[k], before[k]) for k in tower)  # frozen
