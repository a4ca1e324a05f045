"""Iterative DPO: the loop end to end (2 rounds, ground-truth feedback, a tiny policy), a kill
and resume that must reproduce the uninterrupted run, and each feedback/pairing piece against
hand-computed values (scripted critic, fixed labeler probabilities, hand-built scenes)."""

from __future__ import annotations

import json
import math
import pathlib
import re

import numpy as np
import pytest

from configs.shapes import iterative_dpo as shapes_iterative_dpo
from lmm_align.feedback import rlaifv
from lmm_align.judges.base import FunctionJudge
from lmm_align.shapes import loop_feedback
from lmm_align.shapes import world as shapes
from lmm_align.shapes.data import scene_facts
from lmm_align.trainers import iterative


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> pathlib.Path:
  """A runlocal SFT policy trained long enough (40 steps) to describe scenes in shapes words,
  so sampled descriptions mention objects and ground-truth feedback can rank them."""
  from configs.shapes import sft as shapes_sft
  from lmm_align.trainers import export, sft

  root = tmp_path_factory.mktemp("policy")
  config = shapes_sft.get_config("runlocal")
  config.eval.enabled = False
  config.total_steps, config.checkpoint_every, config.optim.lr = 40, 40, 3e-3
  sft.train(config, str(root / "run"))
  export.export_workdir(str(root / "run"), str(root / "hf"))
  return root / "hf"


def _config(policy_dir: pathlib.Path):
  config = shapes_iterative_dpo.get_config("feedback=ground_truth,runlocal")
  config.init_from = str(policy_dir)
  # Pure DPO, so that the loss is exactly log 2 while policy == reference (the default's SFT
  # term adds the chosen answers' NLL, which two steps at lr 1e-3 on 12 pairs do not lower).
  config.train.dpo.sft_weight = 0.0
  # Precision-only scores, so that the hallucination-count diagnostic agrees with every pair.
  config.feedback.recall_weight = 0.0
  return config


class Interrupt(Exception):
  pass


def _interrupt_after(round_index: int, stage: str):
  def hook(r: int, name: str) -> None:
    if (r, name) == (round_index, stage):
      raise Interrupt(f"killed after round {r} {name}")

  return hook


def _without_workdir(summary: dict, workdir: pathlib.Path) -> str:
  return json.dumps(summary, sort_keys=True).replace(str(workdir), "WORKDIR")


@pytest.fixture(scope="module")
def uninterrupted(policy, tmp_path_factory) -> pathlib.Path:
  workdir = tmp_path_factory.mktemp("uninterrupted")
  iterative.run(_config(policy), str(workdir))
  return workdir


def test_loop_writes_round_summaries_and_the_workdir_summary(uninterrupted, policy):
  summary = json.loads((uninterrupted / "summary.json").read_text())
  assert summary["feedback"] == "ground_truth"
  assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
  assert summary["rounds"][0]["policy"] == str(policy)
  for row in summary["rounds"]:
    assert 0.0 <= row["hallucination_rate"] <= 1.0 and 0.0 <= row["object_recall"] <= 1.0
    # The extra answers are the ones evaluate_shapes scored: rate = refined rate x mention rate.
    assert row["hallucination_rate"] == pytest.approx(row["chair_s_refine"] * row["mention_rate"])
  for r in (1, 2):
    round_dir = uninterrupted / f"round_{r}"
    for stage in ("prompts", "candidates", "feedback", "pairs", "dpo", "export", "eval"):
      assert (round_dir / stage / "done").exists(), (r, stage)
    round_summary = json.loads((round_dir / "summary.json").read_text())
    assert round_summary["candidates"] == 12 * 4
    assert round_summary["started_from"] == (
      str(policy) if r == 1 else str(uninterrupted / "round_1" / "export")
    )
    assert round_summary["dpo"]["final_step"] == 2
    # The reference is the round's starting policy: at step 1 policy == reference, loss log 2.
    first_step = json.loads((round_dir / "dpo" / "metrics.jsonl").read_text().splitlines()[0])
    assert first_step["loss"] == pytest.approx(math.log(2), abs=1e-5)
    # Step 1 moved the policy off its reference (two steps on 12 pairs need not lower it).
    assert abs(round_summary["dpo"]["final_train_loss"] - math.log(2)) > 1e-4
    assert (
      round_summary["metrics"]["hallucination_rate"] == summary["rounds"][r]["hallucination_rate"]
    )
    pairs = [json.loads(x) for x in (round_dir / "pairs" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == summary["rounds"][r]["pairs"] >= 4
    # The feedback is the ground truth, so the scene agrees with every pair.
    assert round_summary["pairs"]["ground_truth"] == {"correct": len(pairs), "wrong": 0, "tie": 0}
    assert all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    # Each pair carries its scene's facts, for a fact-augmented reward model.
    scenes = {
      json.loads(x)["id"]: shapes.Scene.from_dict(json.loads(x)["scene"])
      for x in (round_dir / "prompts" / "prompts.jsonl").open()
    }  # fmt: skip
    for p in pairs:
      scene = scenes[p["id"].split("#")[0]]
      assert p["facts"] == scene_facts(scene)
  # Each round samples new scenes, and the next policy is the previous round's export.
  ids = [
    {json.loads(x)["id"] for x in (uninterrupted / f"round_{r}/prompts/prompts.jsonl").open()}
    for r in (1, 2)
  ]  # fmt: skip
  assert not ids[0] & ids[1]
  table = iterative.format_rounds_table(summary["rounds"])
  assert table.splitlines()[0].split()[:2] == ["round", "hallucination_rate"]
  assert len(table.splitlines()) == 4


def test_a_killed_run_resumes_to_the_uninterrupted_result(uninterrupted, policy, tmp_path):
  workdir = tmp_path / "killed"
  config = _config(policy)
  with pytest.raises(Interrupt):
    iterative.run(config, str(workdir), after_stage=_interrupt_after(1, "feedback"))
  assert not (workdir / "round_1" / "pairs").exists()
  candidates_done = (workdir / "round_1" / "candidates" / "done").read_text()
  # A second kill, after round 2's DPO and before its export.
  with pytest.raises(Interrupt):
    iterative.run(config, str(workdir), after_stage=_interrupt_after(2, "dpo"))
  assert not (workdir / "round_2" / "export" / "done").exists()
  assert (workdir / "round_1" / "candidates" / "done").read_text() == candidates_done  # not rerun
  resumed = iterative.run(config, str(workdir))
  expected = json.loads((uninterrupted / "summary.json").read_text())
  assert _without_workdir(resumed, workdir) == _without_workdir(expected, uninterrupted)
  for r in (1, 2):
    for name in ("pairs/pairs.jsonl", "candidates/candidates.jsonl", "feedback/labelled.jsonl"):
      path = f"round_{r}/{name}"
      assert (workdir / path).read_text() == (uninterrupted / path).read_text(), path


# --------------------------------------------------------------------------------------------
# Feedback and pairs, piece by piece.
# --------------------------------------------------------------------------------------------

SCENE = shapes.Scene(
  objects=(
    shapes.SceneObject("circle", "red", "large", 0, 0),
    shapes.SceneObject("square", "blue", "small", 1, 1),
  ),
  id="s0",
)


def _candidate(k: int, response: str, prompt_id: str = "s0") -> dict:
  return {"id": f"{prompt_id}#{k}", "prompt_id": prompt_id, "question": "Describe the image.",
          "image": f"images/{prompt_id}.png", "sample_index": k, "response": response}  # fmt: skip


def test_ground_truth_feedback_scores_hallucinations_and_recall():
  candidates = [
    _candidate(0, "There is a red circle and a blue square."),  # both right: 0
    _candidate(1, "There is a green circle and a blue star."),  # wrong colour, absent shape: -2
    _candidate(2, "There is a red circle and no yellow star."),  # the negated star is no claim
    _candidate(3, "A plain picture."),  # no object mentioned: no claims, never paired
  ]
  records = loop_feedback.ground_truth_feedback(candidates, {"s0": SCENE}, recall_weight=0.0)
  assert [r["score"] for r in records] == [0, -2, 0, None]
  assert [r["status"] for r in records] == ["ok", "ok", "ok", "no_claims"]
  assert [r["num_claims"] for r in records] == [2, 2, 1, 0]
  # Valuing recall: + 0.5 per scene object found; saying nothing now scores (0) and loses.
  records = loop_feedback.ground_truth_feedback(candidates, {"s0": SCENE}, recall_weight=0.5)
  assert [r["score"] for r in records] == [1.0, -2.0, 0.5, 0.0]
  assert [r["status"] for r in records] == ["ok"] * 4


def test_correction_feedback_pairs_each_correction_with_its_answer():
  candidates = [
    _candidate(0, "There is a red circle and a blue star."),  # star absent: corrected
    _candidate(1, "There is a red circle and a blue star."),  # the same answer: paired once
    _candidate(2, "A green circle, a green star and a yellow star."),  # 3 wrong: paired first
    _candidate(3, "There is a red circle and a blue square."),  # right: nothing to correct
    _candidate(4, "Two green stars."),  # a plural: out of the rewrite's reach
    _candidate(0, "A blue circle.", "s1"),
  ]
  records = loop_feedback.ground_truth_feedback(
    candidates, {"s0": SCENE, "s1": SCENE}, recall_weight=1.0, corrections=True
  )
  assert [r["hallucinated"] for r in records] == [1, 1, 3, 0, 1, 1]
  assert [r["correction"] for r in records] == [
    "There is a red circle and a blue square.",
    "There is a red circle and a blue square.",
    "A red circle, a blue square and a red circle.",
    None,
    None,
    "A red circle.",  # a colour fix before a shape fix
  ]
  pairs, stats = iterative.correction_pairs(records, per_prompt=2)
  assert [(p["id"], p["chosen"], p["rejected"]) for p in pairs] == [
    ("s0#2|corrected", records[2]["correction"], candidates[2]["response"]),
    ("s0#0|corrected", records[0]["correction"], candidates[0]["response"]),
    ("s1#0|corrected", "A red circle.", "A blue circle."),
  ]
  assert stats["pairs"] == 3 and stats["hallucinating_without_correction"] == 1
  assert stats["duplicates_or_over_limit"] == 1
  one, _ = iterative.correction_pairs(records, per_prompt=1)
  assert [p["id"] for p in one] == ["s0#2|corrected", "s1#0|corrected"]


def test_best_worst_pairs_take_the_first_argmax_and_argmin():
  def labelled(k, score, response, prompt_id="p", status="ok"):
    return {**_candidate(k, response, prompt_id), "score": score, "status": status}

  records = [
    labelled(0, -1.0, "a b"), labelled(1, 2.0, "c d"), labelled(2, 2.0, "e f"),
    labelled(3, -1.0, "g h"), labelled(4, 9.0, "unscored", status="not_judged"),
    labelled(0, 0.5, "same", "q"), labelled(1, 0.5, "same too", "q"),  # no preference
  ]  # fmt: skip
  pairs, stats = iterative.best_worst_pairs(records)
  assert [(p["chosen"], p["rejected"]) for p in pairs] == [("c d", "a b")]
  assert pairs[0]["id"] == "p#1|p#0" and pairs[0]["image"] == "images/p.png"
  assert stats["pairs"] == 1 and stats["prompts"] == 2 and stats["prompts_without_preference"] == 1


def test_ground_truth_agreement_counts_pairs_the_scene_supports():
  pair = lambda chosen, rejected: {"id": "s0#0|s0#1", "chosen": chosen, "rejected": rejected}
  pairs = [
    pair("A red circle.", "A green circle."),  # 0 vs 1 hallucination: correct
    pair("A yellow star.", "A blue square."),  # 1 vs 0: wrong
    pair("A red circle.", "A blue square."),  # 0 vs 0: tie
  ]
  assert loop_feedback.ground_truth_agreement(pairs, {"s0": SCENE}) == {
    "correct": 1, "wrong": 1, "tie": 1,
  }  # fmt: skip


_SHOWN = re.compile(r"The first response: \[(.*)\]\nThe second response: \[(.*)\]")


def _shorter_is_better(request) -> str:
  """A scripted critic: the response with fewer words wins, equal lengths tie."""
  first, second = (len(x.split()) for x in _SHOWN.search(request.prompt).groups())
  verdict = "[first]" if first < second else "[second]" if second < first else None
  return f"Reason.\nThe better response: {verdict}" if verdict else "The two are equally good."


def test_critic_feedback_scores_are_the_ordered_pair_reward_and_resume(tmp_path):
  config = shapes_iterative_dpo.get_config("feedback=critic,runlocal")
  # The critic is asked with the prompt file it was trained with.
  prompt = "Which is better?\nQ: [{question}]\nThe first response: [{first}]\n"
  prompt += "The second response: [{second}]"
  (tmp_path / "prompt.txt").write_text(prompt)
  config.feedback.critic_prompt = str(tmp_path / "prompt.txt")
  asked = []
  judge = FunctionJudge(lambda r: asked.append(r.prompt) or _shorter_is_better(r), name="scripted")
  candidates = [_candidate(0, "a red circle"), _candidate(1, "a red circle and square"),
                _candidate(2, "one two three four five")]  # fmt: skip
  candidates += [_candidate(0, "x y", "s1"), _candidate(1, "x y", "s1")]
  out = tmp_path / "labelled.jsonl"
  records = iterative.critic_feedback(config, candidates, judge, tmp_path, out)
  assert len(asked) == 3 * 2 + 2 and asked[0].startswith("<image>\nWhich is better?\nQ: [")
  # s0: y0 beats both others in both orders: 4 x (+1/2); y1 and y2 tie each other (0) and lose
  # to y0 twice (2 x -1/2). s1: all ties.
  assert [r["score"] for r in records] == [2.0, -1.0, -1.0, 0.0, 0.0]
  assert records[0]["verdicts_as_first"] == {"1": "first", "2": "first"}
  pairs, _ = iterative.best_worst_pairs(records)
  assert [p["id"] for p in pairs] == ["s0#0|s0#1"]

  def no_more_calls(request):
    raise AssertionError("a complete prompt was judged again")

  again = iterative.critic_feedback(config, candidates, FunctionJudge(no_more_calls), tmp_path, out)
  assert again == records


class FixedLabeler:
  """p_yes 0.9 for questions about red objects, else 0.2 (p_no = 1 - p_yes)."""

  def score(self, questions, images):
    from lmm_align.feedback.labeler import YesNoScores

    p_yes = np.asarray([0.9 if " red " in q else 0.2 for q in questions], np.float32)
    return YesNoScores(p_yes, 1.0 - p_yes)


def test_rlaifv_feedback_scores_minus_the_rejected_claims(tmp_path):
  from PIL import Image

  (tmp_path / "images").mkdir()
  Image.new("RGB", (48, 48)).save(tmp_path / "images" / "s0.png")
  config = shapes_iterative_dpo.get_config("runlocal")
  candidates = [
    _candidate(0, "There is a red circle and a blue square."),
    _candidate(1, "There is a red circle. There is a red star."),
  ]
  records = iterative.rlaifv_feedback(
    config, candidates, FixedLabeler(), tmp_path, tmp_path / "labelled.jsonl"
  )
  assert [r["questions"] for r in records] == [
    ["Is there a red circle?", "Is there a blue square?"],
    ["Is there a red circle?", "Is there a red star?"],
  ]
  assert [r["score"] for r in records] == [-1, 0]
  pairs, _ = rlaifv.build_preference_pairs(records, balance_lengths=False)
  assert [(p["chosen_score"], p["rejected_score"]) for p in pairs] == [(0, -1)]


def test_the_shapes_labeler_reads_single_token_yes_and_no(policy):
  config = _config(policy)
  labeler = iterative.yes_no_labeler(config, iterative.load_policy(str(policy), "vicuna_v1"))
  tokenizer = labeler.tokenizer
  assert [tokenizer.decode([i]) for i in labeler.answer_tokens.yes_ids] == [" Yes"]
  assert [tokenizer.decode([i]) for i in labeler.answer_tokens.no_ids] == [" No"]
  image = shapes.render(SCENE, 48)
  scores = labeler.score(["Is there a red circle?", "Is there a green star?"], [image, image])
  assert scores.p_yes.shape == (2,) and np.all((scores.p_yes + scores.p_no) <= 1.0 + 1e-6)


def test_dpo_config_follows_the_round(tmp_path):
  config = shapes_iterative_dpo.get_config("runlocal")
  config.epochs_per_round, config.train.batch_size = 2.0, 4
  (tmp_path / "pairs.jsonl").write_text("{}\n" * 9)
  c = iterative.dpo_config(config, 3, "/policy", tmp_path, tmp_path / "prompts")
  assert c.total_steps == 5  # ceil(2 epochs * 9 pairs / 4)
  assert (c.init_from, c.data.source, c.data.path) == (
    "/policy", "pairs_jsonl", str(tmp_path / "pairs.jsonl"),
  )  # fmt: skip
  assert c.data.image_folder == str(tmp_path / "prompts") and not c.eval.enabled
  assert config.train.data.source == "shapes_pairs"  # the loop's config is left as it was


def test_bad_configs_are_refused():
  config = shapes_iterative_dpo.get_config("runlocal")
  with pytest.raises(ValueError, match="init_from"):
    iterative.check_config(config)
  config.init_from = "/policy"
  config.pairs.sft_on = "best"
  with pytest.raises(ValueError, match="sft_on 'best'"):
    iterative.check_config(config)
  config = shapes_iterative_dpo.get_config("feedback=ground_truth,runlocal")
  config.init_from, config.pairs.sft_on = "/policy", "unrejected"
  with pytest.raises(ValueError, match="'ground_truth' has none"):
    iterative.check_config(config)
  with pytest.raises(ValueError, match="feedback=.*use one of"):
    shapes_iterative_dpo.get_config("feedback=gpt4")


def test_a_round_with_fewer_pairs_than_a_batch_keeps_its_policy(tmp_path, policy):
  config = shapes_iterative_dpo.get_config("feedback=ground_truth,runlocal")
  prompts, pairs_dir, dpo_dir, export_dir = (tmp_path / d for d in ("p", "pairs", "dpo", "export"))
  for d in (prompts, pairs_dir, dpo_dir):
    d.mkdir()
  (prompts / "prompts.jsonl").write_text(
    json.dumps({"id": "s0", "question": "q", "image": None, "scene": SCENE.to_dict()}) + "\n"
  )
  records = loop_feedback.ground_truth_feedback(
    [_candidate(0, "A red circle."), _candidate(1, "A green circle.")], {"s0": SCENE}, 0.0
  )
  (tmp_path / "labelled.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  iterative.make_pairs(config, 1, tmp_path / "labelled.jsonl", prompts, pairs_dir)
  stats = json.loads((pairs_dir / "stats.json").read_text())
  assert stats["pairs"] == 1 and stats["ground_truth"] == {"correct": 1, "wrong": 0, "tie": 0}
  skip = iterative.too_few_pairs(config, pairs_dir)
  assert skip == "1 pairs, fewer than one batch (train.batch_size=4)"
  iterative.train_or_skip(None, skip, dpo_dir)
  iterative.export_policy(dpo_dir, str(policy), export_dir)
  assert (export_dir / "model.safetensors").read_bytes() == (
    policy / "model.safetensors"
  ).read_bytes()
  assert iterative._dpo_metrics(dpo_dir) == {"skipped": skip}


def test_sft_on_unrejected_marks_the_pairs_whose_chosen_answer_has_no_rejected_claim(tmp_path):
  config = shapes_iterative_dpo.get_config("runlocal")
  config.pairs.per_prompt, config.pairs.balance_lengths = 0, False
  config.pairs.sft_on = "unrejected"
  prompts, pairs_dir = tmp_path / "p", tmp_path / "pairs"
  prompts.mkdir(), pairs_dir.mkdir()
  (prompts / "prompts.jsonl").write_text(
    json.dumps({"id": "s0", "question": "q", "image": None, "scene": SCENE.to_dict()}) + "\n"
  )
  responses = ["A red circle.", "A red star.", "A green star and a red star."]
  records = [
    {**_candidate(k, text), "score": -k, "status": "ok", "num_claims": k + 1,
     "num_judged": k + 1}
    for k, text in enumerate(responses)
  ]  # fmt: skip
  (tmp_path / "labelled.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  iterative.make_pairs(config, 1, tmp_path / "labelled.jsonl", prompts, pairs_dir)
  pairs = [json.loads(x) for x in (pairs_dir / "pairs.jsonl").read_text().splitlines()]
  assert [(p["chosen_score"], p["rejected_score"], p["sft_weight"]) for p in pairs] == [
    (0, -1, 1.0), (0, -2, 1.0), (-1, -2, 0.0),
  ]  # fmt: skip
  assert json.loads((pairs_dir / "stats.json").read_text())["pairs_sft_on_chosen"] == 2


def test_per_item_rules_fail_one_item_not_the_run():
  from lmm_align.feedback import claims

  # An empty claim is the rule question maker's documented ValueError.
  with pytest.raises(ValueError):
    claims.RuleQuestionMaker().questions([["There is a red circle."], ["  "]])
  maker = iterative.PerItem(claims.RuleQuestionMaker())
  assert maker.questions([["There is a red circle."], ["  "], []]) == [
    ["Is there a red circle?"],
    None,
    [],
  ]
  splitter = iterative.PerItem(claims.RuleClaimSplitter())
  # A superscript digit used to crash the splitter; it is now read as text.
  items = [("q", "There is a circle and ² squares."), ("q", "There is a red circle.")]
  assert splitter.split(items) == [["There is a circle and ² squares."], ["There is a red circle."]]


def test_one_round_on_an_rlaifv_prompt_file(policy, tmp_path):
  """RLAIF-V's loop on its published prompt layout (rlaifv_jsonl: ds_question_id, image_path,
  question, metainfos) with images that are not shapes scenes: self feedback (the policy
  labels its own claims), pairs without scene facts, each round evaluated on POPE question
  files (two splits, eval.kind=pope) and the best round named by its pope_f1."""
  from PIL import Image

  images = tmp_path / "images"
  images.mkdir()
  rng = np.random.default_rng(0)
  lines = []
  for i in range(6):
    pixels = rng.integers(0, 255, size=(40 + 8 * i, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(images / f"img{i}.png")
    lines.append(json.dumps({
      "ds_question_id": f"q{i}", "image_path": f"img{i}.png",
      "question": "Describe the image.", "metainfos": {"origin_dataset": "test"},
    }))  # fmt: skip
  prompts_file = tmp_path / "prompts.jsonl"
  prompts_file.write_text("\n".join(lines) + "\n")
  pope_files = []
  for split in ("random", "adversarial"):
    pope_files.append(tmp_path / f"coco_pope_{split}.json")
    pope_files[-1].write_text("".join(
      json.dumps({"question_id": i, "image": f"img{i}.png", "label": ("yes", "no")[i % 2],
                  "text": f"Is there a {('circle', 'star')[i % 2]} in the image?"}) + "\n"
      for i in range(3)
    ))  # fmt: skip
  config = shapes_iterative_dpo.get_config("feedback=self,runlocal")
  config.init_from = str(policy)
  config.rounds, config.prompts.num_per_round = 1, 6
  config.prompts.source, config.prompts.path = "rlaifv_jsonl", str(prompts_file)
  config.prompts.image_folder = str(images)
  config.eval.kind, config.eval.batch_size, config.eval.max_new_tokens = "pope", 3, 4
  config.eval.pope.paths = f"{tmp_path}/coco_pope_*.json"
  config.eval.pope.image_folder = str(images)
  config.eval.select_metric = "pope_accuracy"
  workdir = tmp_path / "loop"
  summary = iterative.run(config, str(workdir))

  round_dir = workdir / "round_1"
  prompts = [json.loads(x) for x in (round_dir / "prompts" / "prompts.jsonl").open()]
  assert sorted(p["id"] for p in prompts) == [f"q{i}" for i in range(6)]
  assert all("scene" not in p for p in prompts)
  labelled = [json.loads(x) for x in (round_dir / "feedback" / "labelled.jsonl").open()]
  assert len(labelled) == 6 * config.sampling.num_samples
  assert any(r.get("num_claims", 0) > 0 for r in labelled)  # the policy's answers had claims
  stats = json.loads((round_dir / "pairs" / "stats.json").read_text())
  assert stats["ground_truth"] is None  # no scene to check the pairs against
  pairs = [json.loads(x) for x in (round_dir / "pairs" / "pairs.jsonl").open()]
  assert len(pairs) == stats["pairs"] and all("facts" not in p for p in pairs)
  metrics = [json.loads((workdir / f"round_{r}" / "eval" / "metrics.json").read_text())
             for r in (0, 1)]  # fmt: skip
  for m in metrics:
    assert m["pope_questions"] == 6 and {"pope_random/f1", "pope_adversarial/f1"} <= set(m)
    assert m["pope_accuracy"] == (m["pope_random/accuracy"] + m["pope_adversarial/accuracy"]) / 2
    assert m["pope_random/tp"] + m["pope_random/fn"] == 2  # two 'yes' labels in each split
  assert (round_dir / "export" / "config.json").exists()
  assert [row["round"] for row in summary["rounds"]] == [0, 1]
  assert [row["pope_accuracy"] for row in summary["rounds"]] == [
    m["pope_accuracy"] for m in metrics
  ]
  best = 0 if metrics[0]["pope_accuracy"] >= metrics[1]["pope_accuracy"] else 1
  assert summary["best"] == {
    "round": best, "policy": summary["rounds"][best]["policy"], "metric": "pope_accuracy",
    "mode": "max", "value": metrics[best]["pope_accuracy"],
  }  # fmt: skip


def test_the_claim_splitter_is_configured_by_name():
  from lmm_align.feedback import claims

  feedback = shapes_iterative_dpo.get_config("runlocal").feedback
  splitter, questions = iterative.claim_splitter(feedback)
  assert splitter.split([("q", "A red circle and a blue star.")]) == [
    ["There is a red circle.", "There is a blue star."]
  ]
  assert questions.questions([["The circle is red."]]) == [["Is the circle red?"]]
  feedback.splitter, feedback.splitter_base_url = "openai:split-model", "http://127.0.0.1:9"
  feedback.splitter_api_key_env = ""  # a local server without a key
  splitter, questions = iterative.claim_splitter(feedback)
  assert isinstance(splitter, claims.ModelClaimSplitter)
  assert isinstance(questions, claims.ModelQuestionMaker)
  assert splitter.judge is questions.judge
  feedback.splitter_base_url = ""
  with pytest.raises(ValueError, match="splitter_base_url"):
    iterative.claim_splitter(feedback)
  feedback.splitter = "gpt4"
  with pytest.raises(ValueError, match="feedback.splitter='gpt4'"):
    iterative.claim_splitter(feedback)


def test_best_round_picks_by_mode_earliest_on_a_tie_and_names_bad_settings(tmp_path):
  rows = [
    {"round": 0, "policy": "p0", "metrics": {"hallucination_rate": 0.3, "pope_f1": 0.5}},
    {"round": 1, "policy": "p1", "metrics": {"hallucination_rate": 0.2, "pope_f1": 0.7}},
    {"round": 2, "policy": "p2", "metrics": {"hallucination_rate": 0.2, "pope_f1": 0.6}},
    {"round": 3, "policy": "p3", "metrics": {"skipped": "eval.kind is 'none'"}},
  ]
  assert iterative.best_round(rows, "", "max") is None
  assert iterative.best_round(rows, "pope_f1", "max")["round"] == 1
  low = iterative.best_round(rows, "hallucination_rate", "min")
  assert (low["round"], low["policy"], low["value"]) == (1, "p1", 0.2)  # tie: the earlier
  with pytest.raises(ValueError, match=r"eval.select_metric='chair_i': no round.*pope_f1"):
    iterative.best_round(rows, "chair_i", "max")
  with pytest.raises(ValueError, match="eval.select_mode='best'"):
    iterative.best_round(rows, "pope_f1", "best")
  # eval.kind='none' writes why it skipped, without loading the policy.
  config = shapes_iterative_dpo.get_config("runlocal")
  config.eval.kind = "none"
  iterative.evaluate_policy(config, "/no/such/policy", tmp_path)
  assert json.loads((tmp_path / "metrics.json").read_text()) == {"skipped": "eval.kind is 'none'"}
