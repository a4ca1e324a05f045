"""JSON Lines files: the one reader and the writers that every stage and benchmark shares.

Reading is strict: a line that is not a JSON object is an error naming the file and line. The
exception is the last line of a file that a killed writer may have cut short: resumable
outputs (candidates, labels, answers) read with `tolerate_cut_tail=True` and drop it.
Writing is either all at once through a temporary file (`write_jsonl`: a kill leaves the old
file or the new one) or group by group with a flush (`append_jsonl`, resumed by
`resume_jsonl`).
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any


def numbered_records(
  path: str | os.PathLike,
  tolerate_cut_tail: bool = False,
  bad_lines: list[int] | None = None,
) -> Iterable[tuple[int, dict[str, Any]]]:
  """(line number, record) for each non-empty line. A last line that is not valid JSON is a
  write cut short by a kill: skipped with a warning when `tolerate_cut_tail`, an error
  otherwise. Any other line that is not a JSON object is an error naming the file and line,
  or, when a `bad_lines` list is given, skipped with its number appended there."""
  where = os.fspath(path)
  lines = pathlib.Path(path).read_text(encoding="utf-8").split("\n")
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      if tolerate_cut_tail and i == len(lines) - 1:
        warnings.warn(f"{where}: line {i + 1}: dropped a truncated last line", stacklevel=2)
        return
      problem = f"not valid JSON ({e})"
    else:
      if isinstance(record, dict):
        yield i + 1, record
        continue
      problem = "not a JSON object"
    if bad_lines is None:
      raise ValueError(f"{where}: line {i + 1}: {problem}")
    bad_lines.append(i + 1)


def read_jsonl(path: str | os.PathLike, tolerate_cut_tail: bool = False) -> list[dict[str, Any]]:
  """Every record of a JSONL file (see `numbered_records`)."""
  return [record for _, record in numbered_records(path, tolerate_cut_tail)]


def _lines(records: Iterable[dict[str, Any]]) -> Iterable[str]:
  """One line per record, UTF-8 text as it is (no \\u escapes)."""
  return (json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_jsonl(path: str | os.PathLike, records: Sequence[dict[str, Any]]) -> None:
  """All at once through a temporary file, so a kill leaves the old file or the new one."""
  tmp = os.fspath(path) + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(_lines(records))
  os.replace(tmp, path)


def append_jsonl(f: Any, records: Sequence[dict[str, Any]]) -> None:
  """Appends one group's records to `f` (opened for text in UTF-8) and flushes, so a kill loses
  at most the group in flight."""
  f.writelines(_lines(records))
  f.flush()


def resume_jsonl(
  path: str | os.PathLike,
  group_field: str,
  is_complete: Callable[[str, list[dict[str, Any]], str], bool],
) -> dict[str, list[dict[str, Any]]]:
  """The complete groups of an existing output file; the file is rewritten to hold only them.

  Records are grouped by `record[group_field]`; `is_complete(group, records, where)` decides
  (and raises, naming `where`, on records that belong to another run). Returns {} when the
  file does not exist.
  """
  path = pathlib.Path(path)
  if not path.exists():
    return {}
  groups: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
  for line, record in numbered_records(path, tolerate_cut_tail=True):
    if group_field not in record:
      raise ValueError(f"{path}: line {line}: field {group_field!r} missing")
    groups[str(record[group_field])].append(record)
  complete = {g: rs for g, rs in groups.items() if is_complete(g, rs, f"{path} ({g!r})")}
  write_jsonl(path, [r for records in complete.values() for r in records])
  return complete
