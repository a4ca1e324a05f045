"""SFT end to end on the shapes world: sharded == single device, resume after kill -9 / SIGTERM,
config overrides, export to HF."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs.shapes import sft as shapes_sft
from lmm_align import main
from lmm_align.trainers import sft

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG = "configs/shapes/sft.py:runlocal"


def _config(**overrides):
  config = shapes_sft.get_config("runlocal")
  config.eval.enabled = False
  return main.apply_overrides(config, overrides)


def _losses(workdir) -> list[float]:
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line)["loss"] for line in lines]


def test_sharded_2x2x2_equals_one_device(tmp_path):
  common = {"total_steps": 12, "log_every": 1, "checkpoint_every": 100, "batch_size": 8}
  sft.train(
    _config(**common, **{"mesh.sizes": (1, 1, 1), "mesh.num_devices": 1}), str(tmp_path / "one")
  )
  sft.train(_config(**common, **{"mesh.sizes": (2, 2, 2)}), str(tmp_path / "mesh"))
  one, mesh = _losses(tmp_path / "one"), _losses(tmp_path / "mesh")
  assert len(one) == 12 and one[-1] < one[0]
  np.testing.assert_allclose(mesh, one, atol=1e-5, rtol=0)


def test_params_are_sharded_as_the_rules_say(tmp_path):
  from lmm_align import run_config, sharding
  from lmm_align.data import sources
  from lmm_align.models.llava import Llava
  from lmm_align.trainers import state as state_lib

  config = _config()
  tokenizer = sources.tokenizer_for(config, str(tmp_path))
  model = Llava(run_config.model_config_for(config, tokenizer))
  mesh = sharding.make_mesh((2, 2, 2))
  rules = sharding.DEFAULT_RULES
  with sharding.activation_sharding(mesh, rules):
    params = state_lib.init_params_sharded(
      model, jax.random.key(0), state_lib.param_shardings(model, mesh, rules)
    )
  q = params["language_model"]["layers"]["q_proj"][
    "kernel"
  ]  # [L, D, N, H]: layers, embed, heads, kv
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  assert q.addressable_shards[0].data.shape == (
    q.shape[0],
    q.shape[1] // 2,
    q.shape[2] // 2,
    q.shape[3],
  )
  emb = params["language_model"]["embed_tokens"]["embedding"]
  assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
  common = {"total_steps": 4, "log_every": 1, "checkpoint_every": 100, "batch_size": 8,
            "mesh.sizes": (2, 1, 1), "mesh.num_devices": 2}  # fmt: skip
  sft.train(_config(**common), str(tmp_path / "big"))
  sft.train(_config(**common, **{"optim.grad_accum_steps": 4}), str(tmp_path / "accum"))
  np.testing.assert_allclose(_losses(tmp_path / "accum"), _losses(tmp_path / "big"), atol=1e-5)


def _cli(workdir, *extra, wait=True):
  cmd = [sys.executable, "-m", "lmm_align.main", f"--config={CONFIG}", f"--workdir={workdir}",
         "--config.eval.enabled=False", *extra]  # fmt: skip
  env = {**os.environ, "LMM_ALIGN_PROGRESS": "0"}
  env.pop("XLA_FLAGS", None)
  if wait:
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  return subprocess.Popen(
    cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )


def _final_params(workdir):
  from lmm_align import run_config
  from lmm_align.data import sources
  from lmm_align.models.llava import Llava
  from lmm_align.trainers import export

  config = run_config.load_workdir_config(str(workdir))
  model = Llava(run_config.model_config_for(config, sources.tokenizer_for(config, str(workdir))))
  params, _, step = export.restore_params(config, str(workdir), model)
  return jax.tree.map(np.asarray, params), step


def _wait_for_checkpoint(workdir, proc, min_step=1, timeout=300):
  deadline = time.time() + timeout
  ckpt = pathlib.Path(workdir) / "checkpoints"
  while time.time() < deadline:
    steps = [int(p.name) for p in ckpt.glob("*") if p.name.isdigit()] if ckpt.exists() else []
    if steps and max(steps) >= min_step:
      return max(steps)
    if proc.poll() is not None:
      pytest.fail(f"run ended before a checkpoint: {proc.stdout.read()[-3000:]}")
    time.sleep(0.2)
  pytest.fail("no checkpoint in time")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight")
  result = _cli(workdir, "--config.total_steps=12", "--config.checkpoint_every=3")
  assert result.returncode == 0, result.stderr[-3000:]
  return (*_final_params(workdir), workdir)


def test_kill_9_then_restart_ends_with_identical_weights(tmp_path, uninterrupted):
  proc = _cli(tmp_path, "--config.total_steps=12", "--config.checkpoint_every=3", wait=False)
  _wait_for_checkpoint(tmp_path, proc, min_step=3)
  proc.kill()  # SIGKILL: no chance to clean up
  proc.wait()
  result = _cli(tmp_path, "--config.total_steps=12", "--config.checkpoint_every=3")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "from workdir" in result.stdout
  params, step = _final_params(tmp_path)
  expected, expected_step, _ = uninterrupted
  assert step == expected_step == 12
  jax.tree.map(np.testing.assert_array_equal, params, expected)


def test_sigterm_saves_and_exits_zero(tmp_path):
  proc = _cli(tmp_path, "--config.total_steps=400", "--config.checkpoint_every=2", wait=False)
  _wait_for_checkpoint(tmp_path, proc, min_step=2)
  proc.send_signal(signal.SIGTERM)
  output = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, output[-3000:]
  match = [line for line in output.splitlines() if "preempted: saved step" in line]
  assert match, output[-3000:]
  saved = int(match[0].split("saved step ")[1].split(",")[0])
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").glob("*") if p.name.isdigit())
  assert steps[-1] == saved and saved < 400


def test_unknown_override_is_an_error(tmp_path):
  result = _cli(tmp_path, "--config.optim.not_a_field=1")
  assert result.returncode != 0
  assert "not_a_field" in result.stderr


def test_command_line_overrides_reach_the_saved_config(uninterrupted):
  _, _, workdir = uninterrupted
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["total_steps"] == 12 and saved["checkpoint_every"] == 3
  assert saved["eval"]["enabled"] is False
  assert [
    json.loads(x)["step"] for x in (workdir / "metrics.jsonl").read_text().splitlines()
  ] == list(range(2, 13, 2))


def test_export_loads_in_transformers_with_its_processor(tmp_path, uninterrupted):
  import torch
  import transformers

  _, _, workdir = uninterrupted
  out = tmp_path / "hf"
  result = subprocess.run(
    [sys.executable, "-m", "lmm_align.main", "export", f"--workdir={workdir}", f"--out={out}"],
    cwd=REPO, capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-3000:]
  model = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
  processor = transformers.AutoProcessor.from_pretrained(out)
  from PIL import Image

  image = Image.new("RGB", (48, 48), (200, 30, 30))
  inputs = processor(
    images=image, text="USER: <image>\nDescribe the image. ASSISTANT:", return_tensors="pt"
  )
  assert int((inputs["input_ids"] == model.config.image_token_index).sum()) == 9
  with torch.no_grad():
    hf_logits = model(**inputs).logits.numpy()

  from lmm_align import hf

  ours_model, ours_params = hf.load_pretrained(out)
  pixels = inputs["pixel_values"].numpy().transpose(0, 2, 3, 1)
  ours = ours_model.apply(
    {"params": ours_params}, inputs["input_ids"].numpy(), pixel_values=pixels
  ).logits
  np.testing.assert_allclose(np.asarray(ours), hf_logits, atol=1e-4)


def test_lora_trains_adapters_only_and_exports_merged_or_peft(tmp_path):
  from safetensors.numpy import load_file

  config = _config(**{"total_steps": 3, "log_every": 1, "checkpoint_every": 3, "lora.rank": 4,
                      "lora.targets": (r"language_model/.*(q|v)_proj",), "optim.lr": 1e-2})  # fmt: skip
  workdir = str(tmp_path / "lora")
  sft.train(config, workdir)
  assert len(_losses(workdir)) == 3

  from lmm_align.trainers import export

  export.export_workdir(workdir, str(tmp_path / "merged"))
  export.export_workdir(workdir, str(tmp_path / "peft"), peft=True)
  merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
  base = load_file(str(tmp_path / "peft" / "model.safetensors"))
  adapters = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
  adapter_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  assert adapter_config["r"] == 4 and adapter_config["target_modules"] == ["q_proj", "v_proj"]
  changed = sorted(k for k in base if not np.array_equal(base[k], merged[k]))
  assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed)
  scale = adapter_config["lora_alpha"] / adapter_config["r"]
  for key in changed:
    module = key.removesuffix(".weight")
    a = adapters[f"base_model.model.{module}.lora_A.weight"]
    b = adapters[f"base_model.model.{module}.lora_B.weight"]
    np.testing.assert_allclose(merged[key], base[key] + scale * b @ a, atol=1e-6)
