"""POPE evaluation throughput of `lmm-align eval pope`: questions per second, and where the time
goes (generation, scoring, the report).

  python experiments/bench/eval_pope.py [--questions=500] [--batch_size=32] [--max_new_tokens=8]

A model of the "shapes" variant's size (text: hidden 128, 4 layers; vision: 48 px, 16 px patches,
so 9 image tokens) with random weights and a BPE tokenizer trained on the probe texts is
exported as an HF folder with its processor, as `lmm-align export` writes one. The questions are
shapes-world POPE probes (`make_pope_probes`) over held-out scenes, split evenly over the three
negative-sampling strategies and written as three POPE question files with the scenes as PNG
files. The run is the command's own (`evaluate.run_pope` then `evaluate.write_outputs`, as
`cli` calls them), with LLaVA's short-answer suffix. One warm-up batch compiles the sampler first
(every probe falls in one prompt-length bucket), so the timed generation is steady state; its
time is measured around each batch (preprocessing, sampling, decoding), and scoring is the rest
of `run_pope` (reading and writing answer files, the POPE scorer, picking examples).

Random weights never emit EOS, so every answer runs the full `--max_new_tokens`: the worst case
for generation. On a small shared CPU the numbers move with the machine's load.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

from lmm_align import evaluate, hf, inference  # noqa: E402
from lmm_align.data import conversation  # noqa: E402
from lmm_align.data.images import ImageProcessorConfig  # noqa: E402
from lmm_align.data.tokenizer import train_bpe_tokenizer  # noqa: E402
from lmm_align.models import Llava, get_variant, init_params  # noqa: E402
from lmm_align.shapes import world as shapes  # noqa: E402
from lmm_align.shapes.benchmarks import POPE_STRATEGIES, make_pope_probes  # noqa: E402
from lmm_align.trainers.export import hf_processor  # noqa: E402

SCENE_SEED = 12345  # the shapes configs' held-out eval seed


def export_random_model(folder: pathlib.Path, texts: list[str]) -> str:
  """A random "shapes"-sized LLaVA with a tokenizer trained on `texts`, as an HF folder."""
  template = conversation.get_template(inference.DEFAULT_CONV_TEMPLATE)
  tokenizer = train_bpe_tokenizer([template.system, *texts], vocab_size=600)
  base = get_variant("shapes")
  text = dataclasses.replace(
    base.text,
    vocab_size=len(tokenizer),
    pad_token_id=tokenizer.pad_token_id,
    bos_token_id=tokenizer.bos_token_id,
    eos_token_id=tokenizer.eos_token_id,
  )
  config = base.replace(text=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
  model = Llava(config)
  side = config.vision.image_size
  processor = hf_processor(tokenizer, model, ImageProcessorConfig(size=side, crop_size=side))
  hf.save_pretrained(model, init_params(config, jax.random.key(0)), folder, processor=processor)
  return str(folder)


def write_pope_files(root: pathlib.Path, total: int) -> list[str]:
  """Three POPE question files (one per strategy, `total` questions in all) and scene PNGs."""
  world = shapes.ShapesWorldConfig(image_size=48, max_objects=3)
  scenes = shapes.make_scenes(max(20, total // 3), world, seed=SCENE_SEED)
  images = root / "images"
  images.mkdir()
  for scene in scenes:
    shapes.render(scene, world.image_size).save(images / f"{scene.id}.png")
  paths = []
  for i, strategy in enumerate(POPE_STRATEGIES):
    count = total // 3 + (i < total % 3)
    probes = make_pope_probes(scenes, strategy, seed=SCENE_SEED, image_size=world.image_size)
    if len(probes) < count:
      raise ValueError(f"{len(probes)} {strategy} probes, need {count}: use more scenes")
    path = root / f"shapes_pope_{strategy}.json"
    path.write_text("".join(
      json.dumps({"question_id": p["question_id"], "image": f"{p['image_id']}.png",
                  "text": p["text"], "label": p["label"]}) + "\n" for p in probes[:count]
    ))  # fmt: skip
    paths.append(str(path))
  return paths


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--questions", type=int, default=500)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--max_new_tokens", type=int, default=8)
  flags = parser.parse_args()

  root = pathlib.Path(tempfile.mkdtemp(prefix="eval_pope_bench_"))
  start = time.perf_counter()
  question_files = write_pope_files(root, flags.questions)
  texts = [json.loads(line)["text"] for f in question_files for line in open(f)]
  model_dir = export_random_model(root / "model", texts)
  print(f"setup (scenes, tokenizer, export): {time.perf_counter() - start:.1f} s")

  args = evaluate.parse_args([
    "pope", f"--model={model_dir}", f"--questions={','.join(question_files)}",
    f"--images={root / 'images'}", f"--out={root / 'out'}", "--suffix",
    f"--batch_size={flags.batch_size}", f"--max_new_tokens={flags.max_new_tokens}",
  ])  # fmt: skip
  start = time.perf_counter()
  loaded = inference.load_model_folder(args.model, template=inference.DEFAULT_CONV_TEMPLATE)
  answerer = evaluate.model_answerer(
    loaded, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens
  )
  print(f"load model folder: {time.perf_counter() - start:.2f} s")

  with open(question_files[0]) as f:
    first = [json.loads(next(f))]
  warm_up = evaluate.jsonl_questions(question_files[0], first, args)
  start = time.perf_counter()
  answerer.answer_batch(warm_up)
  print(f"warm-up batch (compilation): {time.perf_counter() - start:.1f} s")

  generating = []

  def timed_batch(questions):
    begin = time.perf_counter()
    texts = answerer.answer_batch(questions)
    generating.append(time.perf_counter() - begin)
    return texts

  args.model_id = loaded.model_id
  os.makedirs(args.out)
  start = time.perf_counter()
  outcome = evaluate.run_pope(args, dataclasses.replace(answerer, answer_batch=timed_batch))
  run_seconds = time.perf_counter() - start
  start = time.perf_counter()
  evaluate.write_outputs(args.out, args, outcome)
  report_seconds = time.perf_counter() - start

  generation = sum(generating)
  scoring = run_seconds - generation
  total = run_seconds + report_seconds
  print(f"device: {jax.devices()[0].platform}, questions: {flags.questions}, "
        f"batch_size: {flags.batch_size}, max_new_tokens: {flags.max_new_tokens}, "
        f"batches: {len(generating)}")  # fmt: skip
  print(f"generation: {generation:.2f} s ({100 * generation / total:.1f}%)")
  print(f"scoring (answer files, scorer, examples): {scoring:.3f} s ({100 * scoring / total:.1f}%)")
  print(f"report (metrics.json, plot, thumbnails): {report_seconds:.3f} s "
        f"({100 * report_seconds / total:.1f}%)")  # fmt: skip
  print(f"pope f1 (random weights): {outcome.metrics['f1']:.3f}")
  print(f"questions_per_second: {flags.questions / total:.1f} "
        f"(generation alone: {flags.questions / generation:.1f})")  # fmt: skip


if __name__ == "__main__":
  main()
