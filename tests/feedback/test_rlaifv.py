"""RLAIF-V scoring and pairing against hand-computed examples (a fake labeler with fixed
probabilities), the length-balancing filter against a plain re-implementation of the
published rule, and a resumable labelling run."""

from __future__ import annotations

import numpy as np
import pytest

from lmm_align.data.jsonl import read_jsonl
from lmm_align.feedback import claims, rlaifv
from lmm_align.feedback.labeler import YesNoScores

# (p_yes, p_no) per question; ties (cross) count as rejections.
PROBS = {
  "Is there a red circle?": (0.9, 0.05),
  "Is there a blue square?": (0.6, 0.3),
  "Is there a green star?": (0.2, 0.7),
  "Is there a yellow cross?": (0.4, 0.4),
  "Is there a purple diamond?": (0.1, 0.8),
  "Is the circle red?": (0.7, 0.2),
  "Is the circle blue?": (0.3, 0.6),
}


class FakeLabeler:
  def __init__(self):
    self.calls = []

  def score(self, questions, images):
    self.calls.append((list(questions), list(images)))
    return YesNoScores(
      np.asarray([PROBS[q][0] for q in questions], np.float32),
      np.asarray([PROBS[q][1] for q in questions], np.float32),
    )


def _candidate(prompt_id, k, response, question="Describe the image.", image="img.png"):
  return {"id": f"{prompt_id}#{k}", "prompt_id": prompt_id, "question": question,
          "image": image, "sample_index": k, "response": response}  # fmt: skip


CANDIDATES = [
  _candidate("pA", 0, "There is a red circle and a blue square."),  # 0 rejected -> 0
  _candidate("pA", 1, "There is a red circle and a green star."),  # 1 rejected -> -1
  _candidate("pA", 2, "There is a yellow cross, a green star and a purple diamond."),  # -3
  _candidate("pA", 3, "Yes."),  # no claims: never paired
  _candidate("pB", 0, "The circle is red.", "What colour is the circle?", "other.png"),  # 0
  _candidate("pB", 1, "The circle is blue.", "What colour is the circle?", "other.png"),  # -1
]


class _Loader:
  def __init__(self):
    self.loaded = []

  def __call__(self, ref):
    self.loaded.append(ref)
    return f"<image {ref}>"


def _label(path, candidates=CANDIDATES, labeler=None, splitter=None, **kwargs):
  return rlaifv.label_candidates(
      candidates, splitter or claims.RuleClaimSplitter(), claims.RuleQuestionMaker(),
      labeler or FakeLabeler(), path, load_image=kwargs.pop("load_image", _Loader()), **kwargs,
  )  # fmt: skip


def test_scores_by_hand(tmp_path):
  labeler, loader = FakeLabeler(), _Loader()
  records = _label(tmp_path / "l.jsonl", labeler=labeler, load_image=loader)
  assert [r["score"] for r in records] == [0, -1, -3, None, 0, -1]
  assert [r["status"] for r in records] == ["ok", "ok", "ok", "no_claims", "ok", "ok"]
  r2 = records[2]
  assert r2["claims"] == [
    "There is a yellow cross.",
    "There is a green star.",
    "There is a purple diamond.",
  ]
  assert r2["questions"] == [
    "Is there a yellow cross?",
    "Is there a green star?",
    "Is there a purple diamond?",
  ]
  np.testing.assert_allclose(r2["p_yes"], [0.4, 0.2, 0.1], rtol=1e-6)
  assert r2["claim_rejected"] == [True, True, True] and r2["num_judged"] == r2["num_claims"] == 3
  assert records[0]["claim_rejected"] == [False, False]
  # One labeler batch for the chunk; each image loaded once and handed to its questions.
  assert len(labeler.calls) == 1 and sorted(loader.loaded) == ["img.png", "other.png"]
  questions, images = labeler.calls[0]
  assert (
    len(questions) == 9 and images[-1] == "<image other.png>" and images[0] == "<image img.png>"
  )
  assert rlaifv.response_score([0.5, 0.2], [0.5, 0.1]) == -1
  # A margin of 1 rejects a claim only when P(no) >= e * P(yes): the tie (cross, 0.4 / 0.4)
  # and "blue" (0.3 / 0.6, a ratio of 2) now pass; star (3.5) and diamond (8) are still out.
  margin = _label(tmp_path / "m.jsonl", reject_margin=1.0)
  assert [r["score"] for r in margin] == [0, -1, -2, None, 0, 0]
  assert margin[2]["claim_rejected"] == [False, True, True]
  assert rlaifv.claim_rejected([0.25], [0.25 * np.e * 1.0001], margin=1.0) == [True]


def test_pairs_by_hand(tmp_path):
  labelled = _label(tmp_path / "l.jsonl")
  pairs, stats = rlaifv.build_preference_pairs(
    labelled, pairs_per_prompt=None, balance_lengths=False
  )
  texts = {c["id"]: c["response"] for c in CANDIDATES}
  expected = [("pA#0", "pA#1", 0, -1), ("pA#0", "pA#2", 0, -3), ("pA#1", "pA#2", -1, -3),
              ("pB#0", "pB#1", 0, -1)]  # fmt: skip
  assert pairs == [
    {
      "id": f"{c}|{r}",
      "image": "img.png" if c.startswith("pA") else "other.png",
      "question": "Describe the image." if c.startswith("pA") else "What colour is the circle?",
      "chosen": texts[c],
      "rejected": texts[r],
      "chosen_score": cs,
      "rejected_score": rs,
    }
    for c, r, cs, rs in expected
  ]
  assert stats["responses_unscored"] == 1 and stats["pairs"] == 4 and stats["prompts"] == 2
  # A gap of 2 or more keeps only the pairs at least that far apart.
  far, _ = rlaifv.build_preference_pairs(labelled, min_score_gap=2, balance_lengths=False)
  assert [p["id"] for p in far] == ["pA#0|pA#2", "pA#1|pA#2"]


def _labelled(pid, k, response, score, claims_n=1, judged=None):
  return {"id": f"{pid}#{k}", "prompt_id": pid, "question": "Q?", "image": None,
          "response": response, "score": score, "status": "ok", "num_claims": claims_n,
          "num_judged": claims_n if judged is None else judged}  # fmt: skip


def test_mismatched_identical_and_empty_pairs_are_dropped():
  labelled = [
    _labelled("p", 0, "A red circle.", 0),
    _labelled("p", 1, "A blue circle.", -1, claims_n=2, judged=1),  # a repeated question
    _labelled("p", 2, " A red circle. ", -2),  # the same text as p#0
    _labelled("p", 3, "   ", -3),
    _labelled("p", 4, "A green star.", -1),
  ]
  pairs, stats = rlaifv.build_preference_pairs(
    labelled, pairs_per_prompt=None, balance_lengths=False
  )
  assert [p["id"] for p in pairs] == ["p#0|p#4", "p#4|p#2"]
  # (0,1) (1,2) (1,3) mismatch; (1,4) equal scores; (0,2) identical; (0,3) (2,3) (3,4) empty.
  assert stats["pairs_claim_count_mismatch"] == 3 and stats["pairs_small_gap"] == 1
  assert stats["pairs_identical"] == 1 and stats["pairs_empty_response"] == 3


def test_pairs_per_prompt_are_a_seeded_sample():
  labelled = [_labelled("p", k, f"answer number {k}", -k) for k in range(5)]
  labelled += [_labelled("q", k, f"other answer {k}", -k) for k in range(2)]
  everything, _ = rlaifv.build_preference_pairs(
    labelled, pairs_per_prompt=None, balance_lengths=False
  )
  assert len(everything) == 11
  picks = []
  for seed in range(8):
    pairs, stats = rlaifv.build_preference_pairs(labelled, seed=seed, balance_lengths=False)
    again, _ = rlaifv.build_preference_pairs(labelled, seed=seed, balance_lengths=False)
    assert pairs == again and stats["pairs_over_cap"] == 8
    ids = [p["id"] for p in pairs]
    assert len(ids) == 3 and ids[-1] == "q#0|q#1"
    p_ids = [i for i in [p["id"] for p in everything] if i in ids[:2]]
    assert p_ids == ids[:2]  # a subset, in pairing order
    picks.append(tuple(ids))
  assert len(set(picks)) > 1


def published_length_filter(pairs):
  """The published rule, written out plainly: (kept ids, ratio). Ratios keeping nothing are
  skipped (the published script divides by zero there)."""
  results = []
  for ratio in np.arange(0, 1, 0.02):
    remain = []
    for p in pairs:
      ch, rej = len(p["chosen"].split()), len(p["rejected"].split())
      if (rej - ch) / float(rej) > ratio or p["chosen"].strip() == p["rejected"].strip():
        continue
      remain.append(p)
    if not remain:
      continue
    win = sum(len(p["chosen"].split()) for p in remain) / len(remain)
    lose = sum(len(p["rejected"].split()) for p in remain) / len(remain)
    results.append((abs(win - lose) / lose, ratio, [p["id"] for p in remain]))
  best = min(results, key=lambda r: r[0])  # min keeps the first of equal values, as idxmin
  return best[2], best[1]


def _pair(pid, chosen_words, rejected_words, same=False):
  chosen = " ".join(["w"] * chosen_words)
  rejected = chosen + "  " if same else " ".join(["v"] * rejected_words)
  return {"id": pid, "chosen": chosen, "rejected": rejected}


def test_length_filter_handmade():
  pairs = [_pair("p1", 10, 20), _pair("p2", 18, 20), _pair("p3", 25, 20), _pair("p4", 5, 30),
           _pair("p5", 30, 31), _pair("p6", 12, 12, same=True)]  # fmt: skip
  kept, ratio = rlaifv.length_balance_filter(pairs)
  # r = 0 keeps p3 (gap 5/20); near 0.1 p2, p3, p5 (gap 2/71); 0.5 adds p1 (8/91).
  assert [p["id"] for p in kept] == ["p2", "p3", "p5"] and 0.09 < ratio < 0.13
  assert ([p["id"] for p in kept], ratio) == published_length_filter(pairs)
  assert rlaifv.length_balance_filter([]) == ([], None)
  assert rlaifv.length_balance_filter([_pair("s", 3, 3, same=True)]) == ([], None)


@pytest.mark.parametrize("seed", range(6))
def test_length_filter_matches_published_rule(seed):
  rng = np.random.default_rng(seed)
  pairs = [_pair(f"p{i}", *rng.integers(1, 60, size=2)) for i in range(int(rng.integers(2, 40)))]
  kept, ratio = rlaifv.length_balance_filter(pairs)
  assert ([p["id"] for p in kept], ratio) == published_length_filter(pairs)


def test_failed_split_is_recorded_and_not_paired(tmp_path):
  class HalfSplitter:
    def split(self, items):
      return [None if "green" in r else claims.split_claims_rules(r) for _, r in items]

  records = _label(tmp_path / "l.jsonl", splitter=HalfSplitter())
  assert [r["status"] for r in records][:3] == ["ok", "split_failed", "split_failed"]
  assert records[1]["score"] is None and records[1]["claims"] is None
  pairs, _ = rlaifv.build_preference_pairs(records, pairs_per_prompt=None, balance_lengths=False)
  assert [p["id"] for p in pairs] == ["pB#0|pB#1"]


def test_labelling_resumes_where_it_stopped(tmp_path):
  path = tmp_path / "l.jsonl"
  full = _label(tmp_path / "full.jsonl", prompts_per_chunk=1)
  lines = (tmp_path / "full.jsonl").read_text().splitlines()
  path.write_text("\n".join(lines[:5]) + "\n" + lines[5][:30])  # pA done, pB cut short
  labeler = FakeLabeler()
  assert _label(path, labeler=labeler, prompts_per_chunk=1) == full
  assert [q for q, _ in labeler.calls] == [["Is the circle red?", "Is the circle blue?"]]
  assert read_jsonl(path) == full
  labeler = FakeLabeler()
  _label(path, labeler=labeler)
  assert labeler.calls == []


def test_pairs_file(tmp_path):
  import json

  pairs, _ = rlaifv.build_preference_pairs(_label(tmp_path / "l.jsonl"))
  rlaifv.write_preference_pairs(tmp_path / "pairs.jsonl", pairs)
  back = [json.loads(x) for x in (tmp_path / "pairs.jsonl").read_text().splitlines()]
  assert back == pairs and len(pairs) >= 1
  assert all(
    set(p) == {"id", "image", "question", "chosen", "rejected", "chosen_score", "rejected_score"}
    for p in back
  )
