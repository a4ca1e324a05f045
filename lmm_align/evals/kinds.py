"""Built-in evaluation kinds on published benchmark files, for a run's own evaluation
(`config.eval.kind`; the iterative loop's per-round evaluation on real data):

  pope   POPE question files (JSONL {question_id, image, text, label}, one file per split:
         `eval.pope.paths`, a file, a glob or a comma-separated list; images under
         `eval.pope.image_folder`), greedy answers scored by the published rule
         (`evals.pope`). Metrics: pope_f1, pope_accuracy, pope_precision, pope_recall,
         pope_yes_ratio (the mean over splits with several), 'pope_<split>/<metric>' per split
         and pope_questions.

`eval.limit` (0: all) keeps the first N questions of each file, `eval.batch_size` and
`eval.max_new_tokens` size the sampler calls. `lmm-align eval pope` is the same scorer as a
report with examples.
"""

from __future__ import annotations

import glob
import os
from typing import Any

import ml_collections

from lmm_align.data.images import load_image
from lmm_align.data.jsonl import read_jsonl
from lmm_align.evals import pope, registry
from lmm_align.evals.answers import answer_questions
from lmm_align.inference import LoadedModel

POPE_FIELDS = ("question_id", "image", "text", "label")


def pope_files(paths: str | list[str]) -> list[str]:
  """The files `eval.pope.paths` names, each glob's matches sorted; errors name the field."""
  items = [p.strip() for p in paths.split(",")] if isinstance(paths, str) else list(paths)
  items = [p for p in items if p]
  if not items:
    raise ValueError("eval.pope.paths is empty: set it to POPE question files (one per split)")
  out = []
  for item in items:
    matches = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
    if not matches or not all(os.path.isfile(m) for m in matches):
      raise FileNotFoundError(f"eval.pope.paths: no file {item!r}")
    out += matches
  return out


def _questions(path: str, image_folder: str, limit: int) -> list[dict[str, Any]]:
  records = read_jsonl(path)
  records = records[:limit] if limit > 0 else records
  if not records:
    raise ValueError(f"{path}: no POPE questions")
  for number, record in enumerate(records, start=1):
    for field in POPE_FIELDS:
      if field not in record:
        raise ValueError(f"{path}: record {number}: field {field!r} is missing")
    if record["label"] not in ("yes", "no"):
      raise ValueError(f"{path}: record {number}: field 'label' is {record['label']!r}, not yes/no")
  return records


@registry.register("pope", main_metrics=tuple(f"pope_{m}" for m in pope.MAIN_METRICS))
def evaluate_pope(config: ml_collections.ConfigDict, loaded: LoadedModel) -> dict[str, Any]:
  e = config.eval
  if loaded.image_config is None:
    raise ValueError(f"eval.kind='pope': {loaded.model_id} is a text-only model")
  files = pope_files(e.pope.paths)
  splits = [pope.split_name(p) for p in files]
  if len(set(splits)) != len(splits):
    raise ValueError(f"eval.pope.paths: two files give the same split name: {splits}")
  per_split, total = {}, 0
  for split, path in zip(splits, files, strict=True):
    records = _questions(path, e.pope.image_folder, int(e.get("limit", 0)))
    images = []
    for number, record in enumerate(records, start=1):
      try:
        images.append(load_image(os.path.join(e.pope.image_folder, record["image"])))
      except ValueError as err:
        raise ValueError(f"{path}: record {number}: field 'image': {err}") from None
    answers, _ = answer_questions(
      loaded.model, loaded.params, loaded.tokenizer, loaded.image_config,
      [str(r["text"]) for r in records], images, template=loaded.template,
      batch_size=e.batch_size, max_new_tokens=e.max_new_tokens,
    )  # fmt: skip
    per_split[split] = pope.pope_metrics(answers, [r["label"] for r in records])
    total += len(records)
  metrics = {f"pope_{k}": v for k, v in pope.combine_splits(per_split).items()}
  metrics["pope_questions"] = total
  return metrics
