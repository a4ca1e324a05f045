"""LLaVA instruction data (a JSON array or JSONL) + an image folder -> encoded `Example`s.

  examples, skipped = read_llava_json(
      "playground/data/llava_v1_5_mix665k.json", "playground/data", tokenizer,
      template="vicuna_v1", num_image_tokens=576, image_token_id=32000)

A record is `{"id": str, "image": str (optional, relative to the image folder),
"conversations": [{"from": "human" | "gpt", "value": str}, ...]}` (PROTOCOLS.md §1.1). A file
whose first non-blank character is `[` is read as a JSON array; anything else as JSONL, one
record per non-blank line (POPE-style files are JSONL whatever their extension).

Every record is checked before any is used, and a problem names the file, the record (its
0-based position and its id) and the field:

  {file}: record 12 (id 'abc'), field 'image': file '/data/images/x.png' not found

on_error="raise" raises the first problem as `DataError`; on_error="skip" drops the record,
counts it under `skipped_<reason>` (REASONS) and logs a summary. Checks, in order (a record's
first failing check names it; with "raise", pixel problems surface after all the others,
because images are checked last, on a thread pool, once the cheap checks have passed):

  * the record is a JSON object (a JSONL line that does not parse is a `bad_json` record);
  * `id` present, a string (an int, as some converted datasets have, is taken as its str);
  * `conversations` present and a list;
  * `image` a relative path inside the image folder: absolute paths, `..` components and
    symlinks that resolve outside the folder are refused; the file exists;
  * `<image>` placeholders match the image: exactly one with an image, none without;
  * turns alternate human/gpt, are non-empty strings and end with an answer, and fit the
    template (`encode_conversation`'s checks; its errors are re-raised naming the record);
  * the image decodes (`check_images`).

Placeholders. LLaVA's training code (`preprocess_multimodal`) only moves an existing
`<image>` to the front of its turn; it never inserts one, so a record with an image and no
placeholder trains with the image silently unused, and a text-only record with a placeholder
tokenizes "<image>" as text. Both are errors here. `add_missing_placeholder=True` instead
prepends "<image>\\n" to the first human turn, as LLaVA's inference scripts (`model_vqa.py`,
the CLI) do for bare questions.

Multi-image records (llava-onevision's `"image": [a, b, ...]`) are refused (reason
`multi_image`): an `Example` carries one image and the batcher feeds one per row. A one-item
list is read as that image.

Images are never held in memory: `Example.image` is a loader, `partial(load_image, path)`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import json
import logging
import os
import pathlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from PIL import Image

from lmm_align.data.conversation import (
  GPT,
  HUMAN,
  IMAGE_PLACEHOLDER,
  ConversationTemplate,
  EncodedConversation,
  encode_conversation,
  get_template,
  render_conversation,
)
from lmm_align.data.images import load_image, to_rgb
from lmm_align.data.pipeline import Example

if TYPE_CHECKING:
  from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

ON_ERROR_MODES = ("raise", "skip")
# Why a record can be refused; skipped records are counted as f"skipped_{reason}".
REASONS = (
  "bad_json",  # a JSONL line that does not parse
  "not_an_object",  # the record is not a JSON object
  "missing_id",
  "bad_id",  # id neither a string nor an int
  "missing_conversations",
  "bad_conversations",  # not a list, or rejected by encode_conversation
  "bad_image_field",  # image neither a path string nor a one-item list of one
  "multi_image",
  "unsafe_image_path",  # absolute, `..`, or resolving outside the image folder
  "missing_image",  # not found, or not a file
  "corrupt_image",
  "placeholder_mismatch",
)
# check_images modes: "verify" is PIL's `verify()` (header, PNG chunk CRCs; cheap);
# "decode" also decodes every pixel, which catches a truncated JPEG that `verify()` passes.
CHECK_IMAGE_MODES = ("none", "verify", "decode")


class DataError(ValueError):
  """A data file or record that cannot be used; the message names file, record and field."""

  def __init__(
    self,
    source: str,
    detail: str,
    *,
    index: int | None = None,
    record_id: str | None = None,
    field: str | None = None,
    reason: str | None = None,
  ):
    self.source, self.detail, self.index = source, detail, index
    self.record_id, self.field, self.reason = record_id, field, reason
    where = source
    if index is not None:
      where += f": record {index} ({'no id' if record_id is None else f'id {record_id!r}'})"
    if field is not None:
      where += f", field {field!r}"
    super().__init__(f"{where}: {detail}")


class RecordProblem(Exception):
  """What is wrong with one record; `DataError` adds the file and the record's position."""

  def __init__(self, field: str | None, reason: str, detail: str, record_id: str | None = None):
    assert reason in REASONS, reason
    super().__init__(detail)
    self.field, self.reason, self.detail, self.record_id = field, reason, detail, record_id

  def to_error(self, source: str, index: int) -> DataError:
    return DataError(
      source, self.detail, index=index, record_id=self.record_id, field=self.field,
      reason=self.reason,
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class LlavaRecord:
  """A record that passed the structural checks (the image file exists; not yet decoded).

  image: the resolved path of the image file, or None for a text-only record.
  """

  record_id: str
  conversations: list[dict[str, str]]
  image: pathlib.Path | None


# ------------------------------------------------------------------------------------------
# Reading the file.
# ------------------------------------------------------------------------------------------


def read_json_records(json_path: str | os.PathLike) -> list[Any]:
  """The raw records of a JSON array or JSONL file, in file order.

  A JSONL line that does not parse becomes a `RecordProblem` in its place (so one bad line
  can be skipped); a JSON array that does not parse, or a file that is neither, raises.
  """
  source = os.fspath(json_path)
  try:
    with open(json_path, encoding="utf-8") as f:
      text = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(source, f"cannot read the file: {e}") from e
  if text.lstrip().startswith("["):
    try:
      records = json.loads(text)
    except json.JSONDecodeError as e:
      raise DataError(source, f"not valid JSON: {e}") from e
    if not isinstance(records, list):
      raise DataError(source, "expected a JSON array of records")
    return records
  records = []
  for line_number, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      records.append(RecordProblem(None, "bad_json", f"line {line_number} is not JSON: {e}"))
  if not records and text.strip():
    raise DataError(source, "neither a JSON array nor JSONL records")
  return records


# ------------------------------------------------------------------------------------------
# Checking one record.
# ------------------------------------------------------------------------------------------


def _record_id(raw: dict[str, Any]) -> str:
  if "id" not in raw:
    raise RecordProblem("id", "missing_id", "missing")
  value = raw["id"]
  if isinstance(value, bool) or not isinstance(value, str | int):
    raise RecordProblem("id", "bad_id", f"expected a string, got {type(value).__name__}")
  return str(value)


def resolve_image_path(image_folder: str | os.PathLike | None, image: Any) -> pathlib.Path:
  """The real path of a record's `image` value, refusing anything outside `image_folder`."""
  if isinstance(image, list) and len(image) == 1:
    image = image[0]
  elif isinstance(image, list) and len(image) > 1:
    raise RecordProblem(
      "image", "multi_image",
      f"{len(image)} images (multi-image records are not supported: an Example holds one)",
    )  # fmt: skip
  if not isinstance(image, str) or not image:
    raise RecordProblem(
      "image", "bad_image_field", f"expected a relative path string, got {image!r}"
    )
  if image_folder is None:
    raise RecordProblem("image", "missing_image", "the record has an image but no folder given")
  if os.path.isabs(image) or pathlib.PureWindowsPath(image).drive:
    raise RecordProblem("image", "unsafe_image_path", f"absolute path {image!r} refused")
  if ".." in pathlib.PurePosixPath(image.replace("\\", "/")).parts:
    raise RecordProblem("image", "unsafe_image_path", f"'..' in path {image!r} refused")
  path = pathlib.Path(image_folder) / image
  root = os.path.realpath(image_folder)
  real = os.path.realpath(path)
  if os.path.commonpath([root, real]) != root:
    raise RecordProblem(
      "image", "unsafe_image_path", f"{image!r} resolves outside the image folder ({real})"
    )
  if not os.path.exists(real):
    raise RecordProblem("image", "missing_image", f"file {os.fspath(path)!r} not found")
  if not os.path.isfile(real):
    raise RecordProblem("image", "missing_image", f"{os.fspath(path)!r} is not a file")
  return pathlib.Path(real)


def check_placeholders(
  conversations: list[Any], has_image: bool, add_missing_placeholder: bool
) -> list[Any]:
  """The conversation with placeholders matching the image (see the module docstring)."""
  values = [t.get("value") for t in conversations if isinstance(t, dict)]
  found = sum(v.count(IMAGE_PLACEHOLDER) for v in values if isinstance(v, str))
  if has_image and found == 0:
    first_human = next(
      (i for i, t in enumerate(conversations) if isinstance(t, dict) and t.get("from") == HUMAN),
      None,
    )
    if not add_missing_placeholder or first_human is None:
      raise RecordProblem(
        "image", "placeholder_mismatch",
        f"the record has an image but no {IMAGE_PLACEHOLDER} placeholder in its conversations "
        "(add_missing_placeholder=True prepends one, as LLaVA's inference scripts do)",
      )  # fmt: skip
    conversations = list(conversations)
    turn = dict(conversations[first_human])
    if isinstance(turn.get("value"), str):
      turn["value"] = f"{IMAGE_PLACEHOLDER}\n{turn['value']}"
    conversations[first_human] = turn
  elif not has_image and found:
    raise RecordProblem(
      "conversations", "placeholder_mismatch",
      f"{found} {IMAGE_PLACEHOLDER} placeholder(s) but the record has no 'image' field",
    )  # fmt: skip
  elif has_image and found > 1:
    raise RecordProblem(
      "conversations", "placeholder_mismatch",
      f"{found} {IMAGE_PLACEHOLDER} placeholders for the record's one image",
    )  # fmt: skip
  return conversations


def validate_record(
  raw: Any,
  image_folder: str | os.PathLike | None,
  *,
  add_missing_placeholder: bool = False,
  check_turns: bool = False,
) -> LlavaRecord:
  """Checks one raw record's fields (not the image's pixels); raises RecordProblem.

  check_turns: also check the turn structure without a tokenizer (roles alternate, strings,
    ends with an answer), for writers such as the TFDS builder; readers get the same checks
    from `encode_conversation`.
  """
  if isinstance(raw, RecordProblem):
    raise raw
  if not isinstance(raw, dict):
    raise RecordProblem(None, "not_an_object", f"expected a JSON object, got {type(raw).__name__}")
  record_id = _record_id(raw)
  try:
    if "conversations" not in raw:
      raise RecordProblem("conversations", "missing_conversations", "missing")
    conversations = raw["conversations"]
    if not isinstance(conversations, list):
      raise RecordProblem(
        "conversations", "bad_conversations",
        f"expected a list of turns, got {type(conversations).__name__}",
      )  # fmt: skip
    if not conversations:
      raise RecordProblem("conversations", "bad_conversations", "empty conversation")
    image = raw.get("image")
    path = None if image is None else resolve_image_path(image_folder, image)
    conversations = check_placeholders(conversations, path is not None, add_missing_placeholder)
    if check_turns:
      _check_turns(conversations)
  except RecordProblem as problem:
    problem.record_id = record_id
    raise
  return LlavaRecord(record_id, conversations, path)


def _check_turns(conversations: list[Any]) -> None:
  try:
    render_conversation(conversations, "vicuna_v1")  # validates; the template is irrelevant
  except ValueError as e:
    raise RecordProblem("conversations", "bad_conversations", str(e)) from e
  if conversations[-1].get("from") != GPT:
    raise RecordProblem(
      "conversations", "bad_conversations", "the conversation must end with an answer (gpt turn)"
    )


def check_image_file(path: str | os.PathLike, mode: str = "decode") -> RecordProblem | None:
  """None if the file is a readable image under `mode` (CHECK_IMAGE_MODES), else the problem."""
  if mode == "none":
    return None
  try:
    with Image.open(path) as image:
      image.verify()
    if mode == "decode":  # verify() leaves the file unusable, so decode from a fresh open
      with Image.open(path) as image:
        image.load()
        to_rgb(image)
  except Exception as e:  # PIL raises OSError, SyntaxError, struct.error, ValueError, ...
    return RecordProblem(
      "image", "corrupt_image", f"file {os.fspath(path)!r} is not a readable image: {e!r}"
    )
  return None


def check_image_mode(check_images: bool | str) -> str:
  """True -> "decode", False -> "none"; strings must be one of CHECK_IMAGE_MODES."""
  if check_images is True:
    return "decode"
  if check_images is False:
    return "none"
  if check_images not in CHECK_IMAGE_MODES:
    raise ValueError(f"check_images={check_images!r}: use a bool or one of {CHECK_IMAGE_MODES}")
  return check_images


def encode_record(
  record: LlavaRecord,
  tokenizer: PreTrainedTokenizerBase,
  template: ConversationTemplate,
  num_image_tokens: int,
  image_token_id: int,
  *,
  has_image: bool | None = None,
) -> EncodedConversation:
  """`encode_conversation` on a checked record; its ValueErrors become RecordProblems.

  has_image: overrides `record.image is not None` (readers whose image is not a file).
  """
  if has_image is None:
    has_image = record.image is not None
  try:
    return encode_conversation(
      record.conversations, tokenizer, template, num_image_tokens, image_token_id,
      num_images=int(has_image),
    )  # fmt: skip
  except ValueError as e:
    raise RecordProblem("conversations", "bad_conversations", str(e), record.record_id) from e


# ------------------------------------------------------------------------------------------
# Skip bookkeeping shared by the readers.
# ------------------------------------------------------------------------------------------


class ProblemLog:
  """Raises (on_error="raise") or counts (on_error="skip") record problems from one source."""

  def __init__(self, source: str, on_error: str):
    if on_error not in ON_ERROR_MODES:
      raise ValueError(f"on_error={on_error!r}: use one of {ON_ERROR_MODES}")
    self.source, self.on_error = source, on_error
    self.skipped: collections.Counter = collections.Counter()
    self.first: dict[str, DataError] = {}

  def report(self, problem: RecordProblem, index: int) -> None:
    error = problem.to_error(self.source, index)
    if self.on_error == "raise":
      raise error from problem
    self.skipped[f"skipped_{problem.reason}"] += 1
    self.first.setdefault(problem.reason, error)

  def log_summary(self, total: int) -> None:
    if not self.skipped:
      return
    logger.warning(
      "%s: skipped %d of %d records: %s", self.source, sum(self.skipped.values()), total,
      dict(self.skipped),
    )  # fmt: skip
    for reason, error in self.first.items():
      logger.warning("first %s: %s", reason, error)


def check_encoding_args(
  template: ConversationTemplate | str, num_image_tokens: int, image_token_id: int
) -> ConversationTemplate:
  """The template; raises ValueError on arguments that would fail every record alike."""
  if num_image_tokens < 1 or image_token_id < 0:
    raise ValueError(
      f"need num_image_tokens >= 1 and image_token_id >= 0, got {num_image_tokens}, "
      f"{image_token_id}"
    )
  return get_template(template) if isinstance(template, str) else template


# ------------------------------------------------------------------------------------------
# Public reader.
# ------------------------------------------------------------------------------------------


def read_llava_json(
  json_path: str | os.PathLike,
  image_folder: str | os.PathLike | None,
  tokenizer: PreTrainedTokenizerBase,
  *,
  template: ConversationTemplate | str,
  num_image_tokens: int,
  image_token_id: int,
  on_error: str = "raise",
  check_images: bool | str = True,
  add_missing_placeholder: bool = False,
  num_workers: int = 16,
) -> tuple[list[Example], collections.Counter]:
  """Reads, checks and encodes LLaVA instruction data.

  Args:
    json_path: a JSON array of records, or JSONL (one record per line).
    image_folder: the folder `image` paths are relative to (LLaVA's `--image_folder`); None
      for text-only data.
    tokenizer: an HF tokenizer, as `encode_conversation` takes.
    template: conversation template or its name (e.g. "vicuna_v1").
    num_image_tokens: ids per image (P).
    image_token_id: the id of one image patch.
    on_error: "raise" (the first problem raises DataError) or "skip" (bad records dropped and
      counted by reason).
    check_images: True / "decode" decodes every image; "verify" is PIL's cheaper header and
      checksum check (misses a truncated JPEG); False / "none" only checks existence.
    add_missing_placeholder: prepend "<image>\\n" to the first human turn of an image record
      that has no placeholder, instead of refusing it.
    num_workers: threads that check images (PIL releases the GIL while decoding).

  Returns:
    (examples in file order, Counter of skipped records by `skipped_<reason>`). Each example's
    input_ids / labels are int32 [T] from `encode_conversation`; its image is a loader.
  """
  template = check_encoding_args(template, num_image_tokens, image_token_id)
  mode = check_image_mode(check_images)
  source = os.fspath(json_path)
  problems = ProblemLog(source, on_error)
  raw_records = read_json_records(json_path)

  # Structure, paths and tokenization, in order; the first problem raises immediately.
  checked: list[tuple[int, Example, pathlib.Path | None]] = []
  for index, raw in enumerate(raw_records):
    try:
      record = validate_record(raw, image_folder, add_missing_placeholder=add_missing_placeholder)
      encoded = encode_record(record, tokenizer, template, num_image_tokens, image_token_id)
    except RecordProblem as problem:
      problems.report(problem, index)
      continue
    image = None if record.image is None else functools.partial(load_image, record.image)
    example = Example(record.record_id, encoded.input_ids, encoded.labels, image)
    checked.append((index, example, record.image))
  total = len(raw_records)
  del raw_records

  # Pixels last: reading every file is the slow part, so it runs on threads.
  examples = []
  pool = concurrent.futures.ThreadPoolExecutor(max(1, num_workers))
  try:
    results = pool.map(
      lambda item: None if item[2] is None else check_image_file(item[2], mode), checked
    )
    for (index, example, _), problem in zip(checked, results):
      if problem is not None:
        problem.record_id = example.record_id
        problems.report(problem, index)
        continue
      examples.append(example)
  finally:  # on a raise, do not wait for the rest of the files
    pool.shutdown(wait=True, cancel_futures=True)

  _warn_duplicate_ids(source, examples)
  problems.log_summary(total)
  return examples, problems.skipped


def _warn_duplicate_ids(source: str, examples: Sequence[Example]) -> None:
  # Published mixtures do repeat ids across sub-datasets; they are kept, as LLaVA keeps them.
  counts = collections.Counter(e.record_id for e in examples)
  repeated = {k: n for k, n in counts.items() if n > 1}
  if repeated:
    logger.warning("%s: %d ids occur more than once (kept)", source, len(repeated))


def save_llava_dataset(
  records: Sequence[dict[str, Any]], directory: str | os.PathLike, name: str = "data.json"
) -> pathlib.Path:
  """Writes in-memory records as a LLaVA JSON array `directory/name` that `read_llava_json`
  reads with `directory` as the image folder: a record's PIL "image" is saved as
  `images/{id}.png` and the record refers to it by that relative path; a record without one
  (None or absent) is written text-only, with no "image" field. The other fields are written
  as they are (they must be JSON-native). Returns the JSON's path."""
  directory = pathlib.Path(directory)
  (directory / "images").mkdir(parents=True, exist_ok=True)
  out = []
  for index, record in enumerate(records):
    row, image = dict(record), record.get("image")
    if isinstance(image, Image.Image):
      row["image"] = f"images/{record['id']}.png"  # in the record's place among its fields
      image.save(directory / row["image"])
    elif image is None:
      row.pop("image", None)
    else:
      raise ValueError(
        f"record {index} (id {record.get('id')!r}), field 'image': expected a PIL image or "
        f"None, got {type(image).__name__}"
      )
    out.append(row)
  path = directory / name
  path.write_text(json.dumps(out, indent=1))
  return path
