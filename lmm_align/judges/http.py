"""A judge behind any OpenAI-compatible chat endpoint (OpenAI, vLLM, SGLang, a local server).

`OpenAIJudge` sends each request as one chat completion through the `openai` client and
returns the reply text. What makes long judging runs safe to restart and cheap to repeat:

* Retries. 5xx, 408/409/429, timeouts, connection errors and replies that are not a chat
  completion with text (garbage bodies, no choices) are retried `max_retries` times with
  exponential backoff and "equal jitter": attempt k waits uniform(d/2, d), d = min(max_backoff_s,
  backoff_s * 2**k), so many workers that failed together do not retry together. Other 4xx
  (bad request, auth) fail at once. An item that still fails becomes
  `JudgeReply(None, error=...)` and is counted in `counts["errors"]`; the run goes on.
* Cache. Every successful reply is stored on disk under a sha256 of (base_url, model,
  messages, sampling parameters), one JSON file per key at `cache_dir/<key[:2]>/<key>.json`,
  written to a temporary file and renamed into place (atomic on POSIX), so concurrent threads
  or processes never see half a file and a killed run leaves no corrupt entry. A rerun is
  served from the files with no request sent. Errors are not cached: a rerun retries them.
  Files hold the reply, model, base_url and request id: no images, no headers, no key.
* Concurrency. Requests run on a thread pool of `max_concurrency` workers; replies come back in
  request order.
* The API key. It is read from the environment variable NAMED by `api_key_env` (configs name
  the variable, never hold the key) and handed to the client only: it is not an attribute,
  not in the cache, and it is scrubbed from error messages (servers may echo it back).

Images go in OpenAI's content format: an `image_url` part holding a base64 data URL, then the
text part; an "<image>" placeholder in the prompt (the LLaVA convention the critic prompts
use) is removed from the text, since the image travels in its own part. Decoding is
temperature 0 by default, as MT-Bench's judge runs.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import hashlib
import io
import json
import os
import pathlib
import random
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

import openai
from PIL import Image

from lmm_align.judges.base import JudgeReply, JudgeRequest

IMAGE_PLACEHOLDER = "<image>"
NO_KEY = "EMPTY"  # what local servers (vLLM, SGLang) accept when they check no key
_RETRY_STATUS = {408, 409, 429}
_MAX_ERROR_CHARS = 300


class UnparseableReply(ValueError):
  """The endpoint answered, but not with a chat completion carrying text."""


def image_data_url(path: str | os.PathLike) -> str:
  """The file as a `data:image/...;base64,...` URL; ValueError if it is not a readable image."""
  try:
    data = pathlib.Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as image:
      mime = Image.MIME.get(image.format or "")
  except (OSError, Image.DecompressionBombError) as e:
    raise ValueError(f"cannot read image {os.fspath(path)!r}: {e}") from e
  if mime is None:
    raise ValueError(f"image {os.fspath(path)!r}: no MIME type for its format")
  return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def chat_messages(request: JudgeRequest) -> list[dict[str, Any]]:
  """The request as chat messages: optional system, then one user turn (image first)."""
  messages: list[dict[str, Any]] = []
  if request.system:
    messages.append({"role": "system", "content": request.system})
  if request.image is None:
    messages.append({"role": "user", "content": request.prompt})
    return messages
  text = request.prompt.replace(IMAGE_PLACEHOLDER, "").strip()
  content = [
    {"type": "image_url", "image_url": {"url": image_data_url(request.image)}},
    {"type": "text", "text": text},
  ]
  messages.append({"role": "user", "content": content})
  return messages


def cache_key(base_url: str, model: str, messages: Any, sampling: dict[str, Any]) -> str:
  """sha256 of the canonical JSON of everything that determines the reply."""
  payload = {"base_url": base_url, "model": model, "messages": messages, "sampling": sampling}
  canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
  return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _reply_text(response: Any) -> str:
  choices = getattr(response, "choices", None)
  if not choices:
    raise UnparseableReply(f"no choices in the reply ({type(response).__name__})")
  text = getattr(getattr(choices[0], "message", None), "content", None)
  if not isinstance(text, str):
    raise UnparseableReply("the first choice has no text content")
  return text


def _retryable(error: Exception) -> bool:
  if isinstance(error, openai.APIStatusError):
    return error.status_code >= 500 or error.status_code in _RETRY_STATUS
  # Timeouts are connection errors; a body that is not JSON surfaces as a ValueError.
  return isinstance(
    error, openai.APIConnectionError | openai.APIResponseValidationError | ValueError
  )


class OpenAIJudge:
  """The Judge protocol over an OpenAI-compatible `/chat/completions` endpoint.

  Args:
    base_url: the API root, e.g. "https://api.openai.com/v1" or "http://localhost:8000/v1".
    model: the model name the endpoint serves.
    api_key_env: NAME of the environment variable holding the key; None for servers that
      take none. A named variable that is unset raises ValueError at construction.
    temperature, top_p, seed: sampling parameters (top_p / seed sent only when set).
    timeout_s: per attempt. max_retries: attempts after the first.
    backoff_s, max_backoff_s: the exponential backoff's base and cap (module docstring).
    max_concurrency: worker threads, i.e. requests in flight at once.
    cache_dir: where replies are cached; None disables the cache.
  `counts` tallies requests, cache_hits, calls (HTTP attempts), retries, errors and
  cache_write_errors (a reply that could not be cached is still returned).
  """

  def __init__(
    self,
    base_url: str,
    model: str,
    *,
    api_key_env: str | None = "OPENAI_API_KEY",
    temperature: float = 0.0,
    top_p: float | None = None,
    seed: int | None = None,
    timeout_s: float = 60.0,
    max_retries: int = 4,
    backoff_s: float = 1.0,
    max_backoff_s: float = 30.0,
    max_concurrency: int = 8,
    cache_dir: str | os.PathLike | None = None,
    name: str | None = None,
  ):
    if max_retries < 0 or max_concurrency < 1 or timeout_s <= 0:
      raise ValueError(
        f"need max_retries >= 0, max_concurrency >= 1, timeout_s > 0; got {max_retries}, "
        f"{max_concurrency}, {timeout_s}"
      )
    key = self._read_key(api_key_env, base_url)
    # The client's own retries are off: ours also cover unparseable replies and are counted.
    self._client = openai.OpenAI(base_url=base_url, api_key=key, timeout=timeout_s, max_retries=0)
    self.base_url, self.model = base_url, model
    self.name = name or f"openai:{model}"
    self.sampling = {"temperature": temperature}
    self.sampling.update({k: v for k, v in (("top_p", top_p), ("seed", seed)) if v is not None})
    self.max_retries, self.backoff_s, self.max_backoff_s = max_retries, backoff_s, max_backoff_s
    self.max_concurrency = max_concurrency
    self.cache_dir = None if cache_dir is None else pathlib.Path(cache_dir)
    self.counts: collections.Counter = collections.Counter()
    self._lock = threading.Lock()
    self._jitter = random.Random()

  def __repr__(self) -> str:
    return f"OpenAIJudge(base_url={self.base_url!r}, model={self.model!r})"

  @staticmethod
  def _read_key(api_key_env: str | None, base_url: str) -> str:
    if api_key_env is None:
      return NO_KEY
    key = os.environ.get(api_key_env)
    if not key:
      raise ValueError(
        f"environment variable {api_key_env!r} (the API key for {base_url}) is not set"
      )
    return key

  def complete(self, requests: Sequence[JudgeRequest]) -> list[JudgeReply]:
    """One reply per request, in order; failures are error replies, never exceptions."""
    if not requests:
      return []
    with concurrent.futures.ThreadPoolExecutor(min(self.max_concurrency, len(requests))) as pool:
      return list(pool.map(self._complete_one, requests))

  # ------------------------------------------------------------------------------------------
  # One request.
  # ------------------------------------------------------------------------------------------

  def _count(self, key: str, n: int = 1) -> None:
    with self._lock:
      self.counts[key] += n

  def _complete_one(self, request: JudgeRequest) -> JudgeReply:
    self._count("requests")
    try:
      messages = chat_messages(request)
    except ValueError as e:
      return self._error(request, str(e))
    sampling = {**self.sampling, "max_tokens": request.max_tokens}
    key = cache_key(self.base_url, self.model, messages, sampling)
    cached = self._cache_read(key)
    if cached is not None:
      self._count("cache_hits")
      return JudgeReply(cached)
    last_error = ""
    for attempt in range(self.max_retries + 1):
      if attempt:
        self._count("retries")
        time.sleep(self._backoff(attempt - 1))
      self._count("calls")
      try:
        response = self._client.chat.completions.create(
          model=self.model, messages=messages, **sampling
        )
        text = _reply_text(response)
      except (openai.OpenAIError, ValueError) as e:
        last_error = f"{type(e).__name__}: {e}"
        if not _retryable(e):
          return self._error(request, last_error)
        continue
      self._cache_write(key, text, request)
      return JudgeReply(text)
    return self._error(request, f"{self.max_retries + 1} attempts failed; last: {last_error}")

  def _backoff(self, attempt: int) -> float:
    delay = min(self.max_backoff_s, self.backoff_s * 2**attempt)
    return self._jitter.uniform(delay / 2, delay)

  def _error(self, request: JudgeRequest, message: str) -> JudgeReply:
    self._count("errors")
    key = self._client.api_key  # only the client holds the key; scrub it from what we show
    if isinstance(key, str) and key and key != NO_KEY:
      message = message.replace(key, "***")
    where = f"request {request.request_id!r}: " if request.request_id else ""
    return JudgeReply(None, error=f"{self.name}: {where}{message[:_MAX_ERROR_CHARS]}")

  # ------------------------------------------------------------------------------------------
  # The on-disk cache.
  # ------------------------------------------------------------------------------------------

  def _cache_path(self, key: str) -> pathlib.Path | None:
    return None if self.cache_dir is None else self.cache_dir / key[:2] / f"{key}.json"

  def _cache_read(self, key: str) -> str | None:
    path = self._cache_path(key)
    if path is None or not path.exists():
      return None
    try:
      return json.loads(path.read_text(encoding="utf-8"))["text"]
    except (OSError, ValueError, KeyError, TypeError):
      return None  # an unreadable entry is a miss; the fresh reply overwrites it

  def _cache_write(self, key: str, text: str, request: JudgeRequest) -> None:
    path = self._cache_path(key)
    if path is None:
      return
    entry = {
      "text": text,
      "model": self.model,
      "base_url": self.base_url,
      "request_id": request.request_id,
    }
    try:
      path.parent.mkdir(parents=True, exist_ok=True)
      with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, suffix=".tmp", delete=False, encoding="utf-8"
      ) as f:
        json.dump(entry, f, ensure_ascii=False)
      os.replace(f.name, path)
    except OSError:
      self._count("cache_write_errors")  # the reply is still good; only a rerun pays again
