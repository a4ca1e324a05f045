"""The iterative loop's registries: a plugin's round prompts and feedback kind drive the
prompts, feedback and pairs stages (no model), and unknown or mismatched names are refused
naming the registered ones."""

from __future__ import annotations

import json

import pytest

from configs.shapes import iterative_dpo as shapes_iterative_dpo
from lmm_align.feedback import registry
from lmm_align.trainers import iterative


def _annotate(pairs, prompts_dir):
  targets = {r["id"]: r["target"] for r in map(json.loads, (prompts_dir / "prompts.jsonl").open())}
  for pair in pairs:
    pair["target"] = targets[pair["id"].split("#")[0]]
  return {"annotated": len(pairs)}


@registry.register_prompts("test_words", annotate_pairs=_annotate)
def _write_words(config, round_index, out):
  return [
    {"id": f"r{round_index}p{i}", "question": "Say words.", "image": None, "target": i + 2}
    for i in range(2)
  ]


@registry.register_kind("test_word_count", pair_method="rlaifv", prompt_sources=("test_words",))
def _label_word_count(config, policy, candidates, prompts_dir, out_path):
  """score = -|words - the prompt's target|: a toy oracle over the prompt records."""
  targets = {r["id"]: r["target"] for r in map(json.loads, (prompts_dir / "prompts.jsonl").open())}
  with open(out_path, "w") as f:
    for c in candidates:
      score = -abs(len(c["response"].split()) - targets[c["prompt_id"]])
      f.write(
        json.dumps({**c, "score": score, "status": "ok", "num_claims": 1, "num_judged": 1}) + "\n"
      )


def test_a_plugin_round_prompt_source_and_feedback_kind_run_the_stages(tmp_path):
  config = shapes_iterative_dpo.get_config("runlocal")
  config.init_from = "/policy"
  config.prompts.source, config.feedback.kind = "test_words", "test_word_count"
  config.pairs.balance_lengths = False
  iterative.check_config(config)
  assert "test_word_count" in iterative.feedback_kinds()
  prompts_dir, feedback_dir, pairs_dir = (tmp_path / d for d in ("prompts", "feedback", "pairs"))
  for d in (prompts_dir, feedback_dir, pairs_dir):
    d.mkdir()
  iterative.write_prompts(config, 3, prompts_dir)
  prompts = [json.loads(x) for x in (prompts_dir / "prompts.jsonl").open()]
  assert [(p["id"], p["target"]) for p in prompts] == [("r3p0", 2), ("r3p1", 3)]
  candidates = [
    {"id": f"{p['id']}#{k}", "prompt_id": p["id"], "question": p["question"], "image": None,
     "sample_index": k, "response": text}
    for p in prompts for k, text in enumerate(["a b", "a b c d"])
  ]  # fmt: skip
  iterative.run_feedback(config, lambda: None, candidates, prompts_dir, feedback_dir)
  labelled = [json.loads(x) for x in (feedback_dir / "labelled.jsonl").open()]
  assert [r["score"] for r in labelled] == [0, -2, -1, -1]
  iterative.make_pairs(config, 3, feedback_dir / "labelled.jsonl", prompts_dir, pairs_dir)
  pairs = [json.loads(x) for x in (pairs_dir / "pairs.jsonl").open()]
  # r3p0: "a b" (2 words, target 2) beats "a b c d"; r3p1's two answers tie: no pair.
  assert [(p["chosen"], p["rejected"], p["target"]) for p in pairs] == [("a b", "a b c d", 2)]
  stats = json.loads((pairs_dir / "stats.json").read_text())
  assert stats["method"] == "rlaifv" and stats["ground_truth"] == {"annotated": 1}


def test_unknown_or_mismatched_names_are_refused_naming_the_registered_ones():
  config = shapes_iterative_dpo.get_config("runlocal")
  config.init_from = "/policy"
  config.feedback.kind = "nope"
  with pytest.raises(ValueError, match=r"feedback.kind 'nope': use one of \[.*'correction'.*"):
    iterative.check_config(config)
  assert {"rlaifv", "self", "critic", "ground_truth", "correction"} <= set(
    registry.kind_names()
  )  # the loop's own and the shapes plugin's
  config.feedback.kind = "ground_truth"  # reads scenes: shapes prompts only
  config.prompts.source = "rlaifv_jsonl"
  with pytest.raises(ValueError, match="prompts.source shapes; prompts.source='rlaifv_jsonl'"):
    iterative.check_config(config)
  with pytest.raises(ValueError, match="pair_method 'pairwise'"):
    registry.register_kind("test_bad", pair_method="pairwise")
  assert registry.round_prompts("rlaifv_jsonl") is None  # a data.registry source
  assert registry.round_prompts("shapes").annotate_pairs is not None
