"""PPO end to end on shapes prompts: SFT policy -> reward model -> PPO, on one device and on the
2x2x2 mesh, with a restart in the middle; the reward-model export and loader."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from configs.shapes import ppo as shapes_ppo
from configs.shapes import reward as shapes_reward
from lmm_align import main
from lmm_align.hf.reward import load_reward_model
from lmm_align.trainers import ppo, reward


@pytest.fixture(scope="module")
def models(tmp_path_factory, shapes_sft_policy):
  root = tmp_path_factory.mktemp("ppo")
  (root / "sft_hf").symlink_to(shapes_sft_policy)
  rm_config = shapes_reward.get_config("runlocal")
  rm_config.init_from = str(root / "sft_hf")
  rm_config.total_steps = 2
  summary = reward.train(rm_config, str(root / "rm"))
  reward.export_reward_workdir(str(root / "rm"), str(root / "rm_hf"))
  return root, summary


def _config(root, **overrides):
  config = shapes_ppo.get_config("runlocal")
  config.init_from = str(root / "sft_hf")
  config.ppo.reward_model = str(root / "rm_hf")
  config.eval.enabled = False
  config.optim.schedule = "constant"  # the restart below changes total_steps
  config.optim.warmup_steps = 0
  config.optim.lr = 1e-3
  return main.apply_overrides(config, overrides)


@pytest.fixture(scope="module")
def one_iteration(models, tmp_path_factory):
  """One PPO iteration on one device: the sparse run the export and segment tests share."""
  root, _ = models
  workdir = tmp_path_factory.mktemp("ppo_one") / "run"
  ppo.train(_config(root, **_ONE_ITERATION), str(workdir))
  return workdir


_ONE_ITERATION = {"mesh.sizes": (1, 1, 1), "mesh.num_devices": 1, "total_steps": 1}


def _metrics(workdir):
  return [json.loads(x) for x in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_reward_run_reports_held_out_accuracy_and_exports_a_loadable_head(models):
  root, summary = models
  assert summary["eval_pairs"] > 0 and 0.0 <= summary["eval_accuracy"] <= 1.0
  rm = load_reward_model(str(root / "rm_hf"))
  assert rm.fact_augmented and "{factual_prompt}" in rm.prompt
  assert rm.head["kernel"].shape == (rm.model.config.text.hidden_size,)
  import torch
  from safetensors.torch import load_file

  linear = torch.nn.Linear(rm.model.config.text.hidden_size, 1)
  linear.load_state_dict(load_file(str(root / "rm_hf" / "reward_head.safetensors")))
  np.testing.assert_allclose(linear.weight.detach().numpy()[0], rm.head["kernel"])


def test_mesh_equals_one_device_and_a_restart_continues_exactly(models, tmp_path):
  root, _ = models
  one = {"mesh.sizes": (1, 1, 1), "mesh.num_devices": 1}
  # An adaptive KL coefficient (a horizon of one rollout batch, so it moves by up to 20%) is
  # run state the restart must carry over.
  adaptive = {"ppo.kl_target": 0.05, "ppo.kl_horizon": 8}
  ppo.train(_config(root, total_steps=1, **one, **adaptive), str(tmp_path / "one"))
  ppo.train(_config(root, total_steps=2, **one, **adaptive), str(tmp_path / "one"))  # restarts
  ppo.train(
    _config(root, total_steps=2, **{"mesh.sizes": (2, 2, 2)}, **adaptive), str(tmp_path / "mesh")
  )
  restarted, mesh = _metrics(tmp_path / "one"), _metrics(tmp_path / "mesh")
  assert [m["step"] for m in restarted] == [1, 2] == [m["step"] for m in mesh]
  # The policy's LoRA starts at zero and the reference is its base: no KL on the first rollout.
  assert restarted[0]["kl"] == pytest.approx(0.0, abs=1e-6)
  rollouts = _config(root).ppo.rollout_batch_size
  assert restarted[0]["kl_coef"] == pytest.approx(0.1)
  # KL 0 is far under the target: the controller's error clips at -0.2.
  assert restarted[1]["kl_coef"] == pytest.approx(0.1 * (1 - 0.2 * rollouts / 8))
  for key in ("reward/score", "reward/rm", "kl", "kl_coef", "loss", "policy_loss", "value_loss"):
    np.testing.assert_allclose(
      [m[key] for m in restarted], [m[key] for m in mesh], atol=2e-4, rtol=1e-3, err_msg=key
    )
  assert mesh[1]["kl"] != 0.0  # the update moved the policy


def test_vanilla_policy_with_a_fact_reward_model_is_refused(models, tmp_path):
  root, _ = models
  with pytest.raises(ValueError, match="fact_augmented"):
    # One device: the step batch divides it (checked before the reward model is read).
    ppo.train(
      _config(root, **{"ppo.fact_augmented": False, **_ONE_ITERATION}), str(tmp_path / "bad")
    )


def test_a_bad_kl_target_is_refused_before_training(models, tmp_path):
  root, _ = models
  for bad in ({"ppo.kl_target": -1.0}, {"ppo.kl_target": 6.0, "ppo.kl_horizon": 0}):
    with pytest.raises(ValueError, match="ppo.kl_target"):
      ppo.train(_config(root, **bad), str(tmp_path / "bad_kl"))


def test_export_writes_the_trained_policy(models, one_iteration, tmp_path):
  """`lmm-align export` of a PPO run: the policy's LoRA merged into an HF folder whose logits
  are the trained policy's (the value model is not exported)."""
  from lmm_align import hf, run_config
  from lmm_align.models.llava import Llava, dummy_inputs
  from lmm_align.models.lora import model_variables
  from lmm_align.trainers import export

  export.export_workdir(str(one_iteration), str(tmp_path / "hf"))
  config = run_config.load_workdir_config(str(one_iteration))
  tokenizer = export.sources.tokenizer_for(config, str(one_iteration))
  policy_model = Llava(run_config.model_config_for(config, tokenizer))
  policy, base, _ = ppo.restore_policy(config, str(one_iteration), policy_model)
  assert base is not None  # LoRA: the merge is what the folder holds
  ids, pixels = dummy_inputs(policy_model.config, batch=2)
  ids = ids.at[:, -4:].set(np.arange(4) + 10)
  trained = policy_model.apply(model_variables(policy, base), ids, pixel_values=pixels).logits
  exported_model, exported = hf.load_pretrained(str(tmp_path / "hf"))
  loaded = exported_model.apply({"params": exported}, ids, pixel_values=pixels).logits
  np.testing.assert_allclose(np.asarray(loaded), np.asarray(trained), atol=1e-4)
  untrained = (
    ppo.plain_or(policy_model, {"params": base})
    .apply({"params": base}, ids, pixel_values=pixels)
    .logits
  )
  assert np.abs(np.asarray(trained) - np.asarray(untrained)).max() > 1e-4  # the LoRA moved


def test_prompts_without_a_scene_fail_or_are_counted_before_training(models, monkeypatch, tmp_path):
  """ppo.reward_source=scene needs every prompt's scene: checked when the prompts are read,
  naming the record and field, or skipped and counted with data.on_error=skip."""
  from collections import Counter

  from lmm_align import run_config
  from lmm_align.data import sources

  root, _ = models
  config = _config(root, **{"ppo.reward_source": "scene"})
  tokenizer = sources.tokenizer_for(config, str(tmp_path))
  model_config = run_config.model_config_for(config, tokenizer)
  records, _ = ppo.prompt_records(config)
  assert all(r.get("scene") for r in records)  # shapes prompts carry their scene
  without = [dict(r, scene=None) if i == 1 else r for i, r in enumerate(records[:4])]
  monkeypatch.setattr(ppo, "prompt_records", lambda c: (without, Counter()))
  with pytest.raises(ValueError, match=rf"{without[1]['id']!r}, field 'scene'"):
    ppo.prompt_data(config, tokenizer, model_config)
  config.data.on_error = "skip"
  data = ppo.prompt_data(config, tokenizer, model_config)
  assert data.stats == {"kept": 3, "skipped_no_scene": 1}
  assert [p.record_id for p in data.prompts] == [r["id"] for i, r in enumerate(without) if i != 1]
  config.ppo.reward_source = "model"  # the reward model does not read the scene
  data = ppo.prompt_data(config, tokenizer, model_config)
  assert len(data) == 4 and [p.truth.get("scene") for p in data.prompts] == [
    r["scene"] for r in without
  ]  # the oracles' fields ride along, for the monitor
  config.ppo.reward_source = "no_such_oracle"
  with pytest.raises(ValueError, match="ppo.reward_source='no_such_oracle'.*oracle: .*scene"):
    ppo.train(config, str(tmp_path / "unknown"))


def test_rollout_prompts_repeat_each_prompt_in_consecutive_rows():
  import ml_collections

  prompts = [
    ppo.Prompt(f"p{i}", "q", np.zeros(1, np.int32), None, 0, 1.0, [], None) for i in range(8)
  ]
  data = ppo.PromptData(prompts, seed=0, stats={})
  knobs = ml_collections.ConfigDict(dict(rollout_batch_size=8, samples_per_prompt=4))
  rows = [p.record_id for p in ppo.rollout_prompts(data, 3, knobs)]
  firsts = [p.record_id for p in data.batch(3, 2)]
  assert rows == [firsts[0]] * 4 + [firsts[1]] * 4
  knobs.samples_per_prompt = 1
  assert [p.record_id for p in ppo.rollout_prompts(data, 3, knobs)] == [
    p.record_id for p in data.batch(3, 8)
  ]


def test_segment_rewards_keep_each_score_and_change_only_where_it_is_paid(
  models, one_iteration, tmp_path
):
  """ppo.dense_reward=segments scores every prefix; the last one is the whole response with the
  same fact order, so the sequence scores equal the sparse run's on the same rollouts, while
  the per-token rewards, and so the update, differ."""
  root, _ = models
  one = _ONE_ITERATION
  ppo.train(_config(root, **one, **{"ppo.dense_reward": "segments"}), str(tmp_path / "dense"))
  (sparse,), (dense,) = _metrics(one_iteration), _metrics(tmp_path / "dense")
  for key in ("reward/score", "reward/rm", "kl", "response_tokens"):
    assert dense[key] == pytest.approx(sparse[key], rel=1e-4, abs=1e-5), key
  assert dense["reward/segments"] >= 1.0 and "reward/segments" not in sparse
  assert dense["reward/scene"] == pytest.approx(sparse["reward/scene"])  # the monitor's
  assert -1.0 <= sparse["reward/rm_scene_corr"] <= 1.0
  assert dense["policy_loss"] != pytest.approx(sparse["policy_loss"], rel=1e-3)
  bad = (
    ({"ppo.dense_reward": "tokens"}, "dense_reward"),
    ({"ppo.dense_reward": "segments", "ppo.segment_separators": ()}, "segment_separators"),
    ({"ppo.yes_no_fraction": 1.5}, "yes_no_fraction"),
  )
  for fields, message in bad:
    with pytest.raises(ValueError, match=message):
      ppo.train(_config(root, **one, **fields), str(tmp_path / "bad"))


def test_scene_reward_is_the_monitor_score_of_the_same_rollouts(models, one_iteration, tmp_path):
  """reward_source=scene, sparse (scored from the rollout's decoded texts) and by segments (each
  prefix decoded; the last is the whole response): on the same rollouts both pay what the
  model-reward run's scene monitor measured."""
  root, _ = models
  scene = {**_ONE_ITERATION, "ppo.reward_source": "scene"}
  ppo.train(_config(root, **scene), str(tmp_path / "sparse"))
  ppo.train(_config(root, **scene, **{"ppo.dense_reward": "segments"}), str(tmp_path / "dense"))
  (monitored,) = _metrics(one_iteration)
  for run in ("sparse", "dense"):
    (m,) = _metrics(tmp_path / run)
    assert m["reward/rm"] == pytest.approx(monitored["reward/scene"], abs=1e-6), run
    assert m["response_tokens"] == monitored["response_tokens"], run


@pytest.mark.parametrize("fraction, describe", [(0.0, 32), (1.0, 0)])
def test_yes_no_fraction_sets_the_share_of_existence_questions(fraction, describe):
  config = shapes_ppo.get_config("runlocal")
  config.ppo.yes_no_fraction = fraction
  records, _ = ppo.prompt_records(config)
  assert sum(r["question"] == "Describe the image." for r in records) == describe
  assert len(records) == config.data.shapes.num_train == 32
