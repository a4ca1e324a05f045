"""Readers of the published preference and RL-prompt formats.

Every reader returns `(records, Counter of skipped records)`, the records being plain dicts
that `reward_data.encode_reward_pairs` (and `preference.encode_pair`) take:

  {"id": str, "image": loader | PIL | None, "question": str, "history": [earlier turns],
   "chosen": str, "rejected": str, "facts": [captions] | None, ...source fields}

and, for RL prompts, {"id", "image", "image_file", "question", "caption_type",
"length_bonus", "facts", "facts_key"}. Images are never decoded while reading: `image` is a
zero-argument loader (`ImageFile`, `ParquetImage`) that returns an RGB PIL image.

Sources (PROTOCOLS.md §2.1, §2.3, §6.1):
  * LLaVA-RLHF human preferences (`llava_7b_v1_preference.json`): the last (gpt) turn of
    `conversations` is replaced by `output_1` / `output_2`; `preference` 1 | 2 names the
    preferred one. Multi-turn conversations are kept: the turns before the last question go
    to `history`, which the encoders put before it, as the published code scores the whole
    dialogue. Facts: `image_to_caption.json[record["image"]]`.
  * RLAIF-V parquet shards: question, chosen, rejected, image {bytes, path} (or raw bytes);
    the id is "{ds_name}-{idx}".
  * LLaVA-RLHF RL prompts (`llava_ppo50k-aokvqa12k-vqa10k.json`): only the first human turn;
    `caption_type` 1..7 (default 1) and `length_bonus` (default 1.0); facts under
    `str(image_id).zfill(12) + ".jpg"`, prefixed "aok_" for A-OKVQA multiple choice (2..5).

Bad records are named as in `llava_json` (`DataError`: file, record position and id, field)
and, with on_error="skip", counted as `skipped_<reason>`. Existence of image files is always
checked; `check_images` also opens them ("verify") or decodes them ("decode" / True).

Plugins provide the same records from their own worlds (the shapes world: reward pairs and
RL prompts with exact ground truth), registered in `registry` as sources.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import io
import json
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from lmm_align.data.conversation import GPT, HUMAN, IMAGE_PLACEHOLDER, render_conversation
from lmm_align.data.images import load_image, to_rgb
from lmm_align.data.jsonl import numbered_records
from lmm_align.data.llava_json import (
  DataError,
  ProblemLog,
  RecordProblem,
  check_image_file,
  check_image_mode,
  read_json_records,
  resolve_image_path,
)
from lmm_align.data.preference import sft_weight_problem

# LLaVA-RLHF's AnswerType (caption_type); 2..5 are A-OKVQA multiple choice.
GENERAL, A_IN_ABCD, B_IN_ABCD, C_IN_ABCD, D_IN_ABCD, NO_IN_YESNO, YES_IN_YESNO = range(1, 8)
CAPTION_TYPES = range(GENERAL, YES_IN_YESNO + 1)
MULTIPLE_CHOICE_TYPES = (A_IN_ABCD, B_IN_ABCD, C_IN_ABCD, D_IN_ABCD)
AOK_PREFIX = "aok_"
RLAIFV_COLUMNS = ("question", "chosen", "rejected", "image")
RLAIFV_EXTRA_COLUMNS = ("ds_name", "idx", "origin_dataset", "origin_split", "image_path")
# RLAIF-V's cached reference log-probs (`muffin/data/datasets.py`, PROTOCOLS.md §6.1): a JSON
# list [win_logp, win_avg_logp, win_per_token_logp, rej_logp, rej_avg_logp, rej_per_token_logp]
# (or a dict with the values in that order), summed / averaged over the answer's label tokens.
RLAIFV_LOGPS_COLUMN = "logps"


class RecordIssue(Exception):
  """What is wrong with one record (any reason); `to_error` names file and position."""

  def __init__(self, field: str | None, reason: str, detail: str, record_id: str | None = None):
    super().__init__(detail)
    self.field, self.reason, self.detail, self.record_id = field, reason, detail, record_id

  def to_error(self, source: str, index: int) -> DataError:
    return DataError(
      source, self.detail, index=index, record_id=self.record_id, field=self.field,
      reason=self.reason,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------
# Image loaders.
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageFile:
  """Loads an image file as RGB when called; compares by path."""

  path: pathlib.Path

  def __call__(self) -> Image.Image:
    return load_image(self.path)


def decode_image_bytes(data: bytes, where: str = "image bytes") -> Image.Image:
  """Encoded bytes -> RGB PIL image (alpha dropped, as `load_image` opens a file)."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      return to_rgb(image)
  except (OSError, Image.DecompressionBombError) as e:
    raise ValueError(f"{where}: cannot decode the image: {e}") from e


def _image_bytes(value: Any) -> bytes | None:
  """The bytes of a parquet image cell: an HF Image struct {bytes, path} or raw bytes."""
  if isinstance(value, Mapping):
    value = value.get("bytes")
  return value if isinstance(value, bytes) and value else None


@functools.lru_cache(maxsize=4)
def _row_group_images(path: str, row_group: int) -> tuple[bytes | None, ...]:
  # Loaders are called in data order, so a few cached row groups serve whole batches
  # without keeping the dataset's images in memory.
  table = pq.ParquetFile(path).read_row_group(row_group, columns=["image"])
  return tuple(_image_bytes(v) for v in table.column("image").to_pylist())


@dataclasses.dataclass(frozen=True)
class ParquetImage:
  """Reads and decodes one row's image from a parquet file when called."""

  path: str
  row_group: int
  row: int

  def read_bytes(self) -> bytes:
    data = _row_group_images(self.path, self.row_group)[self.row]
    if data is None:
      raise ValueError(f"{self.path}: row group {self.row_group}, row {self.row}: no image")
    return data

  def __call__(self) -> Image.Image:
    return decode_image_bytes(
      self.read_bytes(), f"{self.path}: row group {self.row_group}, row {self.row}, field 'image'"
    )


# ------------------------------------------------------------------------------------------
# Shared checks.
# ------------------------------------------------------------------------------------------


def load_captions(path: str | os.PathLike) -> dict[str, Any]:
  """LLaVA-RLHF's `image_to_caption.json`: image key -> list of captions (checked on use)."""
  source = os.fspath(path)
  try:
    with open(path, encoding="utf-8") as f:
      captions = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DataError(source, f"cannot read the captions: {e}") from e
  if not isinstance(captions, dict):
    raise DataError(source, "expected a JSON object mapping image keys to lists of captions")
  return captions


def _facts(captions: Mapping[str, Any], key: str, captions_source: str) -> list[str]:
  if key not in captions:
    raise RecordIssue("image", "missing_facts", f"no captions under {key!r} in {captions_source}")
  value = captions[key]
  if (
    not isinstance(value, list)
    or not value
    or any(not isinstance(c, str) or not c.strip() for c in value)
  ):
    raise RecordIssue(
      "image", "bad_facts", f"{captions_source}[{key!r}]: expected a non-empty list of captions"
    )
  return list(value)


def _record_id(raw: Mapping[str, Any], fallback: str | None = None) -> str:
  if "id" not in raw:
    if fallback is not None:
      return fallback
    raise RecordIssue("id", "missing_id", "missing")
  value = raw["id"]
  if isinstance(value, bool) or not isinstance(value, str | int):
    raise RecordIssue("id", "bad_id", f"expected a string, got {type(value).__name__}")
  return str(value)


def _as_object(raw: Any) -> dict[str, Any]:
  if isinstance(raw, RecordProblem):  # a JSONL line that did not parse
    raise raw
  if not isinstance(raw, dict):
    raise RecordIssue(None, "not_an_object", f"expected a JSON object, got {type(raw).__name__}")
  return raw


def _text(value: Any, field: str, reason: str) -> str:
  if not isinstance(value, str) or not value.strip():
    raise RecordIssue(field, reason, f"empty or not a string: {value!r}")
  return value


def _image(raw: Mapping[str, Any], image_folder: Any) -> tuple[ImageFile | None, str | None]:
  """(loader, file name as written) of the record's image; (None, None) without one."""
  image = raw.get("image")
  if image is None:
    return None, None
  path = resolve_image_path(image_folder, image)
  return ImageFile(path), image[0] if isinstance(image, list) else image


def _check_pixels(record: Mapping[str, Any], mode: str) -> None:
  image = record.get("image")
  if isinstance(image, ImageFile) and (problem := check_image_file(image.path, mode)):
    raise problem


def _read_records(
  json_path: str | os.PathLike, on_error: str, check_images: bool | str, make_record
) -> tuple[list[dict[str, Any]], collections.Counter]:
  """`make_record(raw, index)` over a JSON array / JSONL file, problems raised or counted."""
  mode = check_image_mode(check_images)
  problems = ProblemLog(os.fspath(json_path), on_error)
  raw_records = read_json_records(json_path)
  records = []
  for index, raw in enumerate(raw_records):
    try:
      record = make_record(raw, index)
      _check_pixels(record, mode)
    except (RecordIssue, RecordProblem) as problem:
      if problem.record_id is None and isinstance(raw, dict) and "id" in raw:
        problem.record_id = str(raw["id"])
      problems.report(problem, index)
      continue
    records.append(record)
  problems.log_summary(len(raw_records))
  return records, problems.skipped


# ------------------------------------------------------------------------------------------
# LLaVA-RLHF human preferences.
# ------------------------------------------------------------------------------------------


def _split_conversation(conversations: Any) -> tuple[list[dict[str, str]], str]:
  """(history, question): the turns before the last human turn, and that turn's text."""
  if not isinstance(conversations, list) or len(conversations) < 2:
    raise RecordIssue(
      "conversations", "bad_conversations", "expected a list of at least (human, gpt) turns"
    )
  last, question = conversations[-1], conversations[-2]
  if not isinstance(last, dict) or last.get("from") != GPT:
    raise RecordIssue("conversations", "bad_conversations", "the last turn must be from 'gpt'")
  if not isinstance(question, dict) or question.get("from") != HUMAN:
    raise RecordIssue(
      "conversations", "bad_conversations", "the turn before the last must be human"
    )
  try:
    render_conversation(conversations[:-1], "vicuna_v1")  # checks roles and values
  except ValueError as e:
    raise RecordIssue("conversations", "bad_conversations", str(e)) from e
  history = [{"from": t["from"], "value": t["value"]} for t in conversations[:-2]]
  return history, question["value"]


def _responses(raw: Mapping[str, Any]) -> tuple[str, str, int]:
  """(chosen, rejected, preference) from output_1 / output_2 and preference 1 | 2."""
  outputs = []
  for field in ("output_1", "output_2"):
    output = raw.get(field)
    if not isinstance(output, dict):
      raise RecordIssue(field, "empty_response", f"expected {{'value': str}}, got {output!r}")
    outputs.append(_text(output.get("value"), field, "empty_response"))
  preference = raw.get("preference")
  if isinstance(preference, bool) or preference not in (1, 2):
    raise RecordIssue("preference", "bad_preference", f"expected 1 or 2, got {preference!r}")
  preference = int(preference)
  if outputs[0].strip() == outputs[1].strip():
    raise RecordIssue("output_2", "identical_responses", "output_1 and output_2 are identical")
  return outputs[preference - 1], outputs[2 - preference], preference


def _llava_rlhf_record(
  raw: Any, image_folder: Any, captions: Mapping[str, Any] | None, captions_source: str
) -> dict[str, Any]:
  raw = _as_object(raw)
  record_id = _record_id(raw)
  history, question = _split_conversation(raw.get("conversations"))
  chosen, rejected, preference = _responses(raw)
  image, image_file = _image(raw, image_folder)
  placeholders = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in history)
  placeholders += question.count(IMAGE_PLACEHOLDER)
  if placeholders > (image is not None):
    raise RecordIssue(
      "conversations", "placeholder_mismatch",
      f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) for {int(image is not None)} image(s)",
    )  # fmt: skip
  facts = None
  if captions is not None and image_file is not None:
    facts = _facts(captions, image_file, captions_source)
  return {
    "id": record_id, "image": image, "image_file": image_file, "question": question,
    "history": history, "chosen": chosen, "rejected": rejected, "facts": facts,
    "preference": preference, "hallucination": raw.get("hallucination"),
  }  # fmt: skip


def read_llava_rlhf_preferences(
  json_path: str | os.PathLike,
  *,
  image_folder: str | os.PathLike | None = None,
  captions_path: str | os.PathLike | None = None,
  on_error: str = "raise",
  check_images: bool | str = False,
) -> tuple[list[dict[str, Any]], collections.Counter]:
  """Reads LLaVA-RLHF's human-preference JSON (a JSON array, or JSONL).

  Args:
    json_path: records {"id", "image", "conversations" (last turn gpt), "output_1",
      "output_2" ({"value": str}), "preference" (1 | 2), "hallucination"}.
    image_folder: where `image` paths point (COCO train2017); required for image records.
    captions_path: `image_to_caption.json`; each image record then needs captions under its
      `image` value (`facts`); without it `facts` is None.
    on_error: "raise" (DataError naming file, record and field) or "skip" (counted).
    check_images: False checks existence only; "verify" / "decode" (True) open the files.

  Returns:
    (records {"id", "image" (ImageFile | None), "image_file", "question", "history",
    "chosen", "rejected", "facts", "preference", "hallucination"}, skipped counts). chosen is
    output_1 when preference is 1, output_2 when it is 2.
  """
  captions = None if captions_path is None else load_captions(captions_path)
  captions_source = "" if captions_path is None else os.fspath(captions_path)
  return _read_records(
    json_path, on_error, check_images,
    lambda raw, index: _llava_rlhf_record(raw, image_folder, captions, captions_source),
  )  # fmt: skip


# ------------------------------------------------------------------------------------------
# LLaVA-RLHF RL prompts.
# ------------------------------------------------------------------------------------------


def facts_key(image_file: str, caption_type: int) -> str:
  """The `image_to_caption` key of an RL prompt (PROTOCOLS.md §2.3).

  The COCO id is the integer before the first dot of the file name; multiple-choice items
  (caption_type 2..5) read the A-OKVQA entry, "aok_" + the key.
  """
  name = pathlib.PurePosixPath(image_file.replace("\\", "/")).name
  try:
    image_id = int(name.split(".")[0])
  except ValueError as e:
    raise RecordIssue(
      "image", "bad_image_name", f"{image_file!r} does not start with a COCO image id"
    ) from e
  key = str(image_id).zfill(12) + ".jpg"
  return AOK_PREFIX + key if caption_type in MULTIPLE_CHOICE_TYPES else key


def _optional_number(raw: Mapping[str, Any], field: str, default: float, reason: str) -> float:
  value = raw.get(field)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
    raise RecordIssue(field, reason, f"expected a number, got {value!r}")
  return value


def _ppo_record(
  raw: Any,
  index: int,
  image_folder: Any,
  captions: Mapping[str, Any] | None,
  captions_source: str,
) -> dict[str, Any]:
  raw = _as_object(raw)
  record_id = _record_id(raw, fallback=str(index))
  conversations = raw.get("conversations")
  if not isinstance(conversations, list) or not conversations:
    raise RecordIssue("conversations", "bad_conversations", "expected a non-empty list of turns")
  first = conversations[0]
  if not isinstance(first, dict) or first.get("from") != HUMAN:
    raise RecordIssue("conversations", "bad_conversations", "the first turn must be human")
  question = _text(first.get("value"), "conversations", "bad_conversations")
  if question.count(IMAGE_PLACEHOLDER) > 1:
    raise RecordIssue("conversations", "placeholder_mismatch", "more than one placeholder")
  caption_type = _optional_number(raw, "caption_type", GENERAL, "bad_caption_type")
  if caption_type != int(caption_type) or int(caption_type) not in CAPTION_TYPES:
    raise RecordIssue("caption_type", "bad_caption_type", f"expected 1..7, got {caption_type!r}")
  caption_type = int(caption_type)
  length_bonus = float(_optional_number(raw, "length_bonus", 1.0, "bad_length_bonus"))
  if raw.get("image") is None:
    raise RecordIssue("image", "missing_image", "RL prompts need an image")
  image, image_file = _image(raw, image_folder)
  key = facts_key(image_file, caption_type)
  facts = None if captions is None else _facts(captions, key, captions_source)
  return {
    "id": record_id, "image": image, "image_file": image_file, "question": question,
    "caption_type": caption_type, "length_bonus": length_bonus, "facts": facts,
    "facts_key": key,
  }  # fmt: skip


def read_ppo_prompts(
  json_path: str | os.PathLike,
  *,
  image_folder: str | os.PathLike | None = None,
  captions_path: str | os.PathLike | None = None,
  on_error: str = "raise",
  check_images: bool | str = False,
) -> tuple[list[dict[str, Any]], collections.Counter]:
  """Reads LLaVA-RLHF's RL prompt JSON: the first human turn of each record is the query.

  Args and errors as `read_llava_rlhf_preferences`; records need an image (a COCO file name
  such as "000000123456.jpg"), and with `captions_path` the captions under `facts_key`.

  Returns:
    (records {"id" (the record's, else its position), "image", "image_file", "question",
    "caption_type" (int 1..7), "length_bonus" (float), "facts", "facts_key"}, skipped counts).
  """
  captions = None if captions_path is None else load_captions(captions_path)
  captions_source = "" if captions_path is None else os.fspath(captions_path)
  return _read_records(
    json_path, on_error, check_images,
    lambda raw, index: _ppo_record(raw, index, image_folder, captions, captions_source),
  )  # fmt: skip


# ------------------------------------------------------------------------------------------
# RLAIF-V parquet.
# ------------------------------------------------------------------------------------------


def open_parquet(path: str, columns: Sequence[str], dataset: str) -> pq.ParquetFile:
  """A parquet file, opened lazily (row groups are read when asked), with `columns` checked:
  a DataError naming the file otherwise."""
  try:
    parquet = pq.ParquetFile(path)
  except (OSError, pa.ArrowException) as e:
    raise DataError(path, f"cannot read the parquet file: {e}") from e
  missing = [c for c in columns if c not in parquet.schema_arrow.names]
  if missing:
    raise DataError(path, f"missing column(s) {missing}; {dataset} needs {list(columns)}")
  return parquet


def _rlaifv_id(row: Mapping[str, Any], stem: str, position: int) -> str:
  """The record id "{ds_name}-{idx}"; "{file stem}-{row}" where the file has no idx."""
  if row.get("idx") is None:
    return f"{stem}-{position}"
  return str(row["idx"]) if row.get("ds_name") is None else f"{row['ds_name']}-{row['idx']}"


def rlaifv_logps(value: Any) -> tuple[list[float], list[float]]:
  """([chosen, rejected] summed, [chosen, rejected] averaged) reference log-probs of a `logps`
  cell (see RLAIFV_LOGPS_COLUMN); raises RecordIssue on anything else."""
  try:
    parsed = json.loads(value) if isinstance(value, str | bytes) else value
  except json.JSONDecodeError as e:
    raise RecordIssue("logps", "bad_logps", f"not JSON: {e}") from e
  if isinstance(parsed, Mapping):
    parsed = list(parsed.values())
  if not isinstance(parsed, list | tuple) or len(parsed) != 6:
    raise RecordIssue(
      "logps", "bad_logps",
      "expected [win_logp, win_avg_logp, win_per_token_logp, rej_logp, rej_avg_logp, "
      f"rej_per_token_logp], got {str(parsed)[:80]!r}",
    )  # fmt: skip
  numbers = [parsed[i] for i in (0, 3, 1, 4)]
  if any(
    isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x) for x in numbers
  ):
    raise RecordIssue("logps", "bad_logps", f"log-probs must be finite numbers, got {numbers}")
  summed, averaged = [float(x) for x in numbers[:2]], [float(x) for x in numbers[2:]]
  return summed, averaged


def _rlaifv_record(row: Mapping[str, Any], record_id: str, image: ParquetImage) -> dict[str, Any]:
  question = _text(row["question"], "question", "bad_question")
  chosen = _text(row["chosen"], "chosen", "empty_response")
  rejected = _text(row["rejected"], "rejected", "empty_response")
  if chosen.strip() == rejected.strip():
    raise RecordIssue("rejected", "identical_responses", "chosen and rejected are identical")
  extra = {c: row[c] for c in RLAIFV_EXTRA_COLUMNS if c in row}
  if row.get(RLAIFV_LOGPS_COLUMN) is not None:
    extra["ref_logps"], extra["ref_avg_logps"] = rlaifv_logps(row[RLAIFV_LOGPS_COLUMN])
  return {
    "id": record_id, "image": image, "question": question, "history": [], "chosen": chosen,
    "rejected": rejected, "facts": None, **extra,
  }  # fmt: skip


def _check_image_bytes(data: bytes, mode: str) -> None:
  if mode == "none":
    return
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.verify()
    if mode == "decode":
      decode_image_bytes(data)
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
    raise RecordIssue("image", "corrupt_image", f"not a readable image: {e!r}") from e


def _read_parquet_file(
  path: str, on_error: str, mode: str
) -> tuple[list[dict[str, Any]], collections.Counter]:
  parquet = open_parquet(path, RLAIFV_COLUMNS, "RLAIF-V")
  wanted = (*RLAIFV_COLUMNS, *RLAIFV_EXTRA_COLUMNS, RLAIFV_LOGPS_COLUMN)
  columns = [c for c in wanted if c in parquet.schema_arrow.names]
  problems = ProblemLog(path, on_error)
  stem, records, position = pathlib.Path(path).stem, [], 0
  for group in range(parquet.num_row_groups):
    rows = parquet.read_row_group(group, columns=columns).to_pylist()
    for row_in_group, row in enumerate(rows):
      record_id = _rlaifv_id(row, stem, position)
      try:
        record = _rlaifv_record(row, record_id, ParquetImage(path, group, row_in_group))
        # The bytes are only checked here; the loader reads them again when called.
        data = _image_bytes(row["image"])
        if data is None:
          raise RecordIssue("image", "missing_image", "no image bytes")
        _check_image_bytes(data, mode)
      except RecordIssue as problem:
        problem.record_id = record_id
        problems.report(problem, position)
      else:
        records.append(record)
      position += 1
  problems.log_summary(position)
  return records, problems.skipped


def read_rlaifv_parquet(
  paths: str | os.PathLike | Sequence[str | os.PathLike],
  *,
  on_error: str = "raise",
  check_images: bool | str = False,
) -> tuple[list[dict[str, Any]], collections.Counter]:
  """Reads RLAIF-V-Dataset parquet shards, in the given order.

  Args:
    paths: one shard or several (e.g. sorted `RLAIF-V-Dataset_*.parquet`).
    on_error: "raise" or "skip"; problems name the file, the row and the column.
    check_images: False checks that each row has image bytes; "verify" / "decode" (True)
      also open them.

  Returns:
    (records {"id": "{ds_name}-{idx}", "image" (ParquetImage), "question", "history": [],
    "chosen", "rejected", "facts": None, and the ds_name / idx / origin_dataset /
    origin_split / image_path columns present; with a `logps` column, "ref_logps" and
    "ref_avg_logps": [chosen, rejected] reference log-probs summed / averaged over the answer
    tokens}, skipped counts summed over files).
  """
  if isinstance(paths, str | os.PathLike):
    paths = [paths]
  mode = check_image_mode(check_images)
  records, skipped = [], collections.Counter()
  for path in paths:
    file_records, file_skipped = _read_parquet_file(os.path.abspath(path), on_error, mode)
    records += file_records
    skipped.update(file_skipped)
  return records, skipped


# ------------------------------------------------------------------------------------------
# Shapes world.
# ------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------
# Pairs JSONL: what the AI-feedback stages write, read by the reward and DPO trainers.
# ------------------------------------------------------------------------------------------

PAIR_TEXT_FIELDS = ("question", "chosen", "rejected")


def image_source(image: Any, image_folder: str | os.PathLike = "") -> Any:
  """A record's image as the batchers take it: a path (relative to `image_folder`) becomes a
  lazy `ImageFile`; PIL images, loaders and None pass through."""
  if isinstance(image, str | os.PathLike):
    return ImageFile(pathlib.Path(image_folder, image))
  return image


def _pair_problem(record: Mapping[str, Any]) -> tuple[str, str] | None:
  """(field, what is wrong) of a pairs-JSONL record, or None."""
  for field in PAIR_TEXT_FIELDS:
    if not isinstance(record.get(field), str):
      return field, f"missing or not a string: {record.get(field)!r}"
  facts = record.get("facts")
  if facts is not None and not (isinstance(facts, list) and all(isinstance(f, str) for f in facts)):
    return "facts", f"must be a list of strings, got {facts!r}"
  if record.get("image") is not None and not isinstance(record["image"], str):
    return "image", f"must be a path string or null, got {record['image']!r}"
  if "sft_weight" in record and (problem := sft_weight_problem(record["sft_weight"])):
    return "sft_weight", problem
  return None


def read_pairs_jsonl(json_path: str, image_folder: str = "") -> list[dict[str, Any]]:
  """Pairs written as JSON Lines: {id, image (a path or null), question, chosen, rejected[,
  facts: list of strings][, sft_weight: a number >= 0]}, as the AI-feedback stages write
  them. Images load lazily. A record whose fields have the wrong types is a DataError naming
  the file, line and field; empty answers and chosen == rejected are left to the encoder,
  which skips or raises per data.on_error."""
  return read_pairs_files([json_path], image_folder)[0]


def read_pairs_files(
  paths: Sequence[str | os.PathLike], image_folder: str = "", on_error: str = "raise"
) -> tuple[list[dict[str, Any]], collections.Counter]:
  """`read_pairs_jsonl` over shards, in order; with on_error="skip" a record whose fields have
  the wrong types is dropped and counted as `skipped_bad_field` instead of raised."""
  records: list[dict[str, Any]] = []
  skipped: collections.Counter = collections.Counter()
  for path in paths:
    source = os.fspath(path)
    problems = ProblemLog(source, on_error)
    total = 0
    for line, record in numbered_records(path):
      total += 1
      if problem := _pair_problem(record):
        record_id = None if record.get("id") is None else str(record["id"])
        if on_error == "raise":
          raise DataError(source, problem[1], index=line, record_id=record_id, field=problem[0])
        problems.report(RecordIssue(problem[0], "bad_field", problem[1], record_id), line)
        continue
      records.append({**record, "image": image_source(record.get("image"), image_folder)})
    problems.log_summary(total)
    skipped.update(problems.skipped)
  return records, skipped
