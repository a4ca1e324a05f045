"""The built-in "pope" evaluation kind: POPE question files (one per split) answered by a
loaded model and scored by the published rule; the files and records it refuses."""

from __future__ import annotations

import json
import types

import ml_collections
import numpy as np
import pytest
from PIL import Image

from lmm_align.evals import kinds, registry


def _pope_config(tmp_path, paths: str, limit: int = 0) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(eval=dict(
    enabled=True, kind="pope", batch_size=2, max_new_tokens=4, limit=limit,
    pope=dict(paths=paths, image_folder=str(tmp_path)),
  )))  # fmt: skip


def _write(tmp_path, name: str, labels: list[str]) -> str:
  lines = []
  for i, label in enumerate(labels):
    Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / f"im{i}.png")
    lines.append(
      json.dumps({"question_id": i, "image": f"im{i}.png", "text": f"q{i}?", "label": label})
    )
  path = tmp_path / name
  path.write_text("\n".join(lines) + "\n")
  return str(path)


@pytest.fixture
def scripted(monkeypatch):
  """Answers from a script instead of a model: {question text: answer}."""
  script: dict[str, str] = {}

  def answer(model, params, tokenizer, image_config, questions, images, **_):
    assert all(isinstance(im, Image.Image) for im in images)
    return [script[q] for q in questions], [1] * len(questions)

  monkeypatch.setattr(kinds, "answer_questions", answer)
  loaded = types.SimpleNamespace(model=None, params=None, tokenizer=None, image_config=object(),
                                 template="vicuna_v1", model_id="scripted")  # fmt: skip
  return script, loaded


def test_pope_kind_scores_each_split_and_their_mean(tmp_path, scripted):
  script, loaded = scripted
  a = _write(tmp_path, "coco_pope_random.json", ["yes", "yes", "no", "no"])
  b = _write(tmp_path, "coco_pope_popular.json", ["yes", "no", "no", "no"])
  # Split 'random' (q0..q3 asked twice, same answers): "No, not" on a yes -> fn; "Yes." on a
  # no -> fp. tp 1, fn 1, fp 1, tn 1: precision = recall = f1 = 0.5, accuracy 0.5.
  script.update({"q0?": "Yes.", "q1?": "No, there is not.", "q2?": "Yes, a star.", "q3?": "no"})
  metrics = registry.evaluate_model(_pope_config(tmp_path, f"{a},{b}"), loaded)
  assert metrics["pope_random/tp"] == 1 and metrics["pope_random/f1"] == 0.5
  # Split 'popular': labels yes, no, no, no -> tp 1, tn 2, fp 1: precision 0.5, recall 1.
  assert (metrics["pope_popular/tp"], metrics["pope_popular/fp"], metrics["pope_popular/tn"]) == (
    1,
    1,
    2,
  )
  assert metrics["pope_popular/f1"] == pytest.approx(2 / 3)
  assert metrics["pope_f1"] == pytest.approx((0.5 + 2 / 3) / 2)
  assert metrics["pope_accuracy"] == pytest.approx((0.5 + 0.75) / 2)
  assert metrics["pope_questions"] == 8
  # A glob gives the same files; limit keeps the first N of each.
  glob_metrics = registry.evaluate_model(
    _pope_config(tmp_path, f"{tmp_path}/coco_pope_*.json"), loaded
  )
  assert glob_metrics == metrics
  two = registry.evaluate_model(_pope_config(tmp_path, a, limit=2), loaded)
  assert two["pope_questions"] == 2 and two["pope_f1"] == pytest.approx(2 / 3)  # tp 1, fn 1


def test_pope_kind_names_bad_files_and_records(tmp_path, scripted):
  _, loaded = scripted
  with pytest.raises(ValueError, match="eval.pope.paths is empty"):
    registry.evaluate_model(_pope_config(tmp_path, ""), loaded)
  with pytest.raises(FileNotFoundError, match="eval.pope.paths: no file"):
    registry.evaluate_model(_pope_config(tmp_path, str(tmp_path / "none_*.json")), loaded)
  bad = _write(tmp_path, "coco_pope_bad.json", ["yes", "maybe"])
  with pytest.raises(ValueError, match=r"coco_pope_bad.json: record 2: field 'label' is 'maybe'"):
    registry.evaluate_model(_pope_config(tmp_path, bad), loaded)
  (tmp_path / "coco_pope_gap.json").write_text(
    json.dumps({"question_id": 0, "image": "im0.png"}) + "\n"
  )
  with pytest.raises(ValueError, match=r"coco_pope_gap.json: record 1: field 'text' is missing"):
    registry.evaluate_model(_pope_config(tmp_path, str(tmp_path / "coco_pope_gap.json")), loaded)
  missing = _write(tmp_path, "coco_pope_lost.json", ["yes"])
  (tmp_path / "im0.png").unlink()
  with pytest.raises(ValueError, match=r"coco_pope_lost.json: record 1: field 'image'"):
    registry.evaluate_model(_pope_config(tmp_path, missing), loaded)
  text_only = types.SimpleNamespace(**{**vars(loaded), "image_config": None})
  with pytest.raises(ValueError, match="text-only model"):
    registry.evaluate_model(_pope_config(tmp_path, missing), text_only)


def test_pope_is_a_builtin_kind():
  assert "pope" in registry.kinds() and registry.get("pope").run is kinds.evaluate_pope
