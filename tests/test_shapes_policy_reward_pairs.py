"""experiments/shapes_policy_reward_pairs.py: scene-ordered RM pairs from a loop round."""

from __future__ import annotations

import json
import pathlib

import pytest

from experiments import shapes_policy_reward_pairs as experiment
from lmm_align.data import preference_sources, shapes

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
    assert p["facts"] == preference_sources.scene_facts(SCENE)
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
