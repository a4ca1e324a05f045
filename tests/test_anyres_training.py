"""Anyres SFT batches end to end: `configs/llava_critic/critic.py:runlocal` on a tiny random
LLaVA-OneVision folder (headless SigLIP + Qwen2, anyres_max_1 so that grids are downsampled,
a BPE tokenizer with ChatML markup) and LLaVA-Critic parquet rows whose images have two aspect
ratios (3 and 5 tiles, so a batch pads tiles to its bucket).

Checks: the placeholders per row are the processor's count for the row's image; a row of a
padded batch (tiles, plan tokens and sequence padded) gives transformers' logits for that row
alone, on transformers' own preprocessing of the raw image; every batch has the shapes of its
(length, tiles) bucket whatever its images; training lowers the loss; the export loads in
transformers and is the trained model.
"""

from __future__ import annotations

import io
import json
import pathlib

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiny_hf
import torch
import transformers
from PIL import Image

from lmm_align import config_files, hf, main, run_config
from lmm_align.data import pipeline, sources
from lmm_align.data.tokenizer import train_bpe_tokenizer
from lmm_align.models import anyres
from lmm_align.trainers import export

REPO = pathlib.Path(__file__).resolve().parents[1]
# (height, width): a wide 1 x 2 grid (3 tiles) whose unpadded 2 x 8 map stays, and a tall
# 2 x 2 grid (5 tiles) whose 8 x 6 map anyres_max_1 downsamples to 4 x 3; rows alternate.
SIZES = ((20, 64), (60, 44))
ROWS = 8
IM_TOKENS = ("<|im_start|>", "<|im_end|>", "<video>")


def _png(i: int) -> bytes:
  h, w = SIZES[i % 2]
  pixels = np.random.default_rng(i).integers(0, 256, (h, w, 3), np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, "PNG")
  return buffer.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, pathlib.Path]:
  """A tiny OneVision HF folder (tokenizer and preprocessor_config.json beside it) and a
  LLaVA-Critic pointwise parquet of ROWS rows."""
  root = tmp_path_factory.mktemp("anyres_sft")
  critiques = [f"The answer names a {c} shape. Final Score: {10 * (i + 1)}"
               for i, c in enumerate(["red", "green", "blue", "round"] * 2)]  # fmt: skip
  prompt = "Score the response out of 100.\nQuestion: [Describe it.]\nThe LMM response: [A shape.]"
  tokenizer = train_bpe_tokenizer([prompt, *critiques, "You are a helpful assistant."], 300)
  tokenizer.add_special_tokens({"additional_special_tokens": list(IM_TOKENS)})
  folder = root / "ov"
  torch.manual_seed(0)
  config = transformers.LlavaOnevisionConfig(
    vision_config=tiny_hf.siglip_config(vision_use_head=False),
    text_config=tiny_hf.qwen2_config(vocab_size=len(tokenizer), pad_token_id=3),
    image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
    projector_hidden_act="gelu", vision_feature_layer=-1, vision_feature_select_strategy="full",
    vision_aspect_ratio="anyres_max_1", image_grid_pinpoints=tiny_hf.ONEVISION_PINPOINTS,
  )  # fmt: skip
  model = transformers.LlavaOnevisionForConditionalGeneration(config).eval()
  model.save_pretrained(folder)
  tokenizer.save_pretrained(folder)
  transformers.LlavaOnevisionImageProcessorPil(
    size={"height": 32, "width": 32}, image_grid_pinpoints=tiny_hf.ONEVISION_PINPOINTS,
    image_mean=[0.5] * 3, image_std=[0.5] * 3, do_pad=True,
  ).save_pretrained(folder)  # fmt: skip

  turn = pa.struct([("from", pa.string()), ("value", pa.string())])
  image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
  parquet = root / "pointwise-00000-of-00001.parquet"
  pq.write_table(pa.table({
    "id": pa.array([f"critic_{i}" for i in range(ROWS)]),
    "source": pa.array(["vlfeedback"] * ROWS),
    "conversations": pa.array(
      [[{"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": c}]
       for c in critiques], pa.list_(turn)),
    "image": pa.array([{"bytes": _png(i), "path": f"{i}.png"} for i in range(ROWS)], image),
  }), parquet)  # fmt: skip
  return {"model": folder, "parquet": parquet, "root": root}


def _config(files, **overrides):
  config = config_files.load_config("configs/llava_critic/critic.py:runlocal", str(REPO))
  return main.apply_overrides(config, {
    "init_from": str(files["model"]), "data.path": str(files["parquet"]),
    "data.template": "qwen_1_5", **overrides,
  })  # fmt: skip


def test_a_padded_anyres_batch_row_equals_transformers_on_the_row_alone(files):
  config = _config(files)
  tokenizer = sources.tokenizer_for(config, str(files["root"]))
  model_config = run_config.model_config_for(config, tokenizer)
  data = sources.sft_data(config, tokenizer, model_config)
  assert data.tiling.tile_buckets == (3, 5) and len(data) == ROWS
  counts = [anyres.num_image_tokens(s, model_config.packing) for s in SIZES]
  assert counts == [16 + 2 * 9, 16 + 4 * 4]  # base tile + the map's rows with their newlines
  per_row = np.stack([e.input_ids for e in data.examples[:2]]) == model_config.image_token_id
  assert per_row.sum(1).tolist() == counts

  batch = data.local_batch(0, ROWS)
  assert batch["pixel_values"].shape == (ROWS, 5, 32, 32, 3)
  assert batch["pack_plan.taps"].shape == (ROWS, 256, 2, 2)
  assert batch["pack_plan.num_tokens"].tolist() == [
    counts[SIZES.index(tuple(s))] for s in batch["image_sizes"]
  ]
  # One (length, tiles) bucket, whatever the images: every batch has the same shapes.
  shapes = lambda b: {k: (v.shape, v.dtype) for k, v in b.items()}
  assert all(shapes(data.local_batch(s, ROWS)) == shapes(batch) for s in (1, 2))
  only_wide = [i for i, e in enumerate(data.examples) if e.image_size == SIZES[0]]
  wide = data._tiled_fields(np.asarray(only_wide), 256, 3)
  assert wide["pixel_values"].shape[1] == 3 and np.all(wide["pack_plan.num_tokens"] == counts[0])

  model, params = hf.load_pretrained(files["model"])
  apply = jax.jit(lambda p, b: model.apply(
    {"params": p}, b["input_ids"], attention_mask=b["attention_mask"], **pipeline.image_inputs(b)
  ).logits)  # fmt: skip
  logits = np.asarray(apply(params, batch))
  ref = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(files["model"]).eval()
  processor = transformers.LlavaOnevisionImageProcessorPil.from_pretrained(files["model"])
  order = data.global_indices(0, ROWS)
  for size in SIZES:  # one row of each aspect ratio
    row = next(r for r in range(ROWS) if tuple(batch["image_sizes"][r]) == size)
    n = int(batch["attention_mask"][row].sum())
    raw = Image.open(io.BytesIO(_png(int(data.examples[order[row]].record_id.split("_")[1]))))
    pixels = processor(images=raw.convert("RGB"), return_tensors="pt")
    with torch.no_grad():
      expected = ref(
        input_ids=torch.from_numpy(batch["input_ids"][row : row + 1, :n].astype(np.int64)),
        pixel_values=pixels["pixel_values"], image_sizes=pixels["image_sizes"],
      ).logits.numpy()[0]  # fmt: skip
    np.testing.assert_allclose(logits[row, :n], expected, atol=1e-4, rtol=0)


def test_critic_runlocal_trains_a_tiny_onevision_and_exports_it(files, tmp_path):
  workdir = tmp_path / "run"
  summary = main.train(_config(files, **{"total_steps": 6, "optim.lr": 3e-3}), str(workdir))
  losses = [json.loads(x)["loss"] for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert len(losses) == 6 and np.all(np.isfinite(losses))
  assert losses[-1] < losses[0] - 0.1, losses
  assert summary["data"]["kept"] == ROWS

  out = tmp_path / "hf"
  export.export_workdir(str(workdir), str(out))
  assert json.loads((out / "preprocessor_config.json").read_text())["image_grid_pinpoints"]
  trained = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(out).eval()
  start = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(files["model"])
  processor = transformers.LlavaOnevisionImageProcessorPil.from_pretrained(out)
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  pixels = processor(images=Image.open(io.BytesIO(_png(1))).convert("RGB"), return_tensors="pt")
  n = anyres.num_image_tokens(SIZES[1], hf.load_pretrained(out)[0].config.packing)
  ids = (
    [tokenizer.convert_tokens_to_ids("<|im_start|>")]
    + [tokenizer.convert_tokens_to_ids("<image>")] * n
    + [9]
  )
  logits = []
  for model in (trained, start.eval()):
    with torch.no_grad():
      logits.append(model(input_ids=torch.tensor([ids]), **pixels).logits.numpy())
  assert np.isfinite(logits[0]).all() and np.abs(logits[0] - logits[1]).max() > 1e-3


def test_llava_critic_judge_feeds_tiles_and_replies_as_transformers_generate(files, tmp_path):
  """The in-process LLaVA-Critic judge on a OneVision model: each image goes in as its anyres
  tiles with the placeholders they pack into; greedy replies equal transformers' `generate`
  on transformers' preprocessing (a single resized image would not even match its count)."""
  from lmm_align.data import conversation
  from lmm_align.data.anyres import AnyresImageConfig
  from lmm_align.data.tokenizer import load_tokenizer
  from lmm_align.feedback import critic
  from lmm_align.judges.base import JudgeRequest

  model, params = hf.load_pretrained(files["model"])
  tokenizer = load_tokenizer(files["model"])
  judge = critic.llava_critic_judge(model, params, tokenizer, batch_size=2, max_new_tokens=5)
  assert isinstance(judge.image_config, AnyresImageConfig) and judge.tile_buckets == (5,)
  paths = []
  for i in range(2):
    paths.append(tmp_path / f"{i}.png")
    paths[-1].write_bytes(_png(i))
  prompt = "Score the response out of 100.\nQuestion: [Describe it.]"
  replies = judge.complete([JudgeRequest(prompt, str(p), max_tokens=5) for p in paths])

  ref = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(files["model"]).eval()
  processor = transformers.LlavaOnevisionImageProcessorPil.from_pretrained(files["model"])
  stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
  for i, reply in enumerate(replies):
    n = model.config.image_tokens(SIZES[i])
    ids = conversation.encode_generation_prompt(
      prompt, tokenizer, "qwen_1_5", n, model.config.image_token_id
    ).input_ids
    pixels = processor(images=Image.open(paths[i]).convert("RGB"), return_tensors="pt")
    with torch.no_grad():
      out = ref.generate(
        input_ids=torch.tensor([ids.tolist()]), **pixels, max_new_tokens=5, do_sample=False,
        eos_token_id=[stop, tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id,
      )[0, len(ids) :].tolist()  # fmt: skip
    expected = tokenizer.decode([t for t in out if t != stop], skip_special_tokens=True).strip()
    assert reply.ok and reply.text == expected, (reply, expected)
  assert any(reply.text for reply in replies)  # words compared, not two empty replies


def test_tiling_drops_images_past_the_largest_tile_bucket_and_names_bad_placeholders():
  """No model: a text-only row rides in an anyres batch with no tiles and no plan tokens; an
  image needing more tiles than data.tile_buckets holds is dropped and counted; a record whose
  placeholders are not one run of the written count is refused by name."""
  from lmm_align.data.anyres import image_config_for_model
  from lmm_align.models.variants import get_variant

  config = get_variant("tiny-llava-onevision")
  p, image_id = config.num_image_tokens, config.image_token_id
  tiling = pipeline.AnyresTiling(image_config_for_model(config), config.packing, (3,), p)

  def example(i, size):
    ids = np.array([1] + [image_id] * (p if size else 0) + [7, 8, 9], np.int32)
    labels = np.where(np.arange(len(ids)) >= len(ids) - 2, ids, -100).astype(np.int32)
    image = None if size is None else Image.new("RGB", size[::-1], (i * 40, 90, 200))
    return pipeline.Example(f"r{i}", ids, labels, image)

  data = pipeline.SupervisedData(
    [example(0, SIZES[0]), example(1, SIZES[1]), example(2, None), example(3, SIZES[0])],
    None, max_length=64, buckets=(64,), length_policy="drop", image_token_id=image_id,
    pad_id=0, seed=0, tiling=tiling,
  )  # fmt: skip
  assert data.stats["dropped_too_many_tiles"] == 1 and len(data) == 3  # the 5-tile image
  batch = data.local_batch(0, 3)
  text_row = int(np.flatnonzero(batch["image_sizes"][:, 0] == 0)[0])
  assert batch["pixel_values"].shape == (3, 3, 32, 32, 3)
  assert not batch["pixel_values"][text_row].any() and not batch["pack_plan.valid"][text_row].any()
  assert (batch["input_ids"] == image_id).sum(1).tolist() == batch["pack_plan.num_tokens"].tolist()

  broken = example(4, SIZES[0])
  broken.input_ids[-1] = image_id  # a second, stray placeholder
  with pytest.raises(ValueError, match="record 'r4': expected one run of 17"):
    pipeline.SupervisedData(
      [broken], None, max_length=64, buckets=(64,), length_policy="drop",
      image_token_id=image_id, pad_id=0, seed=0, tiling=tiling,
    )  # fmt: skip


def test_evaluation_answers_tile_images_as_the_judge_does(files, tmp_path):
  """`evals.answers.answer_questions` (every evaluation kind's greedy answers) on a OneVision:
  tiled images of two aspect ratios, placeholders by packed size, a short last batch padded;
  the answers equal the in-process judge's replies (which equal transformers' generate). The
  folder loads for inference with its saved tiling processor."""
  from lmm_align import inference
  from lmm_align.data.anyres import AnyresImageConfig
  from lmm_align.evals.answers import answer_questions
  from lmm_align.judges.base import JudgeRequest
  from lmm_align.judges.model import ModelJudge

  loaded = inference.load_model_folder(str(files["model"]), template="qwen_1_5")
  model, params, tokenizer, image_config = (
    loaded.model,
    loaded.params,
    loaded.tokenizer,
    loaded.image_config,
  )
  assert isinstance(image_config, AnyresImageConfig) and image_config.mean == (0.5, 0.5, 0.5)
  paths = []
  for i in range(3):
    paths.append(tmp_path / f"{i}.png")
    paths[-1].write_bytes(_png(i % 2))
  images = [Image.open(p).convert("RGB") for p in paths]
  question = "Score the response out of 100.\nQuestion: [Describe it.]"
  texts, lengths = answer_questions(
    model, params, tokenizer, image_config, [question] * 3, images, template="qwen_1_5",
    batch_size=2, max_new_tokens=5,
  )  # fmt: skip
  judge = ModelJudge(model, params, tokenizer, image_config, template="qwen_1_5", batch_size=2,
                     max_new_tokens=5)  # fmt: skip
  replies = judge.complete([JudgeRequest(question, str(p), max_tokens=5) for p in paths])
  assert texts == [r.text for r in replies] and texts[0] == texts[2]
  assert len(lengths) == 3 and all(0 < n <= 5 for n in lengths)


def test_yes_no_labeler_tiles_images_and_equals_transformers(files, tmp_path):
  """RLAIF-V's labeler on a LLaVA-NeXT / OneVision (its NeXT-34B): each image goes in as its
  tiles with the placeholders they pack into, questions with and without an image in one
  batch; p_yes and p_no equal the softmax mass of transformers' next-token logits."""
  from lmm_align import inference
  from lmm_align.data import conversation
  from lmm_align.feedback.labeler import AnswerTokens, YesNoLabeler

  loaded = inference.load_model_folder(str(files["model"]), template="qwen_1_5")
  yes, no = (5, 9), (7,)
  labeler = YesNoLabeler(
    loaded.model, loaded.params, loaded.tokenizer, loaded.image_config, template="qwen_1_5",
    batch_size=2, answer_tokens=AnswerTokens(yes, no), padding_side="left",
  )  # fmt: skip
  images = [Image.open(io.BytesIO(_png(i))).convert("RGB") for i in range(2)]
  questions = ["Is the shape red?", "Is it round?", "Is it blue?"]
  asked = [images[0], images[1], None]
  scores = labeler.score(questions, asked)

  ref = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(files["model"]).eval()
  processor = transformers.LlavaOnevisionImageProcessorPil.from_pretrained(files["model"])
  config = loaded.model.config
  for i, (question, image) in enumerate(zip(questions, asked)):
    n = config.image_tokens(SIZES[i]) if image is not None else 1
    ids = conversation.encode_generation_prompt(
      question, loaded.tokenizer, "qwen_1_5", n, config.image_token_id, with_image=image is not None,
      num_images=int(image is not None),
    ).input_ids  # fmt: skip
    extra = {} if image is None else processor(images=image, return_tensors="pt")
    with torch.no_grad():
      logits = ref(input_ids=torch.tensor([ids.tolist()]), **extra).logits[0, -1]
    probs = torch.softmax(logits.double(), -1).numpy()
    np.testing.assert_allclose(scores.p_yes[i], probs[list(yes)].sum(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(scores.p_no[i], probs[list(no)].sum(), rtol=1e-4, atol=1e-6)
  assert scores.p_yes[0] != scores.p_yes[1]  # two images, two different answers
