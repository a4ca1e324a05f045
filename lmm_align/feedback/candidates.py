"""RLAIF-V candidate generation: K samples per prompt from the current policy, to a JSONL file.

RLAIF-V "deconfounds" its candidates: every response to a prompt comes from the same model with
the same decoding settings and differs only by its random seed, so that a preference between
two of them reflects content (hallucinated claims) rather than style (published: 10 samples,
temperature 0.7, at most 512 new tokens).

Reproducibility: one sampler call draws the K samples of one prompt (a batch of K copies of its
prompt and image), with the key `prompt_key(seed, prompt_id)` derived from the run seed and a
hash of the prompt id; sample k is row k of that call. A candidate is therefore a function of
(seed, prompt id, sample index) and the model: it does not depend on the order of the prompt
list, on which prompts were already done, or on any other prompt's length (no padding to a
neighbour). Packing several prompts into one call would make each prompt's noise depend on
its neighbours, because the sampler draws one key per call, not per row.

Resume: records are appended prompt by prompt and flushed. When the output file exists, the
prompts whose K records are all there (same seed and settings) are kept and skipped; records
of unfinished prompts, and a last line cut short by a kill, are dropped by rewriting the file
(to a temporary file, then renamed) before generation continues. Records from another seed or
other settings are refused: one file holds one run.

Record: {"id": "<prompt id>#<k>", "prompt_id", "question", "image" (a reference: a path for
`load_image`, or None), "sample_index", "response", "num_tokens" (generated tokens without the
stop token), "stopped" (False: cut at max_new_tokens), "seed", "sampling": {temperature,
top_k, top_p, max_new_tokens, stop_token_ids}}.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from lmm_align import sampling, sharding
from lmm_align.data import conversation, images
from lmm_align.data.anyres import AnyresImageConfig, preprocess_anyres_batch
from lmm_align.data.images import ImageProcessorConfig, preprocess_image
from lmm_align.data.jsonl import append_jsonl, numbered_records, resume_jsonl
from lmm_align.models.config import ModelConfig
from lmm_align.models.llava import Llava

# --------------------------------------------------------------------------------------------
# Prompts.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One instruction to sample for: an id, a question, and an image reference (or None)."""

  id: str
  question: str
  image: str | None = None


def read_prompts(path: str | os.PathLike) -> list[Prompt]:
  """Prompts from JSONL: {"id", "question", "image"} records, or the published RLAIF-V
  pipeline input {"ds_question_id", "image_path", "question"} (id = ds_question_id, image =
  image_path). A bad record raises ValueError naming the file, line and field."""
  out, seen = [], {}
  for line, record in numbered_records(path):
    where = f"{os.fspath(path)}: line {line}"
    pid = record.get("id", record.get("ds_question_id"))
    image = record.get("image", record.get("image_path"))
    if not isinstance(pid, str | int) or isinstance(pid, bool) or str(pid) == "":
      raise ValueError(f"{where}: field 'id' (or 'ds_question_id') missing or not a string")
    if not isinstance(record.get("question"), str) or not record["question"].strip():
      raise ValueError(f"{where} (id {pid!r}): field 'question' missing or empty")
    if image is not None and not isinstance(image, str):
      raise ValueError(f"{where} (id {pid!r}): field 'image' must be a path string or null")
    if str(pid) in seen:
      raise ValueError(f"{where}: id {pid!r} repeats line {seen[str(pid)]}")
    seen[str(pid)] = line
    out.append(Prompt(str(pid), record["question"], image))
  return out


# --------------------------------------------------------------------------------------------
# Sampling.
# --------------------------------------------------------------------------------------------


def prompt_key(seed: int, prompt_id: str) -> jax.Array:
  """The sampler key of one prompt: the run seed folded with 64 bits of sha256(prompt id)."""
  digest = hashlib.sha256(prompt_id.encode("utf-8")).digest()
  key = jax.random.key(seed)
  for i in (0, 4):
    key = jax.random.fold_in(key, int.from_bytes(digest[i : i + 4], "little"))
  return key


def settings_record(settings: sampling.SamplingSettings, tokenizer: Any) -> dict[str, Any]:
  """The sampling settings as stored in each record (stop ids resolved to the tokenizer's eos
  when unset, as generation uses them)."""
  stop = settings.stop_token_ids
  if stop is None:
    stop = () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)
  return {
    "temperature": settings.temperature,
    "top_k": settings.top_k,
    "top_p": settings.top_p,
    "max_new_tokens": settings.max_new_tokens,
    "stop_token_ids": [int(t) for t in stop],
  }


def _sample_prompt(
  config: ModelConfig,
  params: dict,
  tokenizer: Any,
  image_config: ImageProcessorConfig | AnyresImageConfig | None,
  prompt: Prompt,
  image: Any,
  *,
  num_samples: int,
  settings: sampling.SamplingSettings,
  template: conversation.ConversationTemplate,
  seed: int,
  mesh: Mesh | None,
) -> tuple[list[str], list[int], list[bool]]:
  """One sampler call: (texts, token counts, stopped) of the K samples of one prompt. With an
  `AnyresImageConfig` (LLaVA-NeXT / OneVision) the image is tiled, its placeholders counted by
  its packed size, and the call carries the processor's largest tile count (one compiled shape
  for every image) and the image's size."""
  with_image = image is not None
  pixels, sizes, image_tokens = None, None, max(1, config.num_image_tokens)
  if with_image and isinstance(image_config, AnyresImageConfig):
    tiled = preprocess_anyres_batch(
      [image] * num_samples, image_config, (image_config.max_tiles_per_image(),)
    )
    pixels, sizes = tiled.pixel_values, tiled.image_sizes
    image_tokens = config.image_tokens(tuple(sizes[0]))
  elif with_image:
    pixels = np.repeat(preprocess_image(image, image_config)[None], num_samples, axis=0)
  ids = conversation.encode_generation_prompt(
      prompt.question, tokenizer, template, image_tokens, config.image_token_id,
      with_image=with_image, num_images=int(with_image), record_id=prompt.id,
  ).input_ids.tolist()  # fmt: skip
  out = sampling.generate(
      config, params, [ids] * num_samples, pixels, settings=settings,
      rng=prompt_key(seed, prompt.id), pad_id=tokenizer.pad_token_id, mesh=mesh,
      image_sizes=sizes,
  )  # fmt: skip
  tokens = out.token_lists(strip_stop=True)
  texts = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]
  return texts, [len(t) for t in tokens], [bool(s) for s in out.stopped]


def _complete_checker(
  prompts: dict[str, Prompt], num_samples: int, seed: int, sampling_record: dict[str, Any]
) -> Callable[[str, list[dict[str, Any]], str], bool]:
  def is_complete(prompt_id: str, records: list[dict[str, Any]], where: str) -> bool:
    for r in records:
      if r.get("seed") != seed or r.get("sampling") != sampling_record:
        raise ValueError(
          f"{where}: record {r.get('id')!r} was sampled with seed {r.get('seed')} and settings "
          f"{r.get('sampling')}, not seed {seed} and {sampling_record}: use a new output file"
        )
      prompt = prompts.get(prompt_id)
      if prompt is not None and (r.get("question"), r.get("image")) != (
        prompt.question,
        prompt.image,
      ):
        raise ValueError(f"{where}: record {r.get('id')!r} has another question or image")
    indices = sorted(r.get("sample_index", -1) for r in records)
    return indices == list(range(num_samples))

  return is_complete


def generate_candidates(
  model_or_config: Llava | ModelConfig,
  params: dict,
  tokenizer: Any,
  image_config: ImageProcessorConfig | AnyresImageConfig | None,
  prompts: Sequence[Prompt],
  output_path: str | os.PathLike,
  *,
  num_samples: int,
  settings: sampling.SamplingSettings,
  seed: int,
  template: str,
  load_image: Callable[[str], Any] = images.load_image,
  mesh: Mesh | None = None,
  rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES,
) -> list[dict[str, Any]]:
  """Samples `num_samples` responses per prompt into `output_path` (JSONL), resuming a
  partial file; returns the records of `prompts`, in prompt order then sample index.

  load_image: image reference -> PIL image (default: a file path). settings: the decoding
  settings shared by every sample (RLAIF-V: temperature 0.7, max_new_tokens 512).
  mesh: the mesh the params are sharded over (None: one device): the sampler decodes on it
  (`sampling.generate(mesh=...)`), its activations and KV cache following `rules`. A sample
  depends only on its row's key, so the records equal those of one device.
  """
  config = model_or_config.config if isinstance(model_or_config, nn.Module) else model_or_config
  if num_samples < 1:
    raise ValueError(f"num_samples={num_samples} must be >= 1")
  by_id = {}
  for p in prompts:
    if p.id in by_id:
      raise ValueError(f"prompt id {p.id!r} appears twice")
    if p.image is not None and not config.has_vision:
      raise ValueError(f"prompt {p.id!r} has an image but the model has no vision tower")
    by_id[p.id] = p
  if config.has_vision and image_config is None and any(p.image is not None for p in prompts):
    raise ValueError("prompts with images need an image_config")
  tmpl = conversation.get_template(template)
  sampling_record = settings_record(settings, tokenizer)
  settings = dataclasses.replace(settings, stop_token_ids=tuple(sampling_record["stop_token_ids"]))
  done = resume_jsonl(
    output_path, "prompt_id", _complete_checker(by_id, num_samples, seed, sampling_record)
  )
  rules = tuple(tuple(rule) for rule in rules)
  context = (
    contextlib.nullcontext if mesh is None else lambda: sharding.activation_sharding(mesh, rules)
  )
  with open(output_path, "a", encoding="utf-8") as f:
    for prompt in prompts:
      if prompt.id in done:
        continue
      image = None if prompt.image is None else load_image(prompt.image)
      with context():
        texts, lengths, stopped = _sample_prompt(
            config, params, tokenizer, image_config, prompt, image, num_samples=num_samples,
            settings=settings, template=tmpl, seed=seed, mesh=mesh,
        )  # fmt: skip
      records = [
        {
          "id": f"{prompt.id}#{k}",
          "prompt_id": prompt.id,
          "question": prompt.question,
          "image": prompt.image,
          "sample_index": k,
          "response": texts[k],
          "num_tokens": lengths[k],
          "stopped": stopped[k],
          "seed": seed,
          "sampling": sampling_record,
        }
        for k in range(num_samples)
      ]
      append_jsonl(f, records)
      done[prompt.id] = records
  return [r for p in prompts for r in sorted(done[p.id], key=lambda r: r["sample_index"])]


_CANDIDATE_FIELDS = {
  "id": str,
  "prompt_id": str,
  "question": str,
  "sample_index": int,
  "response": str,
  "num_tokens": int,
  "seed": int,
  "sampling": dict,
}


def read_candidates(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Candidate records from JSONL, checked; a bad record raises naming the file, line, id and
  field. A last line cut short by a kill is skipped (its prompt is incomplete anyway)."""
  out = []
  for line, record in numbered_records(path, tolerate_cut_tail=True):
    where = f"{os.fspath(path)}: line {line} (id {record.get('id')!r})"
    for field, kind in _CANDIDATE_FIELDS.items():
      value = record.get(field)
      if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{where}: field {field!r} must be {kind.__name__}, got {value!r}")
    if record.get("image") is not None and not isinstance(record["image"], str):
      raise ValueError(f"{where}: field 'image' must be a string or null")
    out.append(record)
  return out


def pair_prompt_id(pair: dict[str, Any]) -> str:
  """The prompt of a pair whose id starts with a candidate id ("<prompt>#<k>|...")."""
  return pair["id"].split("|")[0].rsplit("#", 1)[0]
