"""One process of test_multiprocess_sampling.py (run as a script), and the work both sides do.

`sample_and_score` loads a tiny LLaVA folder (`inference.load_model_folder`, onto a mesh or
one device), samples greedily and at temperature 1 (`sampling.generate`: prompts with and
without an image, a batch that does not fill the mesh's row groups) and scores yes/no
questions (`YesNoLabeler`); it returns plain lists. The test runs it in two processes joined by
jax.distributed (each with the same arguments, as the loop's processes are) and in itself.

Usage: python multiprocess_sampling_worker.py FOLDER OUT_JSON (the meshes: MESHES; the
distributed setup comes from LMM_ALIGN_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import sys
from collections.abc import Sequence

import jax
import numpy as np
from PIL import Image

from lmm_align import hf, inference, sampling, sharding
from lmm_align.data import conversation
from lmm_align.data.images import ImageProcessorConfig, preprocess_image
from lmm_align.data.tokenizer import train_bpe_tokenizer
from lmm_align.feedback import labeler as labeler_lib
from lmm_align.models import Llava, get_variant, init_params

TEMPLATE = "vicuna_v1"
QUESTIONS = ["Is there a red circle?", "Is the square blue?", "Is there a cat?", "Is it round?"]
VOCAB = 320
SAMPLERS = ("greedy", "sampled")
# The meshes over the 2 processes' 8 devices, and what each samples. Model-sharded with fsdp
# across the processes (1x4x2: each process holds half of every param's fsdp shards and half
# of the rows), and data-parallel with data across them (2x4x1: shard_map over data, each
# process a group of its own; sampled only, where each group draws with its rows' keys).
MESHES = {"1,4,2": SAMPLERS, "2,4,1": ("sampled",)}


def write_tiny_llava(out: pathlib.Path) -> pathlib.Path:
  """A tiny random LLaVA-1.5 as an HF folder: weights, a BPE tokenizer in which " yes" /
  " Yes" / " no" / " No" are single tokens, a 32-pixel preprocessor_config.json."""
  tmpl = conversation.get_template(TEMPLATE)
  answers = [f"USER: Is it? ASSISTANT: {w}" for w in [" yes", " Yes", " no", " No"] * 30]
  tokenizer = train_bpe_tokenizer([tmpl.system, *QUESTIONS, *answers], VOCAB)
  tiny = get_variant("tiny")
  config = dataclasses.replace(tiny, text=dataclasses.replace(tiny.text, vocab_size=VOCAB))
  hf.save_pretrained(
    Llava(config), init_params(config, jax.random.key(3)), out, tokenizer=tokenizer
  )
  processor = ImageProcessorConfig(size=32, crop_size=32).to_hf_dict()
  (out / "preprocessor_config.json").write_text(json.dumps(processor))
  return out


def pictures() -> list[Image.Image]:
  rs = np.random.RandomState(0)
  return [Image.fromarray(rs.randint(0, 255, (40, 32, 3), np.uint8)) for _ in range(2)]


def sample_and_score(
  folder: str, sizes: Sequence[int] | None, samplers: Sequence[str] = SAMPLERS
) -> dict[str, list]:
  """Generations (greedy and / or sampled: `samplers`) and yes/no scores of the folder's
  model, loaded onto a mesh of `sizes` over all (global) devices, or onto one device (None)."""
  mesh = None if sizes is None else sharding.make_mesh(tuple(sizes))
  loaded = inference.load_model_folder(folder, template=TEMPLATE, mesh=mesh)
  config = loaded.model.config
  if jax.process_count() > 1:
    # Each param spans both processes' devices; this process holds only its 4 devices' shards.
    for x in jax.tree.leaves(loaded.params):
      assert not x.is_fully_addressable and len(x.addressable_shards) == 4, x.sharding
  labeler = labeler_lib.YesNoLabeler(
    loaded.model, loaded.params, loaded.tokenizer, loaded.image_config, template=TEMPLATE,
    batch_size=4 if mesh is None else max(4, sharding.data_parallel_size(mesh)),
    answer_tokens=labeler_lib.answer_token_ids(
      loaded.tokenizer, ("yes", "Yes"), ("no", "No")), mesh=mesh,
  )  # fmt: skip
  images = pictures()
  # 3 rows (2 with an image, in placeholder order): fewer rows than the mesh's row groups.
  prompts = [labeler.encode(q, with_image=i < 2) for i, q in enumerate(QUESTIONS[:3])]
  pixels = np.stack([preprocess_image(im, loaded.image_config) for im in images])
  in_mesh = (
    contextlib.nullcontext() if mesh is None else sharding.activation_sharding(mesh, loaded.rules)
  )
  out: dict[str, list] = {}
  with in_mesh:
    for name, settings, rng in [
      ("greedy", sampling.SamplingSettings(temperature=0.0, max_new_tokens=6, stop_token_ids=()), None),
      ("sampled", sampling.SamplingSettings(temperature=1.0, top_k=40, max_new_tokens=6), jax.random.key(7)),
    ]:  # fmt: skip
      if name not in samplers:
        continue
      sample = sampling.generate(
        config, loaded.params, prompts, pixels, settings=settings, rng=rng, mesh=mesh,
        row_max_new_tokens=[6, 4, 6],
      )  # fmt: skip
      out[f"{name}_tokens"] = sample.tokens.tolist()
      out[f"{name}_lengths"] = sample.lengths.tolist()
      out[f"{name}_logprobs"] = sample.logprobs.tolist()
  # 5 questions: a full batch of 4 rows and a short one (one short batch of 8 on 2x4x1).
  asked = [images[0], images[1], None, images[0], images[1]]
  scores = labeler.score([*QUESTIONS, QUESTIONS[0]], asked)
  out["p_yes"], out["p_no"] = scores.p_yes.tolist(), scores.p_no.tolist()
  return out


def main(argv: Sequence[str]) -> None:
  folder, out_json = argv
  sharding.initialize_distributed()
  assert jax.process_count() == 2 and jax.device_count() == 8, (jax.process_count(), jax.devices())
  results = {
    sizes: sample_and_score(folder, [int(s) for s in sizes.split(",")], samplers)
    for sizes, samplers in MESHES.items()
  }
  results["process_index"] = jax.process_index()
  pathlib.Path(out_json).write_text(json.dumps(results))


if __name__ == "__main__":
  main(sys.argv[1:])
