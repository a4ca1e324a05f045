"""LLaVA-Critic-113k parquet shards -> encoded SFT `Example`s (PROTOCOLS.md §7).

`lmms-lab/llava-critic-113k` (configs `pointwise` and `pairwise`) has the columns
`id` (str), `source` (str), `conversations` (a list of {from, value}: the human prompt with
`<image>`, then the gpt critique) and `image` (an HF Image struct {bytes, path}). A row is a
LLaVA instruction record whose image lives in the parquet, so it is checked and encoded as
`llava_json` does (ids, turns, one placeholder per image, the template), and its image is a
`ParquetImage`: the bytes are read again, one row group at a time, when a batch needs them,
so host memory does not grow with the dataset's images.

Problems name the file, the row (its 0-based position over the file and its id) and the
field; with on_error="skip" they are counted as `skipped_<reason>`. A file without a
required column is refused whole.
"""

from __future__ import annotations

import collections
import io
import json
import os
from collections.abc import Sequence
from typing import Any

from PIL import Image

from lmm_align.data.conversation import IMAGE_PLACEHOLDER, ConversationTemplate
from lmm_align.data.llava_json import (
  LlavaRecord,
  ProblemLog,
  RecordProblem,
  check_encoding_args,
  check_image_mode,
  check_placeholders,
  encode_record,
)
from lmm_align.data.pipeline import Example
from lmm_align.data.preference_sources import (
  ParquetImage,
  RecordIssue,
  _check_image_bytes,
  _image_bytes,
  open_parquet,
)

LLAVA_CRITIC_COLUMNS = ("id", "conversations", "image")


def _conversations(value: Any) -> list[Any]:
  if isinstance(value, str):  # some converted copies store the turns as a JSON string
    try:
      value = json.loads(value)
    except json.JSONDecodeError as e:
      raise RecordProblem("conversations", "bad_conversations", f"not JSON: {e}") from e
  if value is None:
    raise RecordProblem("conversations", "missing_conversations", "missing")
  if not isinstance(value, list) or not value:
    raise RecordProblem("conversations", "bad_conversations", "expected a non-empty list of turns")
  return value


def _header_size(data: bytes) -> tuple[int, int] | None:
  """(height, width) from the image's header (no decode): anyres models count a row's image
  placeholders by it. None when the header does not open (a corrupt image fails on load)."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      return image.height, image.width
  except Exception:  # PIL raises OSError, SyntaxError, ValueError, ...
    return None


def _row_id(value: Any) -> str:
  if value is None or value == "":
    raise RecordProblem("id", "missing_id", "missing")
  if isinstance(value, bool) or not isinstance(value, str | int):
    raise RecordProblem("id", "bad_id", f"expected a string, got {type(value).__name__}")
  return str(value)


def read_llava_critic_parquet(
  paths: Sequence[str | os.PathLike],
  tokenizer: Any,
  *,
  template: ConversationTemplate | str,
  num_image_tokens: int,
  image_token_id: int,
  on_error: str = "raise",
  check_images: bool | str = False,
) -> tuple[list[Example], collections.Counter]:
  """Reads, checks and encodes LLaVA-Critic-113k shards, in the given order.

  Args:
    paths: parquet shards (e.g. sorted `pointwise/*.parquet`).
    tokenizer, template, num_image_tokens, image_token_id: as `read_llava_json` takes.
    on_error: "raise" (DataError naming file, row and field) or "skip" (counted by reason).
    check_images: False checks that image rows have bytes; "verify" / "decode" (True) also
      open them.

  Returns:
    (examples: input_ids / labels int32 [T], a `ParquetImage` loader and the image's
    (height, width) from its header (None for a row without an image and without a
    placeholder), skipped counts summed over files).
  """
  template = check_encoding_args(template, num_image_tokens, image_token_id)
  mode = check_image_mode(check_images)
  examples: list[Example] = []
  skipped: collections.Counter = collections.Counter()
  for path in paths:
    path = os.path.abspath(path)
    parquet = open_parquet(path, LLAVA_CRITIC_COLUMNS, "LLaVA-Critic")
    problems = ProblemLog(path, on_error)
    position = 0
    for group in range(parquet.num_row_groups):
      table = parquet.read_row_group(group, columns=list(LLAVA_CRITIC_COLUMNS))
      ids = table.column("id").to_pylist()
      turns = table.column("conversations").to_pylist()
      images = table.column("image")
      for row in range(table.num_rows):
        record_id = None
        try:
          record_id = _row_id(ids[row])
          conversations = _conversations(turns[row])
          data = _image_bytes(images[row].as_py())
          has_placeholder = any(
            isinstance(t, dict) and IMAGE_PLACEHOLDER in str(t.get("value", ""))
            for t in conversations
          )
          if data is None and has_placeholder:
            raise RecordProblem("image", "missing_image", f"no image bytes for {IMAGE_PLACEHOLDER}")
          conversations = check_placeholders(conversations, data is not None, False)
          encoded = encode_record(
            LlavaRecord(record_id, conversations, None), tokenizer, template, num_image_tokens,
            image_token_id, has_image=data is not None,
          )  # fmt: skip
          if data is not None:
            try:
              _check_image_bytes(data, mode)
            except RecordIssue as issue:
              raise RecordProblem("image", "corrupt_image", issue.detail) from issue
        except RecordProblem as problem:
          problem.record_id = record_id
          problems.report(problem, position)
        else:
          image = size = None
          if data is not None:
            image, size = ParquetImage(path, group, row), _header_size(data)
          examples.append(Example(record_id, encoded.input_ids, encoded.labels, image, size))
        position += 1
      del table, images
    problems.log_summary(position)
    skipped.update(problems.skipped)
  return examples, skipped
