"""experiments/shapes_policy_reward_pairs.py: scene-ordered RM pairs from a loop round."""

from __future__ import annotations

import json
import pathlib

import pytest

from experiments import shapes_policy_reward_pairs as experiment
from lmm_align.data import preference_sources
from lmm_align.shapes import world as shapes
from lmm_align.shapes.data import scene_facts

SCENE = shapes.Scene(
  (
    shapes.SceneObject("circle", "red", "small", 0, 0),
    shapes.SceneObject("star", "blue", "large", 1, 1),
  )
)


def _round(tmp_path: pathlib.Path, responses: list[str], prompt_id: str = "p") -> pathlib.Path:
  round_dir = tmp_path / "round_2"
  (round_dir / "prompts").mkdir(parents=True)
  (round_dir / "candidates").mkdir()
  prompt = {"id": "p", "question": "Describe the image.", "image": "images/p.png",
            "scene": SCENE.to_dict()}  # fmt: skip
  (round_dir / "prompts" / "prompts.jsonl").write_text(json.dumps(prompt) + "\n")
  lines = [
    json.dumps(
      {
        "id": f"{prompt_id}#{k}",
        "prompt_id": prompt_id,
        "question": "Describe the image.",
        "image": "images/p.png",
        "sample_index": k,
        "response": text,
        "num_tokens": 9,
        "seed": 0,
        "sampling": {},
      }
    )  # fmt: skip
    for k, text in enumerate(responses)
  ]
  (round_dir / "candidates" / "candidates.jsonl").write_text("\n".join(lines) + "\n")
  return round_dir


def test_pairs_follow_the_scene_score(tmp_path):
  # Scene scores at recall weight 0.5: -(hallucinated) + 0.5 * recalled.
  responses = [
    "A red circle and a blue star.",  # 0 + 1.0 = 1.0
    "A red circle and a green cross.",  # -1 + 0.5 = -0.5
    "A red circle.",  # 0 + 0.5 = 0.5 (gap 0.5 to the first: below 1, no pair)
    "A green cross and a yellow square.",  # -2
  ]
  round_dir = _round(tmp_path, responses)
  out = tmp_path / "pairs.jsonl"
  report = experiment.main([str(round_dir), f"--out={out}"])
  pairs = [json.loads(line) for line in out.read_text().splitlines()]
  got = {(p["chosen"], p["rejected"]) for p in pairs}
  want = {(responses[i], responses[j]) for i, j in ((0, 1), (0, 3), (1, 3), (2, 1), (2, 3))}
  assert got == want
  assert report["pairs"] == 5 and report["pairs_small_gap"] == 1 and report["candidates"] == 4
  for p in pairs:
    assert p["facts"] == scene_facts(SCENE)
    assert p["image"] == str((round_dir / "prompts" / "images" / "p.png").resolve())
    assert p["chosen_score"] - p["rejected_score"] >= 1
  # The written file is what the reward trainer's pairs_jsonl source reads.
  assert len(preference_sources.read_pairs_jsonl(str(out))) == 5


def test_bad_rounds_are_named(tmp_path):
  round_dir = _round(tmp_path, ["A red circle."], prompt_id="q")
  with pytest.raises(SystemExit, match="candidate 'q#0', prompt_id 'q' has no scene"):
    experiment.main([str(round_dir), f"--out={tmp_path / 'x.jsonl'}"])
  with pytest.raises(SystemExit, match="no prompts/prompts.jsonl"):
    experiment.main([str(tmp_path / "nowhere"), f"--out={tmp_path / 'x.jsonl'}"])


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory) -> pathlib.Path:
  from lmm_align.data.tokenizer import train_bpe_tokenizer

  folder = tmp_path_factory.mktemp("tokenizer")
  corpus = ["A red circle, a green cross and a blue star. A yellow square; a red circle."] * 4
  train_bpe_tokenizer(corpus, vocab_size=300, out_dir=folder)
  return folder


def test_prefix_pairs_follow_the_scene_increments(tmp_path, tokenizer_folder):
  from lmm_align.data.tokenizer import load_tokenizer

  # Prefixes (cut before "," "." ";" "and"), scores at recall weight 0.5:
  #   "A red circle" 0.5 | ", a green cross" -0.5 | " and a blue star" 0.0 | "." 0.0
  response = "A red circle, a green cross and a blue star."
  round_dir = _round(tmp_path, [response])
  candidates = [json.loads(x) for x in (round_dir / "candidates" / "candidates.jsonl").open()]
  pairs, stats = experiment.prefix_pairs(
    candidates, {"p": SCENE}, load_tokenizer(tokenizer_folder), 0.5, 0.5
  )
  got = [(p["chosen"], p["rejected"], p["chosen_score"], p["rejected_score"]) for p in pairs]
  assert got == [
    ("A red circle", "A red circle, a green cross", 0.5, -0.5),  # a wrong object: shorter wins
    ("A red circle, a green cross and a blue star", "A red circle, a green cross", 0.0, -0.5),
  ]
  assert [p["id"] for p in pairs] == ["p#0@1", "p#0@2"]
  assert stats == {"prefix_pairs_shorter_chosen": 1, "prefix_pairs_longer_chosen": 1,
                   "prefix_pairs_small_gap": 1}  # fmt: skip


def test_prefix_pairs_balanced_held_out_and_capped(tmp_path, tokenizer_folder):
  responses = [
    "A red circle and a blue star.",  # prefixes 0.5, 1.0, 1.0: one longer-chosen pair
    "A red circle, a blue star.",  # the same: one longer-chosen pair
    "A red circle, a green cross.",  # 0.5, -0.5, -0.5: one shorter-chosen pair
  ]
  round_dir = _round(tmp_path, responses)
  out = tmp_path / "pairs.jsonl"
  args = [str(round_dir), f"--out={out}", "--prefix_pairs", f"--tokenizer={tokenizer_folder}"]
  report = experiment.main(args)
  pairs = [json.loads(line) for line in out.read_text().splitlines()]
  prefix = [p for p in pairs if "@" in p["id"]]
  longer = [p for p in prefix if len(p["chosen"]) > len(p["rejected"])]
  assert len(prefix) == 2 and len(longer) == 1  # one of the two longer-chosen pairs dropped
  assert report["prefix_pairs_over_balance"] == 1
  assert report["response_pairs"] == 2  # (0, 2) and (1, 2): gap 1.5
  assert report["pairs"] == len(pairs) == 4
  for p in prefix:
    assert p["facts"] == scene_facts(SCENE)
  capped = experiment.main([*args, "--max_pairs=3"])
  assert capped["pairs"] == 3 and capped["pairs_over_max"] == 1
  fewer_whole = experiment.main([*args, "--max_response_pairs=1"])
  kept = [json.loads(line)["id"] for line in out.read_text().splitlines()]
  assert fewer_whole["pairs"] == 3 and fewer_whole["response_pairs_over_max"] == 1
  assert sum("@" in i for i in kept) == 2  # the prefix pairs all kept
  held_out = experiment.main([*args, "--holdout_prompts=1"])
  assert held_out["pairs"] == 0 and held_out["held_out_prompts"] == 1
  with pytest.raises(SystemExit):  # the prefixes need the tokenizer
    experiment.main([str(round_dir), f"--out={out}", "--prefix_pairs"])
