"""PPO on an anyres (LLaVA-OneVision) policy: tiles through rollout, scoring and the update.

A tiny random OneVision folder (headless SigLIP + Qwen2, anyres_max_1, a BPE tokenizer with
ChatML markup, its image processor beside it) is the policy; the reward model is the same
backbone with a random head (LLaVA-RLHF's RM starts from the policy's own SFT model), on the
ChatML reward prompt. Three prompts in prompts_jsonl: images of two aspect ratios (3 and 5
tiles) and a text-only one, two samples each.

Checks: each rollout row holds its image's packed placeholder count, its tiles and plan; the
rollout's policy log-probs equal log-probs from transformers' logits on the same weights and
the sampled tokens; the reward model's scores equal its head on transformers' last hidden
state; two PPO iterations run (finite losses, the vision tower and image_newline trained);
a reward model with another image processor is refused, naming the field.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
import tiny_hf
import torch
import transformers
from PIL import Image
from safetensors.numpy import save_file

from configs.shapes import ppo as shapes_ppo
from lmm_align import hf, main
from lmm_align.data import reward_data, sources
from lmm_align.hf.reward import HEAD_FILE, INFO_FILE, load_reward_model
from lmm_align.models import anyres
from lmm_align.trainers import ppo

# (height, width): a wide 1 x 2 grid (3 tiles) and a tall 2 x 2 grid (5 tiles, downsampled by
# anyres_max_1); None: a text-only prompt.
SIZES = ((20, 64), (60, 44), None)
QUESTIONS = ("Describe the image.", "What is on the left?", "Name a colour.")


def _image(i: int, size) -> Image.Image:
  return Image.fromarray(np.random.default_rng(i).integers(0, 256, (*size, 3), np.uint8))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
  root = tmp_path_factory.mktemp("ppo_anyres")
  texts = [*QUESTIONS, "You are a helpful assistant.", reward_data.DEFAULT_VANILLA_PROMPT]
  tokenizer = tiny_hf.chatml_tokenizer(texts * 2)
  torch.manual_seed(0)
  policy, next_policy = root / "policy", root / "next"
  tiny_hf.save_onevision_for(tokenizer, policy)
  # A LLaVA-NeXT (CLIP + LLaMA) on the same tokenizer; its processor derived from the model.
  tiny_hf.save_next_for(tokenizer, next_policy)
  rng = np.random.default_rng(0)
  head = {"weight": rng.normal(size=(1, 64)).astype(np.float32), "bias": np.float32([0.1])}
  info = {"fact_augmented": False, "prompt": reward_data.load_reward_prompt(None, False),
          "facts_position": "after_response", "fact_lead_in": None,
          "score_position": "last_token"}  # fmt: skip
  for folder, rm in ((policy, root / "rm"), (next_policy, root / "rm_next")):
    shutil.copytree(folder, rm)
    save_file(head, str(rm / HEAD_FILE), metadata={"format": "pt"})
    (rm / INFO_FILE).write_text(json.dumps(info))
  images = root / "images"
  images.mkdir()
  rows = []
  for i, (size, question) in enumerate(zip(SIZES, QUESTIONS)):
    if size is not None:
      _image(i, size).save(images / f"p{i}.png")
    rows.append({"id": f"p{i}", "image": f"p{i}.png" if size else None, "question": question})
  (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return {"root": root, "policy": policy, "rm": root / "rm", "next": next_policy,
          "rm_next": root / "rm_next", "tokenizer": tokenizer, "head": head}  # fmt: skip


def _config(folders, **overrides):
  config = shapes_ppo.get_config("runlocal,vanilla,lora=0")
  config.eval.enabled = False
  config.optim.schedule = "constant"
  config.optim.warmup_steps = 0
  config.optim.lr = 1e-3
  root = folders["root"]
  return main.apply_overrides(config, {
    "init_from": str(folders["policy"]), "ppo.reward_model": str(folders["rm"]),
    "data.source": "prompts_jsonl", "data.path": str(root / "prompts.jsonl"),
    "data.image_folder": str(root / "images"), "data.template": "qwen_1_5",
    "mesh.sizes": (1, 1, 1), "mesh.num_devices": 1, "ppo.query_len": 256,
    "ppo.max_new_tokens": 6, "ppo.rollout_batch_size": 6, "ppo.samples_per_prompt": 2,
    "ppo.step_batch_size": 2, "ppo.forward_batch_size": 4, "ppo.reward_buckets": (640,),
    "ppo.noptepochs": 1, "ppo.correct_coef": 0.0, "total_steps": 2, **overrides,
  })  # fmt: skip


HF_CLASSES = {
  "onevision": transformers.LlavaOnevisionForConditionalGeneration,
  "next": transformers.LlavaNextForConditionalGeneration,
}
# The policies' templates: OneVision's ChatML, LLaVA-NeXT-Vicuna's USER/ASSISTANT.
TEMPLATES = {"onevision": "qwen_1_5", "next": "vicuna_v1"}


@pytest.fixture(scope="module", params=sorted(HF_CLASSES))
def rollout(folders, request):
  """One rollout of the three prompts (two samples each) on the folder's own weights, for a
  OneVision policy and a NeXT one (each with its own reward model)."""
  name = request.param
  policy = folders["policy" if name == "onevision" else "next"]
  config = _config(folders, **{
    "init_from": str(policy), "data.template": TEMPLATES[name],
    "ppo.reward_model": str(folders["rm" if name == "onevision" else "rm_next"]),
  })  # fmt: skip
  tokenizer = folders["tokenizer"]
  model, params = hf.load_pretrained(policy)
  rm, value_model, value_head = ppo.reward_and_value_models(config.ppo, model.config)
  image_config, tiling = sources.image_batching(config, model.config)
  assert image_config is None and tiling.tile_buckets == (5,)
  ppo.check_reward_model_images(config, model.config, rm)
  data = ppo.prompt_data(config, tokenizer, model.config, tiling)
  assert data.stats["kept"] == 3
  rollouts = ppo.Rollouts(
    config, tokenizer, model, value_model, value_head, rm, image_config, None, tiling
  )
  value_head_params = {"kernel": np.zeros(64, np.float32), "bias": np.float32(0.0)}
  params_tree = {"policy": params, "value": {"backbone": rm.backbone, "head": value_head_params}}
  frozen = {"policy_base": None, "reference": params, "value_base": None}
  prompts = ppo.rollout_prompts(data, 0, config.ppo)
  batch, metrics, texts = rollouts.collect(
    params_tree, frozen, prompts, jax.random.key(0), 0, config.ppo.kl_coef
  )
  return {"batch": batch, "metrics": metrics, "prompts": prompts, "model": model,
          "rollouts": rollouts, "config": config, "rm": rm, "name": name,
          "folder": policy}  # fmt: skip


def test_rollout_rows_carry_each_prompts_tiles_and_packed_placeholders(rollout):
  batch, prompts, config = rollout["batch"], rollout["prompts"], rollout["model"].config
  assert batch["pixel_values"].shape == (6, 5, 32, 32, 3)
  assert batch["pack_plan.taps"].shape == (6, 256, 2, 2)  # a budget of query_len tokens
  for row, p in enumerate(prompts):
    size = SIZES[int(p.record_id[1:])]
    count = int((batch["input_ids"][row] == config.image_token_id).sum())
    if size is None:
      assert count == 0 and batch["image_sizes"][row].tolist() == [0, 0]
      assert not batch["pixel_values"][row].any() and not batch["pack_plan.valid"][row].any()
      continue
    assert batch["image_sizes"][row].tolist() == list(size)
    assert (
      count == anyres.num_image_tokens(size, config.packing) == (batch["pack_plan.num_tokens"][row])
    )
    tiles = anyres.num_tiles(size, config.packing)
    assert batch["pixel_values"][row, :tiles].any() and not batch["pixel_values"][row, tiles:].any()
  assert {p.record_id for p in prompts} == {"p0", "p1", "p2"}
  assert batch["response_mask"].sum(1).min() >= 1


def _hf_row_logits(ref, batch, row, tiles_of) -> tuple[np.ndarray, int]:
  """transformers' float64 log-softmax over row `row`'s real tokens, and where its query ends."""
  real = batch["attention_mask"][row] > 0
  ids = batch["input_ids"][row][real].astype(np.int64)
  extra = {}
  size = tuple(int(x) for x in batch["image_sizes"][row])
  if size[0]:
    pixels = batch["pixel_values"][row : row + 1, : tiles_of(size)].transpose(0, 1, 4, 2, 3)
    extra = {"pixel_values": torch.from_numpy(np.ascontiguousarray(pixels)),
             "image_sizes": torch.tensor([size])}  # fmt: skip
  with torch.no_grad():
    out = ref(input_ids=torch.from_numpy(ids)[None], output_hidden_states=True, **extra)
  q = int(real[: -batch["response_mask"].shape[1]].sum())
  return out, q


def test_rollout_logps_and_rm_scores_equal_transformers(rollout, folders):
  batch, config = rollout["batch"], rollout["model"].config
  ref = HF_CLASSES[rollout["name"]].from_pretrained(rollout["folder"]).eval()
  tiles_of = lambda size: anyres.num_tiles(size, config.packing)
  n = batch["response_mask"].shape[1]
  # The value model (the reward model's backbone) with a random head, on the same rows.
  value_head = {"kernel": np.random.default_rng(1).normal(size=64).astype(np.float32),
                "bias": np.float32(-0.2)}  # fmt: skip
  values = np.asarray(rollout["rollouts"]._values(
    {"params": rollout["rm"].backbone}, value_head, {k: jax.numpy.asarray(v)
                                                     for k, v in batch.items()},
  ))  # fmt: skip
  for row in range(len(batch["input_ids"])):
    out, q = _hf_row_logits(ref, batch, row, tiles_of)
    logp = torch.log_softmax(out.logits[0].double(), -1).numpy()
    k = int(batch["response_mask"][row].sum())
    tokens = batch["input_ids"][row, -n:][:k]
    want = logp[np.arange(q - 1, q - 1 + k), tokens]
    np.testing.assert_allclose(batch["old_logps"][row, :k], want, atol=1e-4, rtol=0)
    assert not batch["old_logps"][row, k:].any()
    # V(state before response token t): the head on the hidden state that predicts it.
    hidden = out.hidden_states[-1][0].double().numpy()[q - 1 : q - 1 + k]
    want_values = hidden @ value_head["kernel"] + value_head["bias"]
    np.testing.assert_allclose(values[row, :k], want_values, atol=1e-4, rtol=0)

  # The reward model (the same backbone) on query + response + the request in the policy's
  # template: its head on transformers' final hidden state at the last token.
  rollouts, prompts = rollout["rollouts"], rollout["prompts"]
  responses = [
    batch["input_ids"][r, -n:][: int(batch["response_mask"][r].sum())].tolist() for r in range(6)
  ]
  images = {k: batch[k] for k in batch if k in ("pixel_values", "image_sizes")}
  images.update({k: v for k, v in batch.items() if k.startswith("pack_plan.")})
  scores = rollouts._score(prompts, list(range(6)), responses, images, 0)
  tokenizer = folders["tokenizer"]
  template = TEMPLATES[rollout["name"]]
  suffix = reward_data.suffix_ids(reward_data.load_reward_prompt(None, False), tokenizer,
                                  template)  # fmt: skip
  opening = {"qwen_1_5": "\n<|im_start|>user\nNow review", "vicuna_v1": " USER: Now review"}
  assert tokenizer.decode(suffix).startswith(opening[template])
  w, b = folders["head"]["weight"][0], float(folders["head"]["bias"][0])
  for row, p in enumerate(prompts):
    ids = [*p.input_ids, *responses[row], *suffix]
    size = tuple(int(x) for x in batch["image_sizes"][row])
    extra = {}
    if size[0]:
      pixels = batch["pixel_values"][row : row + 1, : tiles_of(size)].transpose(0, 1, 4, 2, 3)
      extra = {"pixel_values": torch.from_numpy(np.ascontiguousarray(pixels)),
               "image_sizes": torch.tensor([size])}  # fmt: skip
    with torch.no_grad():
      hidden = ref(input_ids=torch.tensor([ids]), output_hidden_states=True, **extra)
    last = hidden.hidden_states[-1][0, -1].double().numpy()
    assert scores[row] == pytest.approx(float(last @ w + b), abs=1e-4)
  assert np.ptp(scores) > 1e-3
  np.testing.assert_allclose(rollout["metrics"]["reward/rm"], scores.mean(), atol=1e-5)


def test_two_ppo_iterations_train_an_anyres_policy(folders, tmp_path):
  """ppo.train end to end on the 2-device data mesh: finite losses, the policy's vision tower,
  projector and image_newline changed."""
  config = _config(folders, **{"mesh.sizes": (-1, 1, 1), "mesh.num_devices": 2})
  summary = ppo.train(config, str(tmp_path / "run"))
  assert summary["data"]["kept"] == 3
  metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in metrics] == [1, 2]
  for m in metrics:
    for key in ("loss", "policy_loss", "value_loss", "grad_norm", "reward/rm", "kl"):
      assert np.isfinite(m[key]), key
  assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the policy is its reference
  assert metrics[1]["kl"] != 0.0
  model, start = hf.load_pretrained(folders["policy"])
  trained, base, _ = ppo.restore_policy(config, str(tmp_path / "run"), model)
  assert base is None
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), trained,
                       start)  # fmt: skip
  assert moved["image_newline"] > 0
  assert moved["vision_tower"]["patch_embedding"]["kernel"] > 0
  assert moved["multi_modal_projector"]["linear_1"]["kernel"] > 0


def test_a_reward_model_with_another_image_processor_is_refused(folders, tmp_path):
  other = tmp_path / "rm_other"
  shutil.copytree(folders["rm"], other)
  path = other / "preprocessor_config.json"
  processor = json.loads(path.read_text())
  processor["image_mean"] = [0.4, 0.4, 0.4]
  path.write_text(json.dumps(processor))
  config = _config(folders, **{"ppo.reward_model": str(other)})
  model_config = hf.load_pretrained(folders["policy"])[0].config
  with pytest.raises(ValueError, match=r"image processor mean \(policy \(0.5, 0.5, 0.5\)"):
    ppo.check_reward_model_images(config, model_config, load_reward_model(str(other)))


def test_a_chatml_reward_model_trains_exports_and_scores_ppo_rollouts(folders, tmp_path):
  """`reward.train` on the OneVision with its ChatML template (qwen_1_5) on anyres pairs, its
  export, and one PPO iteration scored by that exported reward model."""
  from lmm_align import config_files
  from lmm_align.trainers import reward

  pairs = []
  for i, (size, question) in enumerate(list(zip(SIZES, QUESTIONS)) * 2):
    pairs.append({"id": f"r{len(pairs)}", "image": f"p{i % 3}.png" if size else None,
                  "question": question, "chosen": "A red square.", "rejected": "Two stars."})  # fmt: skip
  (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
  repo = pathlib.Path(__file__).resolve().parents[2]
  config = config_files.load_config("configs/shapes/reward.py:runlocal,vanilla", str(repo))
  config = main.apply_overrides(config, {
    "init_from": str(folders["policy"]), "data.source": "pairs_jsonl",
    "data.path": str(tmp_path / "pairs.jsonl"), "data.image_folder": str(folders["root"] / "images"),
    "data.template": "qwen_1_5", "data.max_length": 640, "data.buckets": (640,),
    "batch_size": 2, "total_steps": 2, "mesh.num_devices": 2, "mesh.sizes": (-1, 1, 1),
    "reward.eval_pairs": 1, "optim.warmup_steps": 0,
  })  # fmt: skip
  reward.train(config, str(tmp_path / "rm"))
  metrics = [json.loads(x) for x in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
  assert len(metrics) == 2 and all(np.isfinite(m["loss"]) for m in metrics)
  data, _ = reward.reward_data(
    config, folders["tokenizer"], hf.load_pretrained(folders["policy"])[0].config
  )
  batch = data.rows(np.arange(len(data)))
  # The recipe's own prompt file (USER: ... ASSISTANT: ...), rendered as ChatML turns.
  prompt = reward_data.load_reward_prompt(config.reward.prompt_path, fact_augmented=False)
  tail = reward_data.suffix_ids(prompt, folders["tokenizer"], "qwen_1_5")
  assert folders["tokenizer"].decode(tail).startswith("\n<|im_start|>user\n")
  for ids, mask in zip(
    batch["input_ids"].reshape(-1, 640), batch["attention_mask"].reshape(-1, 640)
  ):
    assert ids[: mask.sum()][-len(tail) :].tolist() == tail  # each sequence ends on the request
  reward.export_reward_workdir(str(tmp_path / "rm"), str(tmp_path / "rm_hf"))
  ppo_config = _config(folders, **{"ppo.reward_model": str(tmp_path / "rm_hf"), "total_steps": 1})
  ppo.train(ppo_config, str(tmp_path / "ppo"))
  (m,) = [json.loads(x) for x in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
  assert np.isfinite(m["reward/rm"]) and np.isfinite(m["loss"])


def test_prompts_are_dropped_not_cut_and_tiles_follow_the_buckets(folders):
  """Placeholders count before the length limit (an image prompt that no longer fits is
  dropped, never cut), an image past the largest tile bucket is dropped, and a rollout's
  tiles are the smallest of data.tile_buckets that holds its images."""
  import types

  tokenizer = folders["tokenizer"]
  model_config = hf.load_pretrained(folders["policy"])[0].config
  config = _config(folders)
  with config.unlocked():
    config.data.tile_buckets = (3, 5)
  _, tiling = sources.image_batching(config, model_config)
  data = ppo.prompt_data(config, tokenizer, model_config, tiling)
  text_only = len(data.prompts[2].input_ids)
  image_len = len(data.prompts[0].input_ids)
  assert image_len > anyres.num_image_tokens(SIZES[0], model_config.packing)
  fields = lambda prompts: ppo.Rollouts._image_fields(
    types.SimpleNamespace(tiling=tiling, ppo=config.ppo), prompts
  )
  wide_and_text = fields([data.prompts[0], data.prompts[0], data.prompts[2]])
  assert wide_and_text["pixel_values"].shape[:2] == (3, 3)
  np.testing.assert_array_equal(wide_and_text["pixel_values"][0], wide_and_text["pixel_values"][1])
  assert fields(data.prompts)["pixel_values"].shape[:2] == (3, 5)

  config.ppo.query_len = text_only  # the text-only prompt fits, the images' do not
  short = ppo.prompt_data(config, tokenizer, model_config, tiling)
  assert [p.record_id for p in short.prompts] == ["p2"]
  assert short.stats["dropped_query_too_long"] == 2
  config.ppo.query_len = 256
  config.data.tile_buckets = (3,)
  _, three = sources.image_batching(config, model_config)
  few = ppo.prompt_data(config, tokenizer, model_config, three)
  assert [p.record_id for p in few.prompts] == ["p0", "p2"]
  assert few.stats["dropped_too_many_tiles"] == 1
