"""The entry point's sweep, table and override helpers, and the non-finite stop."""

from __future__ import annotations

import json

import pytest

from configs.shapes import sft as shapes_sft
from lmm_align import main
from lmm_align.trainers import loop, sft


def _config():
  config = shapes_sft.get_config("runlocal")
  config.eval.enabled = False
  config.total_steps = 2
  config.checkpoint_every = 2
  return config


def test_apply_overrides_and_unknown_keys():
  config = _config()
  changed = main.apply_overrides(config, {"optim.lr": 0.25, "data.shapes.hallucination_rate": 0.0})
  assert changed.optim.lr == 0.25 and changed.data.shapes.hallucination_rate == 0.0
  assert config.optim.lr != 0.25  # the original is untouched
  with pytest.raises(KeyError, match="optim.nope"):
    main.apply_overrides(config, {"optim.nope": 1})


def test_sweep_runs_each_point_and_prints_a_table(tmp_path, capsys):
  config = _config()
  rows = main.sweep(config, str(tmp_path))
  assert [r["run"] for r in rows] == ["clean_data", "noisy_data"]
  assert (tmp_path / "clean_data" / "summary.json").exists() and (
    tmp_path / "noisy_data" / "config.json"
  ).exists()
  summary = json.loads((tmp_path / "clean_data" / "summary.json").read_text())
  assert summary["data"] == {"kept": config.data.shapes.num_train}  # nothing skipped
  table = capsys.readouterr().out.strip().splitlines()[-3:]
  assert table[0].split()[0] == "run" and "final_train_loss" in table[0]
  assert [line.split()[0] for line in table[1:]] == ["clean_data", "noisy_data"]


def test_non_finite_loss_stops_the_run_naming_the_step(tmp_path):
  config = _config()
  config.total_steps = 6
  config.optim.lr = 1e30
  config.optim.grad_clip_norm = 0.0
  with pytest.raises(loop.NonFiniteError, match=r"step \d+: non-finite"):
    sft.train(config, str(tmp_path))


def test_sweep_prints_tpu_commands(tmp_path, capsys):
  launch = dict(
    name="tpu", zone="us-central2-b", accelerator="v4-32", config_arg="configs/shapes/sft.py"
  )
  assert main.sweep(_config(), "gs://bucket/root", launch) == []
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0] == (
    "launch/tpu_run.sh --name tpu-clean_data --zone us-central2-b --accelerator v4-32 -- "
    "--config=configs/shapes/sft.py --workdir=gs://bucket/root/clean_data --config.data.shapes.hallucination_rate=0.0"
  )
  assert len(lines) == 2


def test_nested_config_loads_from_any_working_directory(tmp_path):
  """configs/<system>/X.py does `from configs import common`: the folder above `configs/` goes
  on sys.path whatever the working directory and however deep the file."""
  import subprocess
  import sys

  root = tmp_path / "checkout"
  (root / "configs" / "system").mkdir(parents=True)
  (root / "configs" / "__init__.py").write_text("")
  (root / "configs" / "common.py").write_text("VALUE = 7\n")
  (root / "configs" / "system" / "recipe.py").write_text(
    "from configs import common\n\n\ndef get_config(arg=None):\n  return {'value': common.VALUE, 'arg': arg}\n"
  )
  code = (
    "from lmm_align import config_files\n"
    f"print(config_files.load_config({str(root / 'configs' / 'system' / 'recipe.py')!r} + ':x'))"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
  )
  assert "'value': 7" in out.stdout and "'arg': 'x'" in out.stdout
