"""DPO end to end on shapes-world pairs, from an exported SFT policy."""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import pytest

from configs.shapes import dpo as shapes_dpo
from lmm_align import main
from lmm_align.data import preference
from lmm_align.trainers import dpo


@pytest.fixture(scope="module")
def sft_policy(shapes_sft_policy):
  return shapes_sft_policy


def _dpo_config(policy, **overrides):
  config = shapes_dpo.get_config("runlocal")
  config.init_from = str(policy)
  config.eval.enabled = False
  config.total_steps = 2
  config.checkpoint_every = 2
  config.optim.warmup_steps = 0
  config.optim.lr = 1e-3
  return main.apply_overrides(config, overrides)


def _metrics(workdir):
  return [json.loads(x) for x in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_cached_and_on_the_fly_reference_give_the_same_losses(tmp_path, sft_policy):
  dpo.train(_dpo_config(sft_policy), str(tmp_path / "cached"))
  dpo.train(_dpo_config(sft_policy, **{"dpo.precompute_reference": False}), str(tmp_path / "live"))
  cached, live = _metrics(tmp_path / "cached"), _metrics(tmp_path / "live")
  # Step 1: policy == reference, so every pair's margin is 0 and the sigmoid loss is log 2.
  assert cached[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
  np.testing.assert_allclose([m["loss"] for m in live], [m["loss"] for m in cached], atol=1e-5)
  np.testing.assert_allclose(
    [m["rewards/margin"] for m in live], [m["rewards/margin"] for m in cached], atol=1e-5
  )
  assert cached[1]["rewards/margin"] > 0  # one step of DPO already prefers the truthful captions


def test_lora_dpo_reference_is_the_base(tmp_path, sft_policy):
  config = _dpo_config(
    sft_policy, **{"lora.rank": 4, "dpo.precompute_reference": False, "optim.lr": 1e-3}
  )
  dpo.train(config, str(tmp_path / "lora"))
  metrics = _metrics(tmp_path / "lora")
  assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
  assert (tmp_path / "lora" / "checkpoints" / "2").is_dir()


def test_bad_pairs_are_refused_naming_the_record(sft_policy):
  from lmm_align.data.tokenizer import load_tokenizer

  tokenizer = load_tokenizer(sft_policy)
  good = {
    "id": "r1",
    "image": None,
    "question": "Describe the image.",
    "chosen": "A red circle.",
    "rejected": "A blue star.",
  }
  pair = preference.encode_pair(good, tokenizer, "vicuna_v1", 9, 4)
  assert pair.chosen_ids.tolist() != pair.rejected_ids.tolist()
  with pytest.raises(preference.PreferenceError, match="'r2'.*identical"):
    preference.encode_pair(
      dict(good, id="r2", rejected="A red circle."), tokenizer, "vicuna_v1", 9, 4
    )
  with pytest.raises(preference.PreferenceError, match="'r3', field 'chosen': empty"):
    preference.encode_pair(dict(good, id="r3", chosen="  "), tokenizer, "vicuna_v1", 9, 4)
  assert pair.sft_weight == 1.0
  assert (
    preference.encode_pair(dict(good, sft_weight=0), tokenizer, "vicuna_v1", 9, 4).sft_weight == 0
  )
  for bad in (-1.0, float("nan"), "1", True):
    with pytest.raises(preference.PreferenceError, match="'r4', field 'sft_weight'"):
      preference.encode_pair(dict(good, id="r4", sft_weight=bad), tokenizer, "vicuna_v1", 9, 4)


def test_dense_weighted_dpo_on_the_2x2x2_mesh_equals_one_device(tmp_path, sft_policy):
  weighted = {"dpo.token_weight": 3.0}
  dpo.train(
    _dpo_config(sft_policy, **weighted, **{"mesh.sizes": (1, 1, 1), "mesh.num_devices": 1}),
    str(tmp_path / "one"),
  )
  dpo.train(
    _dpo_config(sft_policy, **weighted, **{"mesh.sizes": (2, 2, 2)}), str(tmp_path / "mesh")
  )
  one, mesh = _metrics(tmp_path / "one"), _metrics(tmp_path / "mesh")
  for key in ("loss", "rewards/margin", "rewards/chosen", "grad_norm"):
    np.testing.assert_allclose(
      [m[key] for m in mesh], [m[key] for m in one], atol=2e-5, err_msg=key
    )


def test_pairs_jsonl_source_loads_images_and_skips_bad_pairs_when_asked(tmp_path, sft_policy):
  from PIL import Image

  from lmm_align.data.tokenizer import load_tokenizer
  from lmm_align.hf import read_config
  from lmm_align.models.hf_config import from_hf_config

  Image.new("RGB", (48, 48), (255, 0, 0)).save(tmp_path / "red.png")
  rows = [
    {"id": "a", "image": "red.png", "question": "Describe the image.",
     "chosen": "A red image.", "rejected": "A blue star."},
    {"id": "b", "image": "red.png", "question": "Describe the image.",
     "chosen": "Same.", "rejected": "Same."},
  ]  # fmt: skip
  (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  config = _dpo_config(sft_policy, **{
      "data.source": "pairs_jsonl", "data.path": str(tmp_path / "pairs.jsonl"),
      "data.image_folder": str(tmp_path), "data.on_error": "skip",
  })  # fmt: skip
  tokenizer = load_tokenizer(sft_policy)
  model_config = from_hf_config(read_config(sft_policy))
  data = dpo.preference_data(config, tokenizer, model_config)
  assert len(data) == 1 and data.stats["skipped_bad_pair"] == 1
  batch = data.rows(np.array([0]))
  red = batch["pixel_values"][0, 0, 0]
  assert red[..., 0].mean() > red[..., 2].mean()  # the file's image reached the batch
  with pytest.raises(preference.PreferenceError, match="'b'"):
    dpo.preference_data(
      main.apply_overrides(config, {"data.on_error": "raise"}), tokenizer, model_config
    )


def _write_shapes_pairs(folder: pathlib.Path, n: int, sft_weights=None) -> pathlib.Path:
  """n ground-truth shapes pairs as a pairs JSONL with PNGs beside it."""
  from lmm_align.shapes import data as shapes_data

  config = shapes_dpo.get_config("runlocal")
  records = shapes_data.preference_records(n, shapes_data.world_config(config.data), seed=1)
  folder.mkdir(parents=True, exist_ok=True)
  lines = []
  for i, r in enumerate(records):
    r["image"].save(folder / f"{i}.png")
    row = {**r, "image": f"{i}.png"}
    if sft_weights is not None:
      row["sft_weight"] = sft_weights[i]
    lines.append(json.dumps(row))
  (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
  return folder / "pairs.jsonl"


def test_per_pair_sft_weights_select_which_chosen_answers_the_sft_term_imitates(
  tmp_path, sft_policy
):
  n = 8  # one batch of the runlocal config: every step sees every pair

  def run(name, sft_weight, pair_weights):
    path = _write_shapes_pairs(tmp_path / name, n, pair_weights)
    config = _dpo_config(sft_policy, **{
        "data.source": "pairs_jsonl", "data.path": str(path),
        "data.image_folder": str(path.parent), "dpo.sft_weight": sft_weight,
    })  # fmt: skip
    dpo.train(config, str(tmp_path / name / "run"))
    return _metrics(tmp_path / name / "run")

  plain = run("plain", 0.0, None)
  none_imitated = run("none", 0.5, [0.0] * n)
  half = run("half", 0.5, [1.0, 0.0] * (n // 2))
  # Pairs weighted 0 leave the run exactly as without the SFT term.
  for key in ("loss", "rewards/margin", "grad_norm"):
    np.testing.assert_allclose(
      [m[key] for m in none_imitated], [m[key] for m in plain], atol=1e-6, err_msg=key
    )
  # Half the pairs weighted 1: the SFT term is the mean over the batch of the weighted NLLs,
  # i.e. half the mean NLL of the imitated chosen answers; at step 1 policy == reference.
  assert half[0]["preference_loss"] == pytest.approx(math.log(2), abs=1e-5)
  assert half[0]["loss"] == pytest.approx(math.log(2) + 0.5 * half[0]["sft_loss"], abs=1e-5)
  assert 0 < half[0]["sft_loss"] < -half[0]["logps/chosen"]
