"""The one interface every judge backend implements.

A judge takes requests (a prompt, optionally an image) and returns text replies, one per
request, in order. A backend that could not get an answer (an endpoint down after its retries,
a reply that is not text) returns `JudgeReply(text=None, error=...)` for that item instead of
raising, so that one bad item is counted invalid and a long judging run goes on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Protocol


@dataclasses.dataclass(frozen=True)
class JudgeRequest:
  prompt: str
  image: str | None = None  # a local image path; backends that take no image refuse one
  system: str | None = None
  max_tokens: int = 512
  request_id: str = ""  # for error messages and logs; not part of a cache key


@dataclasses.dataclass(frozen=True)
class JudgeReply:
  text: str | None
  error: str | None = None

  @property
  def ok(self) -> bool:
    return self.text is not None


class Judge(Protocol):
  name: str

  def complete(self, requests: Sequence[JudgeRequest]) -> list[JudgeReply]: ...


class FunctionJudge:
  """A judge from a Python function prompt -> text (rules, tests, a scripted reference)."""

  def __init__(self, fn: Callable[[JudgeRequest], str], name: str = "function"):
    self.fn = fn
    self.name = name

  def complete(self, requests: Sequence[JudgeRequest]) -> list[JudgeReply]:
    return [JudgeReply(self.fn(r)) for r in requests]
