"""The trainers read through the registry: DPO on a tiny RLAIF-V-Dataset parquet (with its `logps`
column the cached reference log-probs reach the step), the RLAIF-V loop's prompts from any source."""

from __future__ import annotations

import io
import json
import math
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from configs.shapes import dpo as shapes_dpo
from lmm_align import main
from lmm_align.trainers import dpo

N = 8  # pairs; one global batch of all of them (one row per fake device)


def png_bytes(seed: int) -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, "PNG")
  return buffer.getvalue()


def write_rlaifv(path: pathlib.Path, logps: list[list] | None) -> str:
  image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
  columns = {
    "ds_name": pa.array(["RLAIF-V"] * N),
    "image": pa.array([{"bytes": png_bytes(i), "path": None} for i in range(N)], image_type),
    "question": pa.array(["Describe the image."] * N),
    "chosen": pa.array([f"A red circle {i}." for i in range(N)]),
    "rejected": pa.array([f"A blue star {i}." for i in range(N)]),
    "origin_dataset": pa.array(["MSCOCO"] * N),
    "origin_split": pa.array(["{}"] * N),
    "idx": pa.array([str(i) for i in range(N)]),
    "image_path": pa.array([f"{i}.jpg" for i in range(N)]),
  }
  if logps is not None:
    columns["logps"] = pa.array([json.dumps(x) for x in logps])
  pq.write_table(pa.table(columns), path, row_group_size=3)
  return str(path)


def config_for(policy, parquet: str, **overrides):
  config = shapes_dpo.get_config("runlocal")
  config.init_from = str(policy)
  config.eval.enabled = False
  config.total_steps = 1
  config.checkpoint_every = 1
  config.batch_size = N
  config.optim.warmup_steps = 0
  config.data.source = "rlaifv_parquet"
  config.data.path = parquet
  return main.apply_overrides(config, overrides)


def first_metrics(workdir: pathlib.Path) -> dict:
  return json.loads((workdir / "metrics.jsonl").read_text().splitlines()[0])


def test_rlaifv_parquet_dpo_uses_the_cached_reference_logps(tmp_path, shapes_sft_policy, capsys):
  # [win_logp, win_avg_logp, win_per_token_logp, rej_logp, rej_avg_logp, rej_per_token_logp]
  cached = [[-30.0 - i, -3.0 - i, [], -50.0 - i, -5.0, []] for i in range(N)]
  parquet = write_rlaifv(tmp_path / "RLAIF-V-Dataset-withlogp_000-8.parquet", cached)
  config = config_for(shapes_sft_policy, parquet)
  dpo.train(config, str(tmp_path / "cached"))
  assert "reference log-probs from the data" in capsys.readouterr().out
  got = first_metrics(tmp_path / "cached")
  assert got["logps/ref_chosen"] == pytest.approx(np.mean([c[0] for c in cached]))
  assert got["logps/ref_rejected"] == pytest.approx(np.mean([c[3] for c in cached]))
  # The step's rewards are the policy's log-probs against those cached ones.
  beta = config.dpo.beta
  want = beta * ((got["logps/chosen"] - got["logps/ref_chosen"])
                 - (got["logps/rejected"] - got["logps/ref_rejected"]))  # fmt: skip
  assert got["rewards/margin"] == pytest.approx(want, rel=1e-4, abs=1e-4)
  assert got["loss"] != pytest.approx(math.log(2), abs=1e-3)  # not the policy as reference

  # With dpo.average_logps the averaged column is the reference; a pair without: none at all.
  averaged = main.apply_overrides(config, {"dpo.average_logps": True})
  records, _ = dpo.preference_records(averaged)
  assert [r["ref_logps"] for r in records[:2]] == [[-3.0, -5.0], [-4.0, -5.0]]
  no_logps = config_for(shapes_sft_policy, write_rlaifv(tmp_path / "plain.parquet", None))
  records, _ = dpo.preference_records(no_logps)
  assert all("ref_logps" not in r for r in records)


def test_the_loop_draws_its_prompts_from_an_rlaifv_jsonl(tmp_path):
  from configs.shapes import iterative_dpo
  from lmm_align.feedback import candidates
  from lmm_align.trainers import iterative

  (tmp_path / "imgs").mkdir()
  lines = []
  for i in range(5):
    (tmp_path / "imgs" / f"{i}.png").write_bytes(png_bytes(i))
    lines.append({"ds_question_id": f"q{i}", "image_path": f"./imgs/{i}.png",
                  "question": f"Describe picture {i}.", "metainfos": {"reference": ""}})  # fmt: skip
  (tmp_path / "input.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  config = iterative_dpo.get_config("runlocal")
  config.prompts.update(
    source="rlaifv_jsonl", path=str(tmp_path / "input.jsonl"), image_folder="", on_error="raise",
    num_per_round=3,
  )  # fmt: skip
  for round_index in (1, 2):
    out = tmp_path / f"round_{round_index}" / "prompts"
    out.mkdir(parents=True)
    iterative.write_prompts(config, round_index, out)
    prompts = candidates.read_prompts(out / "prompts.jsonl")
    # Each round draws its own prompts, seeded by (prompts.seed, round), as RLAIF-V does.
    order = np.random.default_rng([config.prompts.seed, round_index]).permutation(5)[:3]
    assert [p.id for p in prompts] == [f"q{i}" for i in order]
    for p, i in zip(prompts, order):
      assert p.question == f"Describe picture {i}."
      image = iterative._image_loader(out)(p.image)  # as the candidate stage loads it
      np.testing.assert_array_equal(
        np.asarray(image), np.asarray(Image.open(io.BytesIO(png_bytes(int(i)))))
      )
  # Ground-truth feedback needs scenes: refused before the loop starts (check_config).
  config.feedback.kind, config.init_from = "ground_truth", "/policy"
  with pytest.raises(
    ValueError, match="feedback.kind='ground_truth'.*prompts.source='rlaifv_jsonl'"
  ):
    iterative.check_config(config)
