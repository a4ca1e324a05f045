"""OpenAIJudge against a local chat-completions server that misbehaves on cue.

The server's behaviour is chosen by the user text: "FLAKY ..." answers 500 on its first hit and
normally after, "SLOW" sleeps past the client timeout, "GARBAGE" returns a body that is not
JSON, "DOWN" always answers 500, "BAD" answers 400, "DELAY" sleeps a little (concurrency).
Normal replies echo the text, so each reply can be matched to its request.
"""

from __future__ import annotations

import base64
import collections
import http.server
import json
import threading
import time

import pytest

from lmm_align.judges.base import JudgeRequest
from lmm_align.judges.http import OpenAIJudge, cache_key, chat_messages
from lmm_align.shapes import world as shapes

KEY_ENV = "LMM_ALIGN_TEST_JUDGE_KEY"
SECRET = "sk-test-6f1c0ffee-do-not-leak"
CLIENT_TIMEOUT_S = 0.3


class _Handler(http.server.BaseHTTPRequestHandler):
  def log_message(self, *args):  # keep pytest output clean
    pass

  def _send(self, status: int, body: bytes) -> None:
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def do_POST(self):
    state = self.server.state
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    content = body["messages"][-1]["content"]
    text = (
      content
      if isinstance(content, str)
      else next(p["text"] for p in content if p["type"] == "text")
    )
    mode = text.split()[0] if text else ""
    with state["lock"]:
      state["hits"][mode] += 1
      hits = state["hits"][mode]
      state["bodies"].append(body)
      state["auth"].add(self.headers.get("Authorization"))
      state["in_flight"] += 1
      state["peak"] = max(state["peak"], state["in_flight"])
    try:
      if mode == "SLOW":
        time.sleep(1.0)
      if mode == "DELAY":
        time.sleep(0.15)
      if mode == "DOWN" or (mode == "FLAKY" and hits == 1):
        return self._send(500, b'{"error": {"message": "server exploded"}}')
      if mode == "BAD":
        return self._send(400, json.dumps({"error": {"message": f"bad key {SECRET}"}}).encode())
      if mode == "GARBAGE":
        return self._send(200, b"<html>not json {")
      message = {"role": "assistant", "content": f"echo: {text}"}
      reply = {"id": "1", "object": "chat.completion", "created": 0, "model": body["model"],
               "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}  # fmt: skip
      self._send(200, json.dumps(reply).encode())
    finally:
      with state["lock"]:
        state["in_flight"] -= 1


@pytest.fixture
def server():
  srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
  srv.daemon_threads = True
  srv.state = {"lock": threading.Lock(), "hits": collections.Counter(), "bodies": [], "auth": set(),
               "in_flight": 0, "peak": 0}  # fmt: skip
  thread = threading.Thread(target=srv.serve_forever, daemon=True)
  thread.start()
  yield srv
  srv.shutdown()
  srv.server_close()


def _judge(server, tmp_path, monkeypatch, **overrides):
  monkeypatch.setenv(KEY_ENV, SECRET)
  kwargs = dict(api_key_env=KEY_ENV, timeout_s=CLIENT_TIMEOUT_S, max_retries=2, backoff_s=0.01,
                max_backoff_s=0.02, max_concurrency=4, cache_dir=tmp_path / "cache")  # fmt: skip
  kwargs.update(overrides)
  return OpenAIJudge(f"http://127.0.0.1:{server.server_address[1]}/v1", "judge-model", **kwargs)


def test_retries_errors_and_cache(server, tmp_path, monkeypatch):
  judge = _judge(server, tmp_path, monkeypatch)
  prompts = ["OK one", "FLAKY two", "SLOW three", "GARBAGE four", "DOWN five", "BAD six"]
  requests = [JudgeRequest(p, request_id=f"r{i}") for i, p in enumerate(prompts)]
  replies = judge.complete(requests)

  assert [r.text for r in replies[:2]] == ["echo: OK one", "echo: FLAKY two"]
  assert all(not r.ok for r in replies[2:])
  hits = server.state["hits"]
  # One attempt each for OK; 500 then OK for FLAKY; 1 + max_retries for the retryable failures;
  # a 400 is not retried.
  assert dict(hits) == {"OK": 1, "FLAKY": 2, "SLOW": 3, "GARBAGE": 3, "DOWN": 3, "BAD": 1}
  assert judge.counts["errors"] == 4 and judge.counts["requests"] == 6
  assert judge.counts["calls"] == sum(hits.values()) and judge.counts["retries"] == 1 + 3 * 2
  assert "r2" in replies[2].error and "Timeout" in replies[2].error
  assert "3 attempts failed" in replies[3].error
  assert "InternalServerError" in replies[4].error
  assert "BadRequestError" in replies[5].error and SECRET not in replies[5].error
  assert "bad key ***" in replies[5].error  # the server echoed the key; it was scrubbed
  assert server.state["auth"] == {f"Bearer {SECRET}"}  # the key is sent, as a header only
  assert all(body["temperature"] == 0.0 for body in server.state["bodies"])

  # A rerun (a fresh judge, as after a restart) is served from disk for the successes and
  # retries only the failures.
  rerun = _judge(server, tmp_path, monkeypatch)
  hits.clear()
  again = rerun.complete(requests[:2])
  assert [r.text for r in again] == ["echo: OK one", "echo: FLAKY two"]
  assert sum(hits.values()) == 0 and rerun.counts["cache_hits"] == 2
  rerun.complete(requests[4:5])
  assert hits["DOWN"] == 3

  files = list((tmp_path / "cache").rglob("*"))
  entries = [f for f in files if f.is_file()]
  assert len(entries) == 2 and all(f.suffix == ".json" for f in entries)  # no temp files left
  for f in entries:
    assert SECRET not in f.read_text()
    assert f.stem == f.parent.name + f.stem[2:]  # cache_dir/<key[:2]>/<key>.json


def test_images_go_as_data_urls_and_the_key_changes_with_sampling(server, tmp_path, monkeypatch):
  world = shapes.ShapesWorldConfig(image_size=32)
  image = shapes.render(shapes.make_scenes(1, world, seed=0)[0], 32)
  path = tmp_path / "scene.png"
  image.save(path)
  judge = _judge(server, tmp_path, monkeypatch, cache_dir=None)
  request = JudgeRequest("<image>\nOK describe", image=str(path), system="Be strict.")
  (reply,) = judge.complete([request])
  assert reply.text == "echo: OK describe"
  messages = server.state["bodies"][-1]["messages"]
  assert messages[0] == {"role": "system", "content": "Be strict."}
  image_part, text_part = messages[1]["content"]
  assert text_part == {"type": "text", "text": "OK describe"}
  url = image_part["image_url"]["url"]
  assert url.startswith("data:image/png;base64,")
  assert base64.b64decode(url.split(",", 1)[1]) == path.read_bytes()

  messages = chat_messages(request)
  base = cache_key("u", "m", messages, {"temperature": 0.0, "max_tokens": 8})
  assert base == cache_key("u", "m", messages, {"max_tokens": 8, "temperature": 0.0})
  assert base != cache_key("u", "m", messages, {"temperature": 0.7, "max_tokens": 8})
  assert base != cache_key("u", "other", messages, {"temperature": 0.0, "max_tokens": 8})

  missing = judge.complete(
    [JudgeRequest("OK x", image=str(tmp_path / "nope.png"), request_id="q9")]
  )[0]
  assert not missing.ok and "q9" in missing.error and "cannot read image" in missing.error


def test_concurrency_limit(server, tmp_path, monkeypatch):
  judge = _judge(server, tmp_path, monkeypatch, max_concurrency=2, cache_dir=None)
  replies = judge.complete([JudgeRequest(f"DELAY {i}") for i in range(5)])
  assert [r.text for r in replies] == [f"echo: DELAY {i}" for i in range(5)]  # in order
  assert server.state["peak"] == 2


def test_key_is_read_from_the_named_variable_and_never_shown(tmp_path, monkeypatch):
  monkeypatch.delenv(KEY_ENV, raising=False)
  with pytest.raises(ValueError, match=KEY_ENV):
    OpenAIJudge("http://127.0.0.1:9/v1", "m", api_key_env=KEY_ENV)
  monkeypatch.setenv(KEY_ENV, SECRET)
  judge = OpenAIJudge("http://127.0.0.1:9/v1", "m", api_key_env=KEY_ENV)
  assert SECRET not in repr(judge) and SECRET not in json.dumps(judge.__dict__, default=str)
