"""Candidate generation: K samples per prompt that a rerun regenerates exactly (whatever the
prompt order), a resume that skips finished prompts and drops a half-written tail, and
prompt / candidate files read with clear errors."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from PIL import Image

from lmm_align.data.images import ImageProcessorConfig
from lmm_align.data.tokenizer import train_bpe_tokenizer
from lmm_align.feedback import candidates
from lmm_align.feedback.candidates import Prompt
from lmm_align.models import get_variant, init_params
from lmm_align.sampling import SamplingSettings

K = 3
SETTINGS = SamplingSettings(temperature=1.0, max_new_tokens=5)
PROMPTS = [
  Prompt("p0", "Describe the image.", "img_a"),
  Prompt("p1", "What is in the picture?", "img_b"),
  Prompt("p2", "Say something.", None),
]


@pytest.fixture(scope="module")
def setup():
  tokenizer = train_bpe_tokenizer(["Describe the image. What is in the picture?"] * 4, 300)
  config = get_variant("tiny")
  params = init_params(config, jax.random.key(1))
  rs = np.random.RandomState(0)
  pictures = {n: Image.fromarray(rs.randint(0, 255, (32, 32, 3), np.uint8)) for n in ("img_a", "img_b")}  # fmt: skip
  return config, params, tokenizer, ImageProcessorConfig(size=32, crop_size=32), pictures


def _generate(setup, path, prompts=PROMPTS, seed=0):
  config, params, tokenizer, image_config, pictures = setup
  return candidates.generate_candidates(
      config, params, tokenizer, image_config, prompts, path, num_samples=K, settings=SETTINGS,
      seed=seed, template="vicuna_v1", load_image=pictures.__getitem__,
  )  # fmt: skip


@pytest.fixture(scope="module")
def first_run(setup, tmp_path_factory):
  path = tmp_path_factory.mktemp("run") / "candidates.jsonl"
  return path, _generate(setup, path)


def test_records_and_round_trip(first_run):
  path, records = first_run
  assert [r["id"] for r in records] == [f"{p.id}#{k}" for p in PROMPTS for k in range(K)]
  for r, (p, k) in zip(records, [(p, k) for p in PROMPTS for k in range(K)]):
    assert (r["prompt_id"], r["question"], r["image"], r["sample_index"]) == (
      p.id,
      p.question,
      p.image,
      k,
    )
    assert 0 <= r["num_tokens"] <= SETTINGS.max_new_tokens and r["seed"] == 0
    assert r["num_tokens"] == SETTINGS.max_new_tokens or r["stopped"]
  assert records[0]["sampling"] == {
    "temperature": 1.0, "top_k": 0, "top_p": 1.0, "max_new_tokens": 5, "stop_token_ids": [2],
  }  # fmt: skip
  assert candidates.read_candidates(path) == records
  # Deconfounded: one prompt's samples differ only by their noise, and they do differ.
  assert len({r["response"] for r in records[:K]}) > 1


def test_rerun_in_another_order_regenerates_the_same_candidates(setup, first_run, tmp_path):
  _, records = first_run
  again = _generate(setup, tmp_path / "again.jsonl", prompts=PROMPTS[::-1])
  assert sorted(again, key=lambda r: r["id"]) == sorted(records, key=lambda r: r["id"])
  other_seed = _generate(setup, tmp_path / "seed1.jsonl", prompts=PROMPTS[:1], seed=1)
  assert [r["response"] for r in other_seed] != [r["response"] for r in records[:K]]


def test_resume_skips_done_prompts_and_drops_a_cut_tail(setup, first_run, tmp_path, monkeypatch):
  path, records = first_run
  lines = path.read_text().splitlines()
  partial = tmp_path / "partial.jsonl"
  # p0 complete, two of p1's three samples, then half a line (a kill mid-write).
  partial.write_text("\n".join(lines[: K + 2]) + "\n" + lines[K + 2][:25])
  sampled = []
  real = candidates._sample_prompt
  monkeypatch.setattr(
    candidates, "_sample_prompt", lambda *a, **k: sampled.append(a[4].id) or real(*a, **k)
  )
  resumed = _generate(setup, partial)
  assert sampled == ["p1", "p2"]
  assert resumed == records
  assert sorted(candidates.read_candidates(partial), key=lambda r: r["id"]) == sorted(
    records, key=lambda r: r["id"]
  )
  sampled.clear()
  _generate(setup, partial)
  assert sampled == []


def test_resume_refuses_another_run(setup, first_run, tmp_path):
  path, _ = first_run
  copy = tmp_path / "copy.jsonl"
  copy.write_text(path.read_text())
  with pytest.raises(ValueError, match="seed 0 .* not seed 5"):
    _generate(setup, copy, seed=5)
  changed = [Prompt("p0", "Another question?", "img_a")]
  with pytest.raises(ValueError, match="another question or image"):
    _generate(setup, copy, prompts=changed)


def test_read_prompts(tmp_path):
  path = tmp_path / "prompts.jsonl"
  rows = [
    {"id": "a", "question": "Describe.", "image": "x.jpg"},
    {"ds_question_id": 7, "image_path": "y.jpg", "question": "What?", "metainfos": {}},
    {"id": "t", "question": "Text only.", "image": None},
  ]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert candidates.read_prompts(path) == [
    Prompt("a", "Describe.", "x.jpg"),
    Prompt("7", "What?", "y.jpg"),
    Prompt("t", "Text only.", None),
  ]
  path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"id": "b", "question": " "}) + "\n")
  with pytest.raises(ValueError, match=r"prompts.jsonl: line 2 \(id 'b'\): field 'question'"):
    candidates.read_prompts(path)
  path.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[0]) + "\n")
  with pytest.raises(ValueError, match="line 2: id 'a' repeats line 1"):
    candidates.read_prompts(path)


def test_read_published_pipeline_input(shared_reference_data):
  path = shared_reference_data / "rlaifv_examples" / "detail_test_30_input.jsonl"
  prompts = candidates.read_prompts(path)
  raw = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  assert len(prompts) == len(raw) > 0
  assert [p.id for p in prompts] == [r["ds_question_id"] for r in raw]
  assert [p.image for p in prompts] == [r["image_path"] for r in raw]


def test_read_candidates_names_the_bad_field(first_run, tmp_path):
  path, records = first_run
  bad = tmp_path / "bad.jsonl"
  broken = dict(records[1], num_tokens="three")
  bad.write_text(json.dumps(records[0]) + "\n" + json.dumps(broken) + "\n")
  with pytest.raises(ValueError, match=r"bad.jsonl: line 2 \(id 'p0#1'\): field 'num_tokens'"):
    candidates.read_candidates(bad)
  bad.write_text("{not json}\n" + json.dumps(records[0]) + "\n")
  with pytest.raises(ValueError, match="bad.jsonl: line 1: not valid JSON"):
    candidates.read_candidates(bad)
