"""experiments/shapes_reward_on_policy.py: the on-policy RM report, by hand and end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import shapes_reward_on_policy as experiment
from lmm_align.shapes import world as shapes

SCENE = shapes.Scene(
  (
    shapes.SceneObject("circle", "red", "small", 0, 0),
    shapes.SceneObject("star", "blue", "large", 1, 1),
  )
).to_dict()


def test_summary_by_hand():
  # Prompt p, two samples; prefixes in order, each response's last prefix is all of it.
  meta = [
    ("p", 0, "A red circle"),  # right object: truth 0 -> 0.5
    ("p", 0, "A red circle and a green square."),  # wrong object: truth 0.5 -> -0.5
    ("p", 1, "A red circle"),  # right
    ("p", 1, "A red circle and a blue star."),  # right: truth 0.5 -> 1.0
  ]
  rm = np.array([1.0, 0.5, 2.0, 1.5])  # increments: +1, -0.5 | +2, -0.5
  report = experiment.summarize(meta, rm, {"p": SCENE}, recall_weight=0.5)
  assert (report["prompts"], report["responses"], report["prefixes"]) == (1, 2, 4)
  # Sample 1 is better by the scene (1.0 vs -0.5) and by the RM (1.5 vs 0.5).
  assert report["ordered_pairs"] == 1 and report["pair_agreement"] == 1.0
  seg = report["segments"]
  assert seg["wrong_object"] == {
    "count": 1, "rm_down_share": 1.0, "rm_up_share": 0.0, "rm_mean_increment": -0.5
  }  # fmt: skip
  assert seg["right_object"]["count"] == 3
  assert seg["right_object"]["rm_up_share"] == pytest.approx(2 / 3)
  assert seg["right_object"]["rm_mean_increment"] == pytest.approx((1.0 + 2.0 - 0.5) / 3)
  assert "other" not in seg


def test_swapped_facts_come_from_the_next_prompt():
  assert experiment.facts_sources(["a", "b", "c"], "own") == {"a": "a", "b": "b", "c": "c"}
  assert experiment.facts_sources(["a", "b", "c"], "swapped") == {"a": "b", "b": "c", "c": "a"}
  with pytest.raises(ValueError, match="at least 2 prompts"):
    experiment.facts_sources(["a"], "swapped")
  with pytest.raises(ValueError, match="use 'own' or 'swapped'"):
    experiment.facts_sources(["a", "b"], "theirs")


def test_end_to_end_on_a_tiny_reward_model(tmp_path, shapes_sft_policy):
  from configs.shapes import reward as shapes_reward
  from lmm_align.trainers import reward

  config = shapes_reward.get_config("runlocal")
  config.init_from = str(shapes_sft_policy)
  config.total_steps = 1
  reward.train(config, str(tmp_path / "rm"))
  reward.export_reward_workdir(str(tmp_path / "rm"), str(tmp_path / "rm_hf"))
  round_dir = tmp_path / "round_1"
  (round_dir / "prompts" / "images").mkdir(parents=True)
  (round_dir / "candidates").mkdir()
  world = shapes.ShapesWorldConfig()
  prompts, candidates = [], []
  for scene in shapes.make_scenes(2, world, seed=5):
    shapes.render(scene, world.image_size).save(
      round_dir / "prompts" / "images" / f"{scene.id}.png"
    )
    prompts.append({"id": scene.id, "question": "Describe the image.",
                    "image": f"images/{scene.id}.png", "scene": scene.to_dict()})  # fmt: skip
    for k, text in enumerate(
      [shapes.scene_caption(scene, np.random.default_rng(0)), "A red circle, a green cross."]
    ):
      candidates.append({"id": f"{scene.id}#{k}", "prompt_id": scene.id, "sample_index": k,
                         "question": "Describe the image.", "response": text, "num_tokens": 9,
                         "seed": 0, "sampling": {}})  # fmt: skip
  (round_dir / "prompts" / "prompts.jsonl").write_text(
    "".join(json.dumps(p) + "\n" for p in prompts)
  )
  (round_dir / "candidates" / "candidates.jsonl").write_text(
    "".join(json.dumps(c) + "\n" for c in candidates)
  )
  argv = [f"--reward_model={tmp_path / 'rm_hf'}", f"--round_dir={round_dir}", "--batch_size=4",
          f"--out={tmp_path / 'report.json'}"]  # fmt: skip
  args = experiment.parse_args(argv)
  report = experiment.run(args)
  assert report == json.loads((tmp_path / "report.json").read_text())
  assert report["prompts"] == 2 and report["responses"] == 4
  assert report["prefixes"] > report["responses"]  # captions have several segments
  assert sum(s["count"] for s in report["segments"].values()) == report["prefixes"]
  assert 0.0 <= report["pair_agreement"] <= 1.0
  swapped = experiment.run(experiment.parse_args([*argv, "--facts=swapped"]))
  assert swapped["facts"] == "swapped" and swapped["prefixes"] == report["prefixes"]
  # Each prompt's caption is scored against the other scene's facts: different RM inputs, so
  # different scores, while the same responses are judged by the other scene too.
  assert swapped["segments"] != report["segments"]
  assert swapped["against_facts_scene"]["prefixes"] == report["prefixes"]
  assert swapped["against_facts_scene"]["segments"] != swapped["segments"]
  (round_dir / "candidates" / "candidates.jsonl").write_text(
    json.dumps({**candidates[0], "id": "c", "prompt_id": "elsewhere"}) + "\n"
  )
  with pytest.raises(ValueError, match="candidate 'c', prompt_id 'elsewhere' is not in prompts"):
    experiment.run(args)
  (round_dir / "candidates" / "candidates.jsonl").write_text(
    json.dumps({k: v for k, v in candidates[0].items() if k != "response"}) + "\n"
  )
  with pytest.raises(ValueError, match=r"line 1 \(id '.*#0'\): field 'response' must be str"):
    experiment.run(args)
  (round_dir / "prompts" / "prompts.jsonl").write_text(
    json.dumps({k: v for k, v in prompts[0].items() if k != "scene"}) + "\n"
  )
  with pytest.raises(
    ValueError, match=r"prompts.jsonl: line 1, prompt '.*': field 'scene' missing"
  ):
    experiment.run(args)
