"""The recipe configs of the published systems (configs/llava15, llava_rlhf, rlaifv, llava_critic):
every get_config builds with the paper's numbers, and each `:runlocal` trains end to end on
small files in the published layout (written here) from a tiny exported HF model given on the
command line, as a user would; its export loads in transformers.
"""

from __future__ import annotations

import ast
import io
import json
import pathlib
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers
from PIL import Image

from lmm_align import config_files, main
from lmm_align.data import conversation, registry
from lmm_align.models.variants import get_variant
from lmm_align.trainers import export
from lmm_align.trainers import registry as trainers

REPO = pathlib.Path(__file__).resolve().parents[1]
# Every recipe and the args it takes (each arg alone, and with runlocal).
RECIPES = {
  "configs/llava15/sft.py": ("", "stage=1", "model=13b", "stage=1,model=13b"),
  "configs/llava_rlhf/sft.py": ("", "stage=rl_init", "model=13b", "model=13b,stage=rl_init"),
  "configs/llava_rlhf/rm.py": ("", "vanilla", "model=7b"),
  "configs/llava_rlhf/ppo.py": ("", "vanilla", "model=13b"),
  "configs/rlaifv/dpo.py": ("", "model=13b"),
  "configs/llava_critic/critic.py": ("", "mode=pointwise", "mode=pairwise", "model=72b"),
  "configs/rlaifv/iterative.py": ("", "feedback=self", "model=13b"),
  "configs/llava_critic/iterative_dpo.py": ("", "model=72b", "critic=72b"),
}
KIND = {"sft": "conversations", "dpo": "pairs", "reward": "pairs", "ppo": "prompts"}
TIMINGS: dict[str, float] = {}


def _load(spec: str):
  return config_files.load_config(spec, str(REPO))


def _specs():
  for path, args in RECIPES.items():
    for arg in args:
      yield f"{path}:{arg}" if arg else path
      yield f"{path}:{','.join(filter(None, (arg, 'runlocal')))}"


# --------------------------------------------------------------------------------------------
# Every config builds, names registered things and carries the published numbers.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", list(_specs()))
def test_every_recipe_builds_with_registered_trainer_and_source(spec):
  config = _load(spec)
  runlocal = spec.endswith("runlocal")
  assert config.trainer in trainers.BUILTIN
  if config.trainer == "iterative":
    # The loop: its prompts from an RL-prompt source, each round a DPO run of config.train.
    train = config.train
    assert train.trainer == "dpo"
    if runlocal:
      assert config.prompts.source == "shapes"  # see configs/rlaifv/iterative.py's runlocal
    else:
      assert config.prompts.source in registry.names("prompts") and config.prompts.path
  else:
    train = config
    assert config.data.source in registry.names(KIND[config.trainer])
  if runlocal:
    # Runs from what the command line gives: nothing points at the pod's disks.
    assert config.init_from == "" and train.total_steps == 2
    assert config.trainer == "iterative" or config.data.path == ""
    assert train.model.dtype == "float32"
    conversation.get_template(config.data.template)
  else:
    # A LLaVA folder to start from, or (LLaVA-1.5 stage 1) an LLM and a tower folder.
    starts = (
      [config.init_from] if config.init_from else [config.model.text_init, config.model.vision_init]
    )
    assert all(p.startswith("/mnt/disks/models/") for p in starts), starts
    assert train.model.dtype == "bfloat16" and train.optim.state_dtype == "float32"
    conversation.get_template(config.data.template)
    get_variant(train.model.variant)  # the size `lmm-align plan` compiles for


@pytest.mark.parametrize("path", list(RECIPES))
def test_docstring_starts_with_the_command(path):
  doc = ast.get_docstring(ast.parse((REPO / path).read_text()))
  command = doc.split("\n\n")[1].strip()
  assert command.startswith(f"python -m lmm_align.main --config={path}")


def test_unknown_args_are_refused():
  with pytest.raises(ValueError, match="model='30b'"):
    _load("configs/rlaifv/dpo.py:model=30b")
  with pytest.raises(ValueError, match="stage=3"):
    _load("configs/llava15/sft.py:stage=3")
  with pytest.raises(ValueError, match="mode='listwise'"):
    _load("configs/llava_critic/critic.py:mode=listwise")
  with pytest.raises(KeyError, match="unknown config arg 'stages'"):
    _load("configs/llava_rlhf/sft.py:stages=1")


def test_published_hyperparameters():
  s1, s2 = _load("configs/llava15/sft.py:stage=1"), _load("configs/llava15/sft.py")
  assert (s1.optim.lr, s1.batch_size, s1.total_steps, s1.data.template) == (
    1e-3,
    256,
    2181,
    "plain",
  )
  assert tuple(s1.trainable) == ("multi_modal_projector/.*",)
  assert (s2.optim.lr, s2.batch_size, s2.total_steps, s2.data.template) == (
    2e-5,
    128,
    5198,
    "vicuna_v1",
  )
  assert "language_model/.*" in s2.trainable and "vision_tower/.*" not in s2.trainable
  assert _load("configs/llava15/sft.py:model=13b").init_from.endswith("llava-1.5-13b-hf")
  # Stage 1 starts from Vicuna and CLIP (no LLaVA folder), sized by the variant.
  assert (s1.init_from, s1.model.variant) == ("", "llava-1.5-7b")
  assert s1.model.text_init.endswith("vicuna-7b-v1.5") and "clip-vit" in s1.model.vision_init
  assert s1.tokenizer.endswith("llava-1.5-7b-hf")

  rm = _load("configs/llava_rlhf/rm.py")
  assert (rm.lora.rank, rm.optim.lr, rm.batch_size, rm.optim.schedule) == (64, 2e-5, 32, "constant")
  assert rm.reward.fact_augmented and rm.reward.centering_coef == 1e-3 and rm.data.captions_path
  vanilla = _load("configs/llava_rlhf/rm.py:vanilla")
  assert not vanilla.reward.fact_augmented and vanilla.data.captions_path == ""
  rl_init = _load("configs/llava_rlhf/sft.py:stage=rl_init")
  assert (rl_init.lora.rank, rl_init.optim.lr, rl_init.data.max_length) == (64, 1e-4, 2048)

  ppo7, ppo13 = _load("configs/llava_rlhf/ppo.py"), _load("configs/llava_rlhf/ppo.py:model=13b")
  assert ppo7.model.variant == "llava-1.5-7b" and ppo13.model.variant == "llava-1.5-13b"
  assert ppo7.init_from != ppo13.init_from and ppo7.ppo.reward_model == ppo13.ppo.reward_model
  p = ppo7.ppo
  # The published 128-token query limit counts the image as one token; ours holds its 576.
  assert (p.query_len, p.max_new_tokens, p.rollout_batch_size, p.step_batch_size) == (
    128 + 576,
    896,
    512,
    256,
  )
  assert (p.kl_coef, p.reward_scale, p.lam, p.length_coef, p.stop_penalty) == (
    0.1,
    10.0,
    1.0,
    -10.0,
    -8.0,
  )

  dpo = _load("configs/rlaifv/dpo.py")
  assert (dpo.dpo.beta, dpo.dpo.loss, dpo.dpo.average_logps) == (0.1, "sigmoid", False)
  assert (dpo.optim.lr, dpo.optim.warmup_ratio, dpo.optim.weight_decay) == (5e-7, 0.05, 0.01)
  assert tuple(dpo.trainable) == (".*",) and dpo.lora.rank == 0  # full fine-tune, tower too
  assert dpo.data.template == "llava_v1"

  both = _load("configs/llava_critic/critic.py")
  assert both.data.path.split(",") == [
    "/mnt/disks/data/llava-critic-113k/pointwise/*.parquet",
    "/mnt/disks/data/llava-critic-113k/pairwise/*.parquet",
  ]
  assert _load("configs/llava_critic/critic.py:mode=pairwise").data.path.endswith(
    "pairwise/*.parquet"
  )


# --------------------------------------------------------------------------------------------
# Small files in the published layouts.
# --------------------------------------------------------------------------------------------

N = 8  # records per file: one global batch
COLOURS = ("red", "green", "blue", "white")


def _png(i: int) -> bytes:
  pixels = np.random.default_rng(i).integers(0, 256, (40, 52, 3), np.uint8)
  pixels[..., i % 3] = 255
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, "PNG")
  return buffer.getvalue()


def _turns(*values: str) -> list[dict]:
  return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def _coco_images(folder: pathlib.Path) -> list[str]:
  """N COCO-named image files (PNG bytes; the readers go by content, not by extension)."""
  folder.mkdir(parents=True, exist_ok=True)
  names = [f"{i + 1:012d}.jpg" for i in range(N)]
  for i, name in enumerate(names):
    (folder / name).write_bytes(_png(i))
  return names


def write_llava_json(root: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """LLaVA instruction JSON (PROTOCOLS.md §1.1), images relative to the folder."""
  names = _coco_images(root / "coco" / "train2017")
  records = [
    {"id": f"s{i}", "image": f"coco/train2017/{name}",
     "conversations": _turns("<image>\nWhat is in the image?", f"A {COLOURS[i % 4]} circle.")}
    for i, name in enumerate(names)
  ]  # fmt: skip
  path = root / "llava_instruct.json"
  path.write_text(json.dumps(records))
  return path, root


def write_llava_rlhf(root: pathlib.Path) -> dict[str, pathlib.Path]:
  """LLaVA-Human-Preference JSON, image_to_caption.json and the RL prompt JSON (§2.1-2.3)."""
  folder = root / "train2017"
  names = _coco_images(folder)
  captions = {name: [f"A {COLOURS[i % 4]} circle.", "A plain background."]
              for i, name in enumerate(names)}  # fmt: skip
  prefs = []
  for i, name in enumerate(names + names[:2]):  # 10 pairs: 2 held out
    truthful = {"from": "llava", "value": f"A {COLOURS[i % 4]} circle."}
    wrong = {"from": "llava", "value": f"A {COLOURS[(i + 1) % 4]} star and a dog."}
    preference = 1 + i % 2  # the truthful answer is output_<preference>
    outputs = (truthful, wrong) if preference == 1 else (wrong, truthful)
    prefs.append({
      "id": f"p{i}", "image": name,
      "conversations": _turns("<image>\nDescribe the image.", "(replaced)"),
      "output_1": outputs[0], "output_2": outputs[1], "preference": preference,
      "hallucination": True,
    })  # fmt: skip
  prompts = [
    {"id": f"q{i}", "image": name,
     "conversations": _turns("<image>\nIs there a circle?" if i % 2 else "<image>\nDescribe it.",
                             "x"),
     "caption_type": 7 if i % 2 else 1, "length_bonus": 1.0}
    for i, name in enumerate(names)
  ]  # fmt: skip
  paths = {
    "prefs": root / "llava_7b_v1_preference.json",
    "captions": root / "image_to_caption.json",
    "prompts": root / "llava_ppo50k-aokvqa12k-vqa10k.json",
    "images": folder,
  }
  paths["prefs"].write_text(json.dumps(prefs))
  paths["captions"].write_text(json.dumps(captions))
  paths["prompts"].write_text(json.dumps(prompts))
  return paths


IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def write_rlaifv_parquet(path: pathlib.Path) -> pathlib.Path:
  """RLAIF-V-Dataset columns (§6.1), with the cached `logps` column of the -withlogp shards."""
  logps = [[-30.0 - i, -3.0, [], -50.0 - i, -5.0, []] for i in range(N)]
  table = pa.table({
    "ds_name": pa.array(["RLAIF-V"] * N),
    "image": pa.array([{"bytes": _png(i), "path": None} for i in range(N)], IMAGE_TYPE),
    "question": pa.array(["Describe the image."] * N),
    "chosen": pa.array([f"A {COLOURS[i % 4]} circle." for i in range(N)]),
    "rejected": pa.array([f"A {COLOURS[(i + 1) % 4]} star." for i in range(N)]),
    "origin_dataset": pa.array(["MSCOCO"] * N),
    "origin_split": pa.array(["{}"] * N),
    "idx": pa.array([str(i) for i in range(N)]),
    "image_path": pa.array([f"{i}.jpg" for i in range(N)]),
    "logps": pa.array([json.dumps(x) for x in logps]),
  })  # fmt: skip
  pq.write_table(table, path, row_group_size=3)
  return path


def write_llava_critic_parquet(path: pathlib.Path) -> pathlib.Path:
  """LLaVA-Critic-113k columns (§7): a pointwise and a pairwise critique per image."""
  pointwise = "Score the response out of 100.\nQuestion: [Describe it.]\nThe LMM response: [{}]"
  pairwise = ("Which answer is better?\nQuestion: [Describe it.]\nThe first response: [{}]\n"
              "The second response: [{}]")  # fmt: skip
  rows = []
  for i in range(N):
    good, bad = f"A {COLOURS[i % 4]} circle.", f"A {COLOURS[(i + 1) % 4]} star."
    if i % 2:
      prompt, verdict = (
        pairwise.format(bad, good),
        "The second one is right. The better response: second",
      )
    else:
      prompt, verdict = pointwise.format(good), "It is right. Final Score: 90"
    rows.append((f"critic_{i}", _turns(f"<image>\n{prompt}", verdict)))
  turn = pa.struct([("from", pa.string()), ("value", pa.string())])
  table = pa.table({
    "id": pa.array([r[0] for r in rows]),
    "source": pa.array(["vlfeedback"] * N),
    "conversations": pa.array([r[1] for r in rows], pa.list_(turn)),
    "image": pa.array([{"bytes": _png(i), "path": f"{i}.png"} for i in range(N)], IMAGE_TYPE),
  })  # fmt: skip
  pq.write_table(table, path)
  return path


# --------------------------------------------------------------------------------------------
# Runs.
# --------------------------------------------------------------------------------------------


def _train(spec: str, workdir: pathlib.Path, **overrides) -> dict:
  """`lmm-align train --config=<spec> --config.<key>=<value> ...`, in process."""
  config = main.apply_overrides(_load(spec), overrides)
  start = time.perf_counter()
  summary = main.train(config, str(workdir))
  TIMINGS[spec] = time.perf_counter() - start
  print(f"[recipes] {spec}: {TIMINGS[spec]:.1f} s")
  return summary


def _steps(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def _check_export_loads(
  workdir: pathlib.Path | None, out: pathlib.Path, model_dir: pathlib.Path, trained: bool = True
):
  """The run's export (`lmm-align export` of `workdir`, or the folder `out` a loop wrote) is a
  folder transformers loads; its logits on a prompt with an image are finite and, when the run
  `trained`, differ from the starting model's."""
  if workdir is not None:
    export.export_workdir(str(workdir), str(out))
  logits = []
  for folder in (out, model_dir):
    model = transformers.LlavaForConditionalGeneration.from_pretrained(folder).eval()
    processor = transformers.AutoProcessor.from_pretrained(out)
    image = Image.open(io.BytesIO(_png(0)))
    prompt = "USER: <image>\nWhat is in the image? ASSISTANT:"
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
      logits.append(model(**inputs).logits.numpy())
  assert np.isfinite(logits[0]).all()
  assert (np.abs(logits[0] - logits[1]).max() > 0) == trained


@pytest.fixture(scope="module")
def tiny_model(shapes_sft_policy) -> pathlib.Path:
  """A tiny LLaVA exported with its tokenizer and processor (conftest's shapes SFT policy)."""
  return shapes_sft_policy


def test_llava15_sft_runlocal_from_the_command_line(tmp_path, tiny_model):
  data, images = write_llava_json(tmp_path / "data")
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "lmm_align.main", "--config=configs/llava15/sft.py:runlocal",
         f"--workdir={workdir}", f"--config.init_from={tiny_model}",
         f"--config.data.path={data}", f"--config.data.image_folder={images}"]  # fmt: skip
  start = time.perf_counter()
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  print(
    f"[recipes] configs/llava15/sft.py:runlocal (subprocess): {time.perf_counter() - start:.1f} s"
  )
  assert result.returncode == 0, result.stderr[-3000:]
  steps = _steps(workdir)
  assert len(steps) == 2 and all(np.isfinite(s["loss"]) for s in steps)
  config = json.loads((workdir / "config.json").read_text())
  assert config["data"]["source"] == "llava_json" and config["init_from"] == str(tiny_model)
  _check_export_loads(workdir, tmp_path / "hf", tiny_model)


def test_llava_critic_runlocal_on_critic_parquet(tmp_path, tiny_model):
  parquet = write_llava_critic_parquet(tmp_path / "pairwise-00000-of-00001.parquet")
  workdir = tmp_path / "run"
  _train("configs/llava_critic/critic.py:runlocal", workdir,
         **{"init_from": str(tiny_model), "data.path": str(parquet)})  # fmt: skip
  assert len(_steps(workdir)) == 2
  _check_export_loads(workdir, tmp_path / "hf", tiny_model)


def test_llava_rlhf_rm_then_ppo_runlocal(tmp_path, tiny_model):
  files = write_llava_rlhf(tmp_path / "data")
  rm_dir = tmp_path / "rm"
  _train("configs/llava_rlhf/rm.py:runlocal", rm_dir, **{
    "init_from": str(tiny_model), "data.path": str(files["prefs"]),
    "data.image_folder": str(files["images"]), "data.captions_path": str(files["captions"]),
  })  # fmt: skip
  assert len(_steps(rm_dir)) == 2
  rm_hf = tmp_path / "rm_hf"
  export.export_workdir(str(rm_dir), str(rm_hf))
  # The reward model's backbone is a LLaVA folder too (its head is a file beside it).
  transformers.LlavaForConditionalGeneration.from_pretrained(rm_hf)

  ppo_dir = tmp_path / "ppo"
  _train("configs/llava_rlhf/ppo.py:runlocal", ppo_dir, **{
    "init_from": str(tiny_model), "ppo.reward_model": str(rm_hf),
    "data.path": str(files["prompts"]), "data.image_folder": str(files["images"]),
    "data.captions_path": str(files["captions"]),
  })  # fmt: skip
  assert len(_steps(ppo_dir)) == 2
  _check_export_loads(ppo_dir, tmp_path / "ppo_hf", tiny_model)


def test_rlaifv_dpo_runlocal_on_the_dataset_parquet(tmp_path, tiny_model):
  parquet = write_rlaifv_parquet(tmp_path / "RLAIF-V-Dataset-withlogp_000.parquet")
  workdir = tmp_path / "run"
  _train("configs/rlaifv/dpo.py:runlocal", workdir,
         **{"init_from": str(tiny_model), "data.path": str(parquet)})  # fmt: skip
  steps = _steps(workdir)
  assert len(steps) == 2
  assert steps[0]["logps/ref_chosen"] == pytest.approx(np.mean([-30.0 - i for i in range(N)]))
  _check_export_loads(workdir, tmp_path / "hf", tiny_model)


def test_rlaifv_loop_runlocal_runs_a_round(tmp_path, tiny_model):
  workdir = tmp_path / "loop"
  _train("configs/rlaifv/iterative.py:runlocal", workdir,
         **{"init_from": str(tiny_model), "feedback.labeler": str(tiny_model)})  # fmt: skip
  round_dir = workdir / "round_1"
  for stage in ("prompts", "candidates", "feedback", "pairs", "dpo", "export", "eval"):
    assert (round_dir / stage / "done").exists(), stage
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["feedback"] == "rlaifv" and len(summary["rounds"]) == 2  # round 0 and 1
  # A 2-step policy labelled by itself finds no pairs, so the round keeps its policy (DPO is
  # skipped and reported); the round's export is that policy, loadable as ever.
  trained = not (round_dir / "dpo" / "skipped.json").exists()
  _check_export_loads(None, round_dir / "export", tiny_model, trained=trained)


def test_llava_rlhf_sft_runlocal_on_llava_json(tmp_path, tiny_model):
  data, images = write_llava_json(tmp_path / "data")
  workdir = tmp_path / "run"
  _train("configs/llava_rlhf/sft.py:runlocal", workdir,
         **{"init_from": str(tiny_model), "data.path": str(data), "data.image_folder": str(images)})  # fmt: skip
  steps = _steps(workdir)
  assert len(steps) == 2 and all(np.isfinite(s["loss"]) for s in steps)
  _check_export_loads(workdir, tmp_path / "hf", tiny_model)


def test_llava_critic_loop_runlocal_runs_a_round_judged_by_the_critic(tmp_path, tiny_model):
  workdir = tmp_path / "loop"
  _train("configs/llava_critic/iterative_dpo.py:runlocal", workdir,
         **{"init_from": str(tiny_model), "feedback.critic": str(tiny_model)})  # fmt: skip
  round_dir = workdir / "round_1"
  for stage in ("prompts", "candidates", "feedback", "pairs", "dpo", "export", "eval"):
    assert (round_dir / stage / "done").exists(), stage
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["feedback"] == "critic" and summary["critic"] == str(tiny_model)
  labelled = [json.loads(x) for x in (round_dir / "feedback" / "labelled.jsonl").open()]
  assert labelled and all("score" in r for r in labelled)
  assert (round_dir / "export" / "config.json").exists()
