"""The loop's model-sharded sampling and labeling across processes (issue #23): two local
processes with 4 CPU devices each, joined by jax.distributed on 127.0.0.1, load a tiny LLaVA
folder onto a mesh over the 8 global devices, sample and score yes/no questions, and both get
exactly what one process gets on one device."""

from __future__ import annotations

import json
import sys

import local_ranks
import multiprocess_sampling_worker as worker
import numpy as np


def test_two_processes_sample_and_label_as_one_device(tmp_path):
  folder = worker.write_tiny_llava(tmp_path / "llava")
  procs = local_ranks.start(
    lambda rank: [sys.executable, worker.__file__, str(folder), str(tmp_path / f"{rank}.json")],
    tmp_path,
  )
  try:
    # The single-process reference on one device while the two processes run.
    reference = worker.sample_and_score(str(folder), None)
    local_ranks.finish(procs, timeout=300)
  finally:
    local_ranks.kill(procs)
  results = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
  assert [r.pop("process_index") for r in results] == [0, 1]

  for result in results:
    assert result.keys() == worker.MESHES.keys()
    for sizes, got in result.items():
      for name in worker.MESHES[sizes]:
        tokens = np.asarray(got[f"{name}_tokens"])
        assert tokens.shape == (3, 6), (sizes, name)
        np.testing.assert_array_equal(tokens, reference[f"{name}_tokens"], err_msg=sizes)
        np.testing.assert_array_equal(got[f"{name}_lengths"], reference[f"{name}_lengths"])
        np.testing.assert_allclose(
          got[f"{name}_logprobs"], reference[f"{name}_logprobs"], rtol=1e-5, atol=1e-6,
          err_msg=f"{sizes} {name}",
        )  # fmt: skip
      for p in ("p_yes", "p_no"):
        assert len(got[p]) == 5
        np.testing.assert_allclose(got[p], reference[p], rtol=1e-5, atol=1e-9, err_msg=sizes)
  # The reference is not degenerate: row limits hold, the questions are told apart, and the
  # sampled tokens differ from the greedy ones.
  assert reference["greedy_lengths"] == [6, 4, 6]
  assert reference["greedy_tokens"] != reference["sampled_tokens"]
  assert not np.allclose(reference["p_yes"][0], reference["p_yes"][1])
