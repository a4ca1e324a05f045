"""RL prompts from JSON Lines: RLAIF-V's pipeline input and any {id, image, question} file.

Both give the records `preference_sources.read_ppo_prompts` gives, so PPO, best-of-N and the
iterative loop take them alike:

  {"id", "image" (ImageFile | None), "image_file" (the path as written), "question",
   "caption_type": 1, "length_bonus": 1.0, "facts": None, "facts_key": None, ...}

  * `rlaifv_jsonl` (PROTOCOLS.md §6.2, `detail_test_30_input.jsonl`): {"ds_question_id",
    "image_path", "question", "metainfos": {"reference": ...}}; the id is ds_question_id and
    metainfos is kept. RLAIF-V resolves image_path from its working directory, so it is often
    "./examples/..." or absolute.
  * `prompts_jsonl`: {"id", "image" (a path or null), "question"}.

A relative image path is resolved under `image_folder` (default: the file's own folder) and
must stay inside it (as `llava_json` checks); an absolute path is taken as written, because
the pipeline writes the paths its own machine saw. Problems name the file, the record (its
0-based position and id) and the field; with on_error="skip" they are counted by reason.
"""

from __future__ import annotations

import collections
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from lmm_align.data.conversation import IMAGE_PLACEHOLDER
from lmm_align.data.llava_json import RecordProblem, resolve_image_path
from lmm_align.data.preference_sources import (
  GENERAL,
  ImageFile,
  RecordIssue,
  _as_object,
  _read_records,
  _text,
)


def prompt_image(
  value: Any, image_folder: str | os.PathLike, field: str
) -> tuple[ImageFile | None, str | None]:
  """(loader, path as written) of a prompt's image field; (None, None) for null."""
  if value is None:
    return None, None
  if not isinstance(value, str) or not value:
    raise RecordIssue(field, "bad_image_field", f"expected a path string, got {value!r}")
  if os.path.isabs(value):
    if not os.path.isfile(value):
      raise RecordIssue(field, "missing_image", f"file {value!r} not found")
    return ImageFile(pathlib.Path(value)), value
  try:
    return ImageFile(resolve_image_path(image_folder, value)), value
  except RecordProblem as problem:  # named after the field this format uses
    raise RecordIssue(field, problem.reason, problem.detail) from problem


def _question(raw: Mapping[str, Any]) -> str:
  if "question" not in raw:
    raise RecordIssue("question", "missing_question", "missing")
  question = _text(raw["question"], "question", "bad_question")
  if question.count(IMAGE_PLACEHOLDER) > 1:
    raise RecordIssue("question", "placeholder_mismatch", "more than one placeholder")
  return question


def _prompt(record_id: str, image, image_file, question: str, **extra: Any) -> dict[str, Any]:
  return {
    "id": record_id, "image": image, "image_file": image_file, "question": question,
    "caption_type": GENERAL, "length_bonus": 1.0, "facts": None, "facts_key": None, **extra,
  }  # fmt: skip


def _string_id(raw: Mapping[str, Any], field: str) -> str:
  if field not in raw:
    raise RecordIssue(field, "missing_id", "missing")
  value = raw[field]
  if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
    raise RecordIssue(field, "bad_id", f"expected a non-empty string, got {value!r}")
  return str(value)


def _default_folder(path: str | os.PathLike, image_folder: str | os.PathLike | None) -> str:
  return os.fspath(image_folder) if image_folder else os.path.dirname(os.path.abspath(path))


def _read_all(paths, on_error: str, check_images, make) -> tuple[list, collections.Counter]:
  records, skipped = [], collections.Counter()
  for path in paths:
    file_records, file_skipped = _read_records(
      path, on_error, check_images, lambda raw, index, path=path: make(raw, path)
    )
    records += file_records
    skipped.update(file_skipped)
  return records, skipped


def read_rlaifv_prompts(
  paths: Sequence[str | os.PathLike],
  *,
  image_folder: str | os.PathLike | None = None,
  on_error: str = "raise",
  check_images: bool | str = False,
) -> tuple[list[dict[str, Any]], collections.Counter]:
  """RLAIF-V pipeline input JSONL shards -> RL prompt records (see the module docstring).

  Args:
    paths: JSONL (or JSON array) files of {"ds_question_id", "image_path", "question",
      "metainfos"}.
    image_folder: where relative image paths point; default each file's folder.
    on_error: "raise" (DataError naming file, record and field) or "skip" (counted).
    check_images: False checks existence; "verify" / "decode" (True) open the files.

  Returns:
    (records with "id" = ds_question_id and "metainfos" ({} when absent), skipped counts).
  """

  def make(raw: Any, path) -> dict[str, Any]:
    raw = _as_object(raw)
    record_id = _string_id(raw, "ds_question_id")
    try:
      question = _question(raw)
      if raw.get("image_path") is None:
        raise RecordIssue("image_path", "missing_image", "RL prompts need an image")
      image, image_file = prompt_image(
        raw["image_path"], _default_folder(path, image_folder), "image_path"
      )
      metainfos = raw.get("metainfos") or {}
      if not isinstance(metainfos, dict):
        raise RecordIssue("metainfos", "bad_metainfos", f"expected an object, got {metainfos!r}")
    except RecordIssue as issue:
      issue.record_id = record_id
      raise
    return _prompt(record_id, image, image_file, question, metainfos=metainfos)

  return _read_all(paths, on_error, check_images, make)


def read_prompts_jsonl(
  paths: Sequence[str | os.PathLike],
  *,
  image_folder: str | os.PathLike | None = None,
  on_error: str = "raise",
  check_images: bool | str = False,
) -> tuple[list[dict[str, Any]], collections.Counter]:
  """{"id", "image" (a path or null), "question"} JSONL shards -> RL prompt records.

  Args and returns as `read_rlaifv_prompts`; a null image makes a text-only prompt.
  """

  def make(raw: Any, path) -> dict[str, Any]:
    raw = _as_object(raw)
    record_id = _string_id(raw, "id")
    try:
      question = _question(raw)
      image, image_file = prompt_image(
        raw.get("image"), _default_folder(path, image_folder), "image"
      )
    except RecordIssue as issue:
      issue.record_id = record_id
      raise
    return _prompt(record_id, image, image_file, question)

  return _read_all(paths, on_error, check_images, make)
