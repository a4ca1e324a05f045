"""lmm_align/aot (`lmm-align plan`): the SFT, DPO, PPO and iterative-loop programs compiled
for fake CPU devices with byte counts that add up by hand, the compile-only TPU path (libtpu)
with params and optimizer bytes per chip checked against shapes and shardings, `does not fit`
as exit 3, and bad input named by its flag or field."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import flax
import flax.linen as nn
import jax
import numpy as np
import pytest

from lmm_align import aot, config_files, sharding
from lmm_align.models.llava import Llava, dummy_inputs

REPO = pathlib.Path(__file__).resolve().parents[1]
LAST_LINE = re.compile(
  r"plan: (fits|does not fit) peak_gib=(\d+\.\d+) hbm_gib=(\d+\.\d+) device=(.+)"
)


def _shapes_config(name: str) -> str:
  return str(REPO / "configs" / "shapes" / f"{name}.py")


def _llava_sft_config() -> str:
  return str(REPO / "configs" / "llava15" / "sft.py")


def _plan(capsys, *argv: str) -> tuple[int, str, str]:
  status = aot.main(list(argv))
  out, err = capsys.readouterr()
  return status, out, err


def _program(table: dict, name: str) -> dict:
  return next(p for p in table["programs"] if p["name"] == name)


# --------------------------------------------------------------------------------------------
# The accelerator table.
# --------------------------------------------------------------------------------------------


def test_accelerator_types_count_cores_for_v4_v5p_and_chips_for_v5e_v6e():
  v5p = aot.resolve_accelerator("v5p-64")
  assert (v5p.topology, v5p.chips, v5p.hbm_gib) == ("v5p:2x4x4", 32, 95.0)
  v4 = aot.resolve_accelerator("v4-32")
  assert (v4.topology, v4.chips, v4.hbm_gib) == ("v4:2x2x4", 16, 32.0)
  alias = dataclasses.replace(aot.resolve_accelerator("v5e-16"), name="v5litepod-16")
  assert alias == aot.resolve_accelerator("v5litepod-16")
  v5e = aot.resolve_accelerator("v5litepod-16")
  assert (v5e.topology, v5e.chips, v5e.hbm_gib) == ("v5e:4x4", 16, 16.0)
  v6e = aot.resolve_accelerator("v6e-8")
  assert (v6e.topology, v6e.chips, v6e.peak_flops) == ("v6e:2x4", 8, 918e12)
  for acc in aot.accelerator_types().values():  # the topology's chips are the count's
    dims = [int(d) for d in acc.topology.split(":")[1].split("x")]
    assert int(np.prod(dims)) == acc.chips, acc
  assert aot.resolve_accelerator("cpu-8").chips == 8


# --------------------------------------------------------------------------------------------
# Fake CPU devices.
# --------------------------------------------------------------------------------------------

SFT_ARGS = ("--topology=cpu-8", "--mesh=2,2,2", "--cost=none")


def test_sft_plan_on_cpu8_fits_and_its_arguments_add_up(capsys, tmp_path):
  config = _shapes_config("sft") + ":runlocal"
  save = tmp_path / "plan.json"
  status, out, err = _plan(capsys, f"--config={config}", *SFT_ARGS, f"--save={save}")
  assert status == 0, err
  match = LAST_LINE.fullmatch(out.strip().splitlines()[-1])
  assert match and match.group(1) == "fits" and match.group(4) == "cpu", out[-2000:]
  table = json.loads(save.read_text())
  row = _program(table, "sft_train_step")
  assert float(match.group(2)) == pytest.approx(row["peak"] / aot.GIB, rel=1e-3)
  assert row["peak"] == row["argument"] + row["output"] - row["alias"] + row["temp"] > 0
  # argument = params + optimizer state + this chip's batch rows + step (int32) + rng key:
  # 8 rows over data x fsdp = 4, 128 tokens, one 48 px image each (shapes_sft's image_size).
  loaded = config_files.load_config(config)
  rows, seq, image = 8 // 4, loaded.data.max_length, loaded.model.image_size
  batch = 3 * rows * seq * 4 + rows * image * image * 3 * 4
  state = row["by_hand"]["params"] + row["by_hand"]["optimizer state"]
  assert row["argument"] == state + batch + 4 + 8
  assert row["alias"] == state + 4 + 8  # the whole state is donated
  assert "peak = argument + output - alias + temp" in out and "XLA:CPU" in out


def test_does_not_fit_is_exit_3_with_the_table(capsys):
  config = _shapes_config("sft") + ":runlocal"
  status, out, _ = _plan(capsys, f"--config={config}", *SFT_ARGS, "--hbm_gib=0.001")
  assert status == aot.EXIT_DOES_NOT_FIT
  assert "== sft_train_step" in out and "headroom -" in out
  match = LAST_LINE.fullmatch(out.strip().splitlines()[-1])
  assert match and match.group(1) == "does not fit" and match.group(3) == "0.00"


def test_dpo_plan_on_cpu8_compiles_the_reference_pass_and_the_step(capsys, tmp_path):
  save = tmp_path / "plan.json"
  config = _shapes_config("dpo") + ":runlocal"
  status, out, err = _plan(capsys, f"--config={config}", *SFT_ARGS, f"--save={save}")
  assert status == 0, err
  table = json.loads(save.read_text())
  assert [p["name"] for p in table["programs"]] == ["dpo_reference_logps", "dpo_train_step"]
  # 8 pairs over 4 data-parallel chips: 2 pairs x (chosen, rejected) x 128 tokens, 32 px images.
  pairs, seq, image = 2, 128, 32
  batch = 3 * pairs * 2 * seq * 4 + pairs * 2 * image * image * 3 * 4
  step = _program(table, "dpo_train_step")
  state = step["by_hand"]["params"] + step["by_hand"]["optimizer state"]
  assert step["by_hand"]["frozen"] == 0  # reference log-probs precomputed: no frozen copy
  assert step["argument"] == state + batch + pairs * 2 * 4 + 4 + 8  # + ref_logps [B, 2]
  reference = _program(table, "dpo_reference_logps")
  # jit drops the inputs a forward never reads: the CLIP tower's post-layernorm (2 x [32] f32).
  assert reference["argument"] == reference["by_hand"]["params"] + batch - 2 * 32 * 4
  assert reference["output"] == pairs * 2 * 4  # this chip's [B, 2] float32 log-probs


# --------------------------------------------------------------------------------------------
# Compile-only TPU devices.
# --------------------------------------------------------------------------------------------


def _bytes_by_hand(config, fsdp: int) -> tuple[int, int]:
  """(params, Adam moments) bytes per chip: every float32 leaf with an `embed` axis split over
  fsdp (DEFAULT_RULES; the tensor axis is 1), the rest whole; moments for the trained leaves."""
  model_config, _ = aot.model_config_of(config)
  model = Llava(model_config)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(model_config)))
  specs = flax.traverse_util.flatten_dict(nn.get_partition_spec(boxed["params"]), sep="/")
  shapes = flax.traverse_util.flatten_dict(nn.unbox(boxed["params"]), sep="/")
  params = moments = 0
  for path, spec in specs.items():
    n = int(np.prod(shapes[path].shape))
    if "embed" in (spec or ()):
      assert n % fsdp == 0
      n //= fsdp
    params += 4 * n
    if any(re.fullmatch(p, path) for p in config.trainable):
      moments += 2 * 4 * n
  return params, moments


def test_tpu_v5p8_plan_matches_bytes_by_hand(capsys, tmp_path):
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (pip install -e '.[tpu]')")
  save = tmp_path / "plan.json"
  config = _llava_sft_config() + ":runlocal"
  status, out, err = _plan(capsys, f"--config={config}", "--topology=v5p-8", f"--save={save}")
  assert status == 0, err
  match = LAST_LINE.fullmatch(out.strip().splitlines()[-1])
  assert match and match.group(1) == "fits" and match.group(4) == "TPU v5", out[-2000:]
  assert match.group(3) == "95.00"
  table = json.loads(save.read_text())
  assert table["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  row = _program(table, "sft_train_step")
  params, moments = _bytes_by_hand(config_files.load_config(config), fsdp=4)
  assert row["by_hand"]["params"] == params
  # Adam's moments plus a few int32 step counters (replicated scalars).
  assert 0 <= row["by_hand"]["optimizer state"] - moments <= 4 * 4
  # The TPU compiler pads small arrays to its tiles, so its buffers are at least these.
  assert row["alias"] >= params + moments
  assert row["argument"] >= params + moments + 8 * 128 * 3 * 4 // 4
  assert row["generated_code"] > 0
  # The unrolled cost pass: compiled FLOPs within a small factor of the model's own count
  # (remat dots_no_batch recomputes some of the forward), and the compiler's time estimate.
  assert 1.0 <= row["flops"] / row["model_flops_per_chip"] < 1.6
  assert row["optimal_seconds"] > 0
  assert "unrolled" in row["cost_pass"] and row["cost_loops"] == 0


def test_tpu_reward_plan_with_lora_keeps_the_base_frozen_outside_the_state(capsys, tmp_path):
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (pip install -e '.[tpu]')")
  save = tmp_path / "plan.json"
  config = _shapes_config("reward") + ":runlocal,lora=8"
  argv = (f"--config={config}", "--topology=v5p-8", "--mesh=1,-1,1", "--cost=none",
          f"--save={save}")  # fmt: skip
  status, _, err = _plan(capsys, *argv)
  assert status == 0, err
  table = json.loads(save.read_text())
  assert [p["name"] for p in table["programs"]] == ["reward_train_step", "reward_eval_scores"]
  step = _program(table, "reward_train_step")
  params, _ = _bytes_by_hand(config_files.load_config(config), fsdp=4)
  assert step["by_hand"]["frozen base"] == params  # the whole float32 backbone, not trained
  # The state trains the adapters and the head only: their Adam moments plus a few counters.
  assert 0 < step["by_hand"]["params"] < params / 2  # r=8 on a 64-wide model: a quarter
  assert 0 <= step["by_hand"]["optimizer state"] - 2 * step["by_hand"]["params"] <= 4 * 4
  scores = _program(table, "reward_eval_scores")
  assert scores["by_hand"] == {k: step["by_hand"][k] for k in ("params", "frozen base")}


def test_tpu_resource_exhausted_is_exit_3_with_the_table_not_a_traceback(capsys):
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (pip install -e '.[tpu]')")
  # 256 rows x 2048 tokens on one 16 GiB v5e chip: the float32 logits alone are 1 GiB a row.
  argv = (f"--config={_llava_sft_config()}:runlocal", "--topology=v5e-1", "--cost=none",
          "--config.batch_size=256", "--config.data.max_length=2048")  # fmt: skip
  status, out, _ = _plan(capsys, *argv)
  assert status == aot.EXIT_DOES_NOT_FIT
  assert "RESOURCE_EXHAUSTED from the compiler" in out and "params by hand" in out
  match = LAST_LINE.fullmatch(out.strip().splitlines()[-1])
  assert match and match.group(1) == "does not fit" and match.group(3) == "16.00"
  assert float(match.group(2)) > 16  # the compiler's own figure for what it needed


# --------------------------------------------------------------------------------------------
# PPO and the iterative loop (fake CPU devices, the recipes' runlocal sizes).
# --------------------------------------------------------------------------------------------

RL_ARGS = ("--topology=cpu-8", "--mesh=2,2,2", "--cost=none")
PPO_PROGRAMS = [
  "ppo_merge_lora", "ppo_sampler", "ppo_decode_step", "ppo_policy_logps",
  "ppo_reference_logps", "ppo_values", "ppo_reward_scores", "ppo_train_step",
]  # fmt: skip


def _recipe(path: str) -> str:
  return str(REPO / "configs" / path)


def _kv_cache_bytes(layers, rows, kv_heads, head_dim, slots, itemsize=4) -> int:
  """Keys and values of every layer for this chip's rows and kv heads (float32)."""
  return layers * 2 * rows * kv_heads * head_dim * slots * itemsize


@pytest.fixture(scope="module")
def ppo_plan(tmp_path_factory) -> tuple[str, dict]:
  save = tmp_path_factory.mktemp("ppo") / "plan.json"
  status = aot.main([f"--config={_recipe('llava_rlhf/ppo.py')}:runlocal", *RL_ARGS,
                     f"--save={save}"])  # fmt: skip
  assert status == 0
  return json.loads(save.read_text())


def test_ppo_plan_compiles_the_rollout_and_the_update(ppo_plan):
  table = ppo_plan
  assert [p["name"] for p in table["programs"]] == PPO_PROGRAMS
  # runlocal: the tiny float32 policy (2 layers, 2 kv heads of 16, vocab 512, width 64, 32 px
  # images), queries of 64 + 12 new tokens; rollouts 8, forwards 8, update minibatches 4 rows,
  # over data x fsdp = 4 chips; kv heads over tensor = 2.
  step = _program(table, "ppo_train_step")
  query, new, image, rows = 64, 12, 32, 1
  batch = 2 * rows * (query + new) * 4 + rows * image * image * 3 * 4 + 5 * rows * new * 4
  # jit drops inputs the step never reads: at least the value backbone's lm_head [64, 512]
  # float32 (its head reads hidden states; this chip's quarter) and both CLIP towers' post-
  # layernorm; it keeps the whole state (donated) and the batch.
  unused = 64 * 512 * 4 // 4 + 2 * 2 * 32 * 4
  state, frozen = step["by_hand"]["train state"], step["by_hand"]["frozen bases"]
  assert state + batch < step["argument"] <= state + frozen + batch - unused
  assert step["alias"] == state  # adapters, head and optimizer state donated
  assert set(step["resident"]) == {"reward head"}  # everything else is an argument
  assert _program(table, "ppo_reward_scores")["output"] == 2 * 4  # [2 rows] float32 scores
  assert _program(table, "ppo_policy_logps")["output"] == 2 * new * 4  # [2, N] log-probs
  values = _program(table, "ppo_values")
  assert set(values["resident"]) == {
    "policy params", "optimizer state", "reward head", "policy base (the reference)",
  }  # fmt: skip
  # The decode step: 8 rollout rows (2 here) against 64 + 12 cache slots; the least it reads
  # is the decoder's weights (not the [512, 64] embedding, a quarter here) and the cache.
  decode = _program(table, "ppo_decode_step")
  cache = _kv_cache_bytes(2, 2, 1, 16, query + new)
  assert decode["by_hand"]["KV cache"] == cache
  assert decode["minimal_bytes"] == decode["by_hand"]["decoder params"] - 512 * 64 * 4 // 4 + cache
  assert decode["alias"] >= cache  # the cache is donated, updated in place
  # The verdict counts each program's peak with the run's other buffers beside it.
  totals = [p["peak"] + sum(p["resident"].values()) for p in table["programs"]]
  assert table["peak_gib"] == pytest.approx(max(totals) / aot.GIB)


def test_iterative_plan_compiles_sampler_labeler_and_dpo(capsys, tmp_path):
  save = tmp_path / "plan.json"
  config = _recipe("rlaifv/iterative.py") + ":runlocal"
  status, out, err = _plan(capsys, f"--config={config}", *RL_ARGS, f"--save={save}")
  assert status == 0, err
  table = json.loads(save.read_text())
  names = ["candidates_sampler", "candidates_decode_step", "labeler_yes_no",
           "dpo_reference_logps", "dpo_train_step"]  # fmt: skip
  assert [p["name"] for p in table["programs"]] == names
  # 4 samples of one prompt (one row a chip) against a 128-token prompt bucket + 16 new.
  decode = _program(table, "candidates_decode_step")
  assert decode["by_hand"]["KV cache"] == _kv_cache_bytes(2, 1, 1, 16, 128 + 16)
  assert "decode bytes / minimal bytes" not in out  # --cost=none: no cost figures
  labeler = _program(table, "labeler_yes_no")
  assert labeler["by_hand"]["labeler params"] > 0 and labeler["output"] > 0


def test_iterative_plan_names_a_splitter_model_it_cannot_size(capsys):
  config = _recipe("rlaifv/iterative.py") + ":runlocal"
  argv = (f"--config={config}", *RL_ARGS, "--config.feedback.splitter=model:/nonexistent/x")
  status, out, err = _plan(capsys, *argv)
  assert status == aot.EXIT_BAD_INPUT and out == ""
  assert "config.feedback.splitter='model:/nonexistent/x'" in err, err


# --------------------------------------------------------------------------------------------
# Bad input.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "extra, named",
  [
    (("--topology=v9-8",), "--topology='v9-8'"),
    (("--topology=cpu-8", "--mesh=3,1,1"), "--mesh=3,1,1"),
    (("--topology=cpu-8", "--mesh=1,x,1"), "--mesh='1,x,1'"),
    (("--topology=cpu-8", "--mesh=1,8,1", "--config.batch_size=6"), "config.batch_size=6"),
    (("--topology=cpu-8", "--config.model.variant=nope"), "config.model.variant='nope'"),
    (("--topology=cpu-8", "--mesh=2,2,2", "--programs=nope"), "--programs: ['nope']"),
  ],
)
def test_bad_input_is_exit_2_naming_the_flag_or_field(capsys, extra, named):
  config = _shapes_config("sft") + ":runlocal"
  status, out, err = _plan(capsys, f"--config={config}", *extra)
  assert status == aot.EXIT_BAD_INPUT and out == ""
  assert err.startswith("plan: error:") and named in err, err


def test_lmm_align_plan_dispatches_to_aot():
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  code = (
    "import sys; from lmm_align.main import run; sys.argv = ['lmm-align', *sys.argv[1:]]; run()"
  )
  result = subprocess.run(
    [sys.executable, "-c", code, "plan", f"--config={_llava_sft_config()}", "--topology=v5p-7"],
    cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
  )  # fmt: skip
  assert result.returncode == aot.EXIT_BAD_INPUT, result.stderr[-2000:]
  assert "--topology='v5p-7' is not a known accelerator type" in result.stderr


# --------------------------------------------------------------------------------------------
# Abstract state vs real arrays, and the published 7B size.
# --------------------------------------------------------------------------------------------


def _abstract_state(config, mesh):
  model_config, _ = aot.model_config_of(config)
  model = Llava(model_config)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(list(rules)):
    params, shards = aot.abstract_variables(model, mesh, rules)["params"]
    state, _, _ = aot.abstract_train_state(config, params, shards, mesh)
  return model, rules, state


def test_llava_7b_param_count_and_bytes_by_hand():
  config = config_files.load_config(_llava_sft_config())
  model_config, notes = aot.model_config_of(config)
  assert any("sized from the variant" in n for n in notes)  # no HF folder here
  _, _, state = _abstract_state(config, sharding.make_mesh((1, 8, 1)))

  d, f, layers, vocab = 4096, 11008, 32, 32064
  text = 2 * vocab * d + layers * (4 * d * d + 3 * d * f + 2 * d) + d
  dv, fv, lv, patches = 1024, 4096, 24, 576
  vision = (
    14 * 14 * 3 * dv  # patch embedding (no bias)
    + dv  # class embedding
    + (patches + 1) * dv  # position embedding
    + 2 * 2 * dv  # pre and post layer norms
    + lv * (4 * (dv * dv + dv) + dv * fv + fv + fv * dv + dv + 2 * 2 * dv)
  )
  projector = dv * d + d + d * d + d
  assert text + vision + projector == 7_063_427_072  # llava-hf/llava-1.5-7b-hf
  assert aot.num_params(state.params) == 7_063_427_072

  # bf16 params; the fp32 Adam moments cover the projector and the language model only.
  per_chip = aot.bytes_per_chip(state.params)
  assert 2 * 7_063_427_072 / 8 < per_chip < 2 * 7_063_427_072 / 8 * 1.01
  assert np.isclose(aot.bytes_per_chip(state.opt_state), 2 * 4 * (text + projector) / 8, rtol=1e-3)


def test_critic_plan_on_cpu8_carries_a_onevision_batch_of_tiles(capsys, tmp_path):
  """configs/llava_critic/critic.py:runlocal on a tiny OneVision: the SFT step's batch holds
  each row's tiles (the largest of data.tile_buckets), the pack plan over the padded length and
  the ids, as `pipeline.anyres_batch_shapes` states them."""
  from lmm_align.data import pipeline

  config = str(REPO / "configs" / "llava_critic" / "critic.py") + ":runlocal"
  save = tmp_path / "plan.json"
  status, out, err = _plan(
    capsys, f"--config={config}", "--config.model.variant=tiny-llava-onevision",
    "--topology=cpu-8", "--cost=none", f"--save={save}",
  )  # fmt: skip
  assert status == 0, err
  match = LAST_LINE.fullmatch(out.strip().splitlines()[-1])
  assert match and match.group(1) == "fits", out[-2000:]
  row = _program(json.loads(save.read_text()), "sft_train_step")
  loaded = config_files.load_config(config)
  rows, seq, tiles = loaded.batch_size, loaded.data.max_length, max(loaded.data.tile_buckets)
  fields = pipeline.anyres_batch_shapes(rows, seq, tiles, 32)  # the tiny tower's 32-px tiles
  # image_sizes and the plan's num_tokens are host checks: jit prunes them as unused.
  used = {k: v for k, v in fields.items() if k not in ("image_sizes", "pack_plan.num_tokens")}
  batch = 3 * rows * seq * 4 + sum(np.prod(s) * np.dtype(d).itemsize for s, d in used.values())
  state = row["by_hand"]["params"] + row["by_hand"]["optimizer state"]
  assert row["argument"] == state + batch // 8 + 4 + 8  # 8 rows over the 8 chips' fsdp axis


def test_an_anyres_labeler_is_planned_with_its_tiles_and_pack_plan():
  """RLAIF-V's LLaVA-NeXT labeler: every tile its processor can give an image, right-padded
  prompts long enough for the largest image's placeholders, and the pack plan, as
  `YesNoLabeler` batches them; the program compiles with them."""
  from lmm_align.aot import abstract, rl_programs
  from lmm_align.models import get_variant

  c = get_variant("tiny-llava-next")
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  params = abstract.abstract_variables(Llava(c), mesh, sharding.DEFAULT_RULES)["params"][0]
  program = rl_programs.labeler_program(c, params, 3, mesh)
  _, ids, _, pixels, *_, plan = program.args
  most = max(c.image_tokens(tuple(p)) for p in c.packing.image_grid_pinpoints)
  assert pixels.shape == (
    3,
    c.packing.max_tiles_per_image,
    c.vision.image_size,
    c.vision.image_size,
    3,
  )
  assert ids.shape[1] >= most and plan["taps"].shape[:2] == (3, sampling_bucket(most))
  p_yes, p_no = jax.eval_shape(program.jitted, *program.args)
  assert p_yes.shape == p_no.shape == (3,)
  program.jitted.lower(*program.args).compile()


def sampling_bucket(n: int) -> int:
  from lmm_align import sampling

  return sampling.bucket_length(n)
