"""Iterative DPO with AI feedback (RLAIF-V's rounds; LLaVA-Critic's preference learning).

One round r = 1..M, read top to bottom in `run_round`:

  prompts     prompts.jsonl by prompts.source: a plugin's round prompts (`feedback.registry`;
              the shapes world's "shapes": new scenes each round, seed [prompts.seed, r],
              saved as PNGs), or num_per_round records of a `data.registry` prompts source
  candidates  K samples per prompt from the round's starting policy, same decoding settings,
              different noise (`feedback.candidates.generate_candidates`, seed sampling.seed + r)
  feedback    one score per candidate, by config.feedback.kind (`feedback.registry`):
                rlaifv        rule claims -> rule yes/no questions (`claims.Rule*`, one item
                              at a time: `PerItem`) -> a separate labeler model
                              (`YesNoLabeler` on feedback.labeler); score = -(rejected claims)
                self          the same with the round's policy as its own labeler
                critic        a critic model (feedback.critic) judges all K(K-1) ordered pairs
                              (`critic.rank_responses`, both orders, optionally debiased);
                              score = r_i, LLaVA-Critic's ordered-pair reward
                ground_truth, correction  the shapes plugin's, against each prompt's scene
                              (`shapes.loop_feedback`): -(hallucinated mentions) +
                              feedback.recall_weight * (recalled objects), and RLHF-V's
                              minimal corrections
  pairs       by the kind's pair method (or pairs.method):
              "rlaifv" (rlaifv, self, ground_truth): every pair within a prompt whose
              scores differ by >= min_score_gap, at most pairs.per_prompt per prompt, then
              RLAIF-V's length balancing (`rlaifv.build_preference_pairs`); "best_worst"
              (critic): argmax vs argmin score per prompt, LLaVA-Critic's pair; "correction":
              (corrected, original) for hallucinating answers, RLHF-V's pair. A plugin's
              round prompts may annotate the pairs (shapes: the scene's facts, and how many
              pairs the scene agrees with, a diagnostic only).
              pairs.sft_on="unrejected" (rlaifv, self) gives the SFT term only the pairs
              whose chosen answer has no rejected claim (pair field sft_weight 1, else 0)
  dpo         `trainers.dpo.train` on the pairs, initialised from the round's policy, which is
              also the reference (its log-probs precomputed once, as RLAIF-V does). A round
              with fewer pairs than one batch skips DPO and keeps its policy (reported in
              the summaries as "skipped", not an error: one poor round does not end a run)
  export      the DPO run's final checkpoint as an HF folder: the next round's policy and
              reference. RLAIF-V picks the best of several checkpoints per round on held-out
              benchmarks; here each round keeps one checkpoint, its last, so no evaluation data
              leaks into training choices.
  eval        the evaluation config.eval.kind names (`evals.registry`): "shapes", held-out
              scenes (data.shapes.eval_seed); "none" on real prompts

Round 0 is the evaluation of config.init_from (the SFT policy).

Models. The loop's models (the round's policy, the labeler, the critic, a splitter model) are
read from their HF folders by `loop_model`: params and computation in config.inference.dtype,
sharded over the loop's mesh (config.mesh: sizes, rules, num_devices) by the logical rules, so
a model no device can hold (RLAIF-V's LLaVA-NeXT-34B labeler, a 72B LLaVA-Critic) is loaded
shard by shard and sampled, labelled and judged model-sharded (`sampling.generate(mesh=...)`,
`YesNoLabeler(mesh=...)`, `ModelJudge(mesh=...)`). A one-device mesh loads each model onto
that device. They are cached across stages and dropped before DPO, which shards the policy on
its own mesh (train.mesh).

Layout and resume. Stage s of round r writes under WORKDIR/round_<r>/<s>/ and, once complete,
a `done` file (JSON: the stage's wall seconds). A rerun of the same command skips stages with a
`done` file, so a killed run resumes at the round and stage where it stopped; inside a stage,
candidates and feedback append to resumable JSONL files (prompts already complete are kept)
and DPO resumes from its own checkpoints. WORKDIR/round_<r>/summary.json holds one round's
numbers, WORKDIR/summary.json = {"rounds": [round 0, round 1, ...], "feedback": kind, ...}.
Stage timings live only in the `done` files, so the summaries of a resumed run and of an
uninterrupted run are equal.

Several processes (a pod's hosts, one shared workdir on GCS / NFS) all run every stage, since
each samples and labels on the mesh over all of them, but only process 0 writes the stage
files, `done` and the summaries; the others write to a private temporary copy of the stage
(`_stage`). A barrier follows each stage, so the next one reads process 0's files.
"""

from __future__ import annotations

import collections
import copy
import functools
import json
import math
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from lmm_align import sharding
from lmm_align.data import jsonl, preference_sources
from lmm_align.evals import registry as eval_registry
from lmm_align.feedback import candidates as candidates_lib
from lmm_align.feedback import registry as feedback_registry
from lmm_align.feedback import rlaifv
from lmm_align.trainers import export, registry

# Which chosen answers the DPO run's SFT term (train.dpo.sft_weight) imitates: all, or only
# those the labeler rejected no claim of (a chosen answer is only the better of two and may
# still hallucinate; imitating it teaches that too).
SFT_ON = ("all", "unrejected")
SUMMARY_METRICS = (
  "hallucination_rate", "chair_s_refine", "mention_rate", "chair_i", "object_recall", "pope_f1",
  "pope_accuracy", "pope_yes_ratio", "mean_answer_words",
)  # fmt: skip
SELECT_MODES = ("max", "min")
INFERENCE_DTYPES = ("float32", "bfloat16", "float16")
DONE = "done"

# Called after each stage is complete (run now or found done): (round, stage name).
StageHook = Callable[[int, str], None]


# --------------------------------------------------------------------------------------------
# Stage bookkeeping.
# --------------------------------------------------------------------------------------------


def _write_json(path: pathlib.Path, payload: Any) -> None:
  """Atomic write (rename), so a kill never leaves half a file that looks complete."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
  os.replace(tmp, path)


def _read_json(path: pathlib.Path) -> Any:
  return json.loads(path.read_text())


def _sync(name: str) -> None:
  """Every process waits here for the others (nothing to wait for in one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _is_done(stage_dir: pathlib.Path) -> bool:
  """Whether the stage's `done` file exists, as process 0 sees it: every process then skips or
  runs the stage together (a stage that samples needs them all)."""
  done = (stage_dir / DONE).exists()
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    done = bool(multihost_utils.broadcast_one_to_all(np.array(done)))
  return done


def _private_copy(stage_dir: pathlib.Path) -> pathlib.Path:
  """A process-local scratch dir holding what a killed run left in stage_dir, so that a
  process other than 0 resumes the stage's JSONL files exactly as process 0 does (same prompts
  skipped, same sampler calls) without writing into the shared workdir."""
  scratch = pathlib.Path(
    tempfile.mkdtemp(prefix=f"lmm_align_{stage_dir.parent.name}_{stage_dir.name}_")
  )
  if stage_dir.is_dir():
    shutil.copytree(stage_dir, scratch, dirs_exist_ok=True)
  return scratch


def _stage(
  round_dir: pathlib.Path,
  name: str,
  fn: Callable[[pathlib.Path], None],
  hook: StageHook | None,
  *,
  every_process_writes: bool = False,
) -> pathlib.Path:
  """Runs fn(stage_dir) unless the stage's `done` file exists; then writes it and calls hook.

  Several processes (a pod's hosts on a shared workdir) all run fn, which samples and labels
  on a mesh over all of them with equal inputs and outputs; only process 0 writes stage_dir
  and `done`, the others write to a private copy (`_private_copy`) removed afterwards. With
  every_process_writes (DPO: its trainer writes logs on process 0 and needs every process's
  checkpoint writes in the same dir), all get stage_dir. Every process waits at a barrier
  after the stage, so the next stage reads process 0's files."""
  stage_dir = round_dir / name
  barrier = f"iterative:{round_dir.name}:{name}"
  if not _is_done(stage_dir):
    writes = every_process_writes or jax.process_index() == 0
    out = stage_dir if writes else _private_copy(stage_dir)
    if writes:
      stage_dir.mkdir(parents=True, exist_ok=True)
    # The private copies hold the stage's files before process 0 appends to them.
    _sync(barrier + ":start")
    start = time.perf_counter()
    print(f"[iterative] {round_dir.name}: {name}")
    fn(out)
    if jax.process_index() == 0:
      _write_json(stage_dir / DONE, {"seconds": round(time.perf_counter() - start, 2)})
    if not writes:
      shutil.rmtree(out, ignore_errors=True)
  _sync(barrier)
  if hook is not None:
    hook(int(round_dir.name.split("_")[1]), name)
  return stage_dir


@functools.lru_cache(maxsize=4)
def load_policy(
  path: str,
  template: str,
  dtype: str = "float32",
  mesh: jax.sharding.Mesh | None = None,
  rules: tuple[tuple[str, Any], ...] = sharding.DEFAULT_RULES,
) -> Any:
  """An HF folder as `inference.LoadedModel` (model, params, tokenizer, image_config), cached:
  a round reads its starting policy in several stages. With a mesh, params sharded over it."""
  from lmm_align.inference import load_model_folder

  return load_model_folder(path, template=template, dtype=dtype, mesh=mesh, rules=rules)


def loop_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh | None:
  """The mesh the loop's models are sharded over (config.mesh), or None for one device (the
  models then load onto the default device whole)."""
  mesh = sharding.mesh_from_config(config.mesh)
  return None if mesh.size == 1 else mesh


def loop_model(config: ml_collections.ConfigDict, path: str, template: str | None = None) -> Any:
  """A model of the loop (policy, labeler, critic, splitter) in config.inference.dtype, sharded
  over `loop_mesh` by config.mesh.rules; `template` defaults to config.data.template."""
  rules = tuple(tuple(rule) for rule in config.mesh.rules)
  return load_policy(
    path, template or config.data.template, config.inference.dtype, loop_mesh(config), rules
  )


def policy_path(config: ml_collections.ConfigDict, workdir: pathlib.Path, round_index: int) -> str:
  """The policy round `round_index` starts from: init_from, then each round's export."""
  if round_index <= 1:
    return config.init_from
  return str(workdir / f"round_{round_index - 1}" / "export")


# --------------------------------------------------------------------------------------------
# Prompts and candidates.
# --------------------------------------------------------------------------------------------


def write_prompts(config: ml_collections.ConfigDict, round_index: int, out: pathlib.Path) -> None:
  """out/prompts.jsonl: {"id", "question", "image" (relative to out, or an absolute path), ...}.

  A round prompt source of `feedback.registry` (the shapes world's "shapes": new scenes each
  round, each record with its "scene") writes the round's records itself. Any "prompts" source
  of `lmm_align.data.registry` (rlaifv_jsonl, prompts_jsonl, llava_rlhf_prompts; read from
  prompts.path, prompts.image_folder, prompts.on_error): prompts.num_per_round records drawn
  without replacement with seed [prompts.seed, r], so each round gets new prompts as in
  RLAIF-V; image files are referenced where they are, in-memory images written to out/images/.
  """
  source = config.prompts.get("source", "")
  writer = feedback_registry.round_prompts(source)
  if writer is not None:
    records = writer.write(config, round_index, out)
  else:
    records = _source_prompts(config, source, round_index, out)
  tmp = out / "prompts.jsonl.tmp"
  tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
  os.replace(tmp, out / "prompts.jsonl")


def _source_prompts(
  config: ml_collections.ConfigDict, source: str, round_index: int, out: pathlib.Path
) -> list[dict[str, Any]]:
  """`write_prompts`'s records from a registered `data.registry` prompt source (see there)."""
  from lmm_align.data import registry as data_registry

  records, skipped = data_registry.read("prompts", config.prompts)
  unique, seen = [], set()
  for record in records:  # the candidate stage needs distinct ids
    if record["id"] in seen:
      skipped["skipped_repeated_id"] += 1
      continue
    seen.add(record["id"])
    unique.append(record)
  if skipped:
    print(f"[iterative] prompts from {source}: skipped {dict(skipped)}")
  order = np.random.default_rng([config.prompts.seed, round_index]).permutation(len(unique))
  lines = []
  for index in order[: config.prompts.num_per_round]:
    record, image = unique[index], unique[index]["image"]
    if image is None:
      reference = None
    elif isinstance(image, preference_sources.ImageFile):
      reference = str(image.path)  # absolute: the stages load out / reference, which is it
    else:
      reference = f"images/{len(lines)}.png"
      (out / "images").mkdir(parents=True, exist_ok=True)
      (image() if callable(image) else image).save(out / reference)
    lines.append({"id": record["id"], "question": record["question"], "image": reference})
  return lines


def _image_loader(prompts_dir: pathlib.Path) -> Callable[[str], Any]:
  from lmm_align.data import images

  return lambda relative: images.load_image(str(prompts_dir / relative))


def sample_candidates(
  config: ml_collections.ConfigDict,
  round_index: int,
  policy: Any,
  prompts_dir: pathlib.Path,
  out: pathlib.Path,
) -> list[dict[str, Any]]:
  """K samples per prompt into out/candidates.jsonl (resumable)."""
  from lmm_align import sampling
  from lmm_align.data import conversation

  s = config.sampling
  settings = sampling.SamplingSettings(
    temperature=s.temperature,
    top_k=s.top_k,
    top_p=s.top_p,
    max_new_tokens=s.max_new_tokens,
    # An answer ends at its template's end token (eos; ChatML's <|im_end|> for OneVision).
    stop_token_ids=conversation.answer_stop_ids(policy.tokenizer, config.data.template),
  )
  return candidates_lib.generate_candidates(
      policy.model, policy.params, policy.tokenizer, policy.image_config,
      candidates_lib.read_prompts(prompts_dir / "prompts.jsonl"), out / "candidates.jsonl",
      num_samples=s.num_samples, settings=settings, seed=s.seed + round_index,
      template=config.data.template, load_image=_image_loader(prompts_dir), mesh=policy.mesh,
      rules=policy.rules,
  )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Feedback: one score per candidate.
# --------------------------------------------------------------------------------------------


def yes_no_labeler(config: ml_collections.ConfigDict, labeler_model: Any) -> Any:
  """A `YesNoLabeler` over a loaded model (`loop_model`), with the configured answer words,
  run on the mesh the model's params are sharded over (if any)."""
  from lmm_align.feedback import labeler as labeler_lib

  f = config.feedback
  return labeler_lib.YesNoLabeler(
      labeler_model.model, labeler_model.params, labeler_model.tokenizer,
      labeler_model.image_config, template=config.data.template, batch_size=f.batch_size,
      answer_tokens=labeler_lib.answer_token_ids(
          labeler_model.tokenizer, tuple(f.yes_words), tuple(f.no_words)),
      question_suffix=f.question_suffix, mesh=labeler_model.mesh, rules=labeler_model.rules,
  )  # fmt: skip


class PerItem:
  """A rule splitter or question maker run one item at a time: an item the rules raise on
  (sampled text can hold anything, e.g. a superscript digit that `str.isdigit` accepts and
  `int` refuses) gets None, which `label_candidates` counts as failed and never pairs, as
  the claims module's interfaces specify, instead of ending a long run."""

  def __init__(self, rules: Any):
    self.rules = rules

  def _each(self, method: str, items: Sequence[Any]) -> list[list[str] | None]:
    out = []
    for item in items:
      try:
        out += getattr(self.rules, method)([item])
      except ValueError:
        out.append(None)
    return out

  def split(self, items: Sequence[tuple[str, str]]) -> list[list[str] | None]:
    return self._each("split", items)

  def questions(self, claims: Sequence[Sequence[str]]) -> list[list[str] | None]:
    return self._each("questions", claims)


def rlaifv_feedback(
  config: ml_collections.ConfigDict,
  candidates: Sequence[dict[str, Any]],
  labeler: rlaifv.Labeler,
  prompts_dir: pathlib.Path,
  out_path: pathlib.Path,
) -> list[dict[str, Any]]:
  """Claims -> yes/no questions (`claim_splitter`) -> yes/no labeler, into out_path
  (resumable)."""
  splitter, question_maker = claim_splitter(
    config.feedback, lambda path, template: loop_model(config, path, template)
  )
  return rlaifv.label_candidates(
      candidates, splitter, question_maker, labeler, out_path,
      load_image=_image_loader(prompts_dir), prompts_per_chunk=config.feedback.prompts_per_chunk,
      reject_margin=config.feedback.reject_margin,
  )  # fmt: skip


def claim_splitter(
  feedback: ml_collections.ConfigDict, load_model: Callable[[str, str], Any] = load_policy
) -> tuple[Any, Any]:
  """(claim splitter, question maker) as feedback.splitter names them: the rules, an
  OpenAI-compatible endpoint ("openai:MODEL") or a local text model ("model:HF_DIR", read by
  load_model(folder, template): the loop's `loop_model`)."""
  from lmm_align.feedback import claims

  spec = feedback.get("splitter", "rules")
  if spec == "rules":
    return PerItem(claims.RuleClaimSplitter()), PerItem(claims.RuleQuestionMaker())
  backend, _, target = spec.partition(":")
  if backend == "openai" and target:
    from lmm_align.judges.http import OpenAIJudge

    if not feedback.splitter_base_url:
      raise ValueError("feedback.splitter 'openai:...' needs feedback.splitter_base_url")
    judge = OpenAIJudge(
      feedback.splitter_base_url, target, api_key_env=feedback.splitter_api_key_env or None
    )
  elif backend == "model" and target:
    from lmm_align.judges.model import ModelJudge

    loaded = load_model(target, feedback.splitter_template)
    judge = ModelJudge(
      loaded.model, loaded.params, loaded.tokenizer, loaded.image_config,
      template=feedback.splitter_template, batch_size=feedback.batch_size,
      name=f"model:{loaded.model_id}", mesh=loaded.mesh, rules=loaded.rules,
    )  # fmt: skip
  else:
    raise ValueError(f"feedback.splitter={spec!r}: use 'rules', 'openai:MODEL' or 'model:HF_DIR'")
  return claims.ModelClaimSplitter(judge), claims.ModelQuestionMaker(judge)


def critic_feedback(
  config: ml_collections.ConfigDict,
  candidates: Sequence[dict[str, Any]],
  judge: Any,
  prompts_dir: pathlib.Path,
  out_path: pathlib.Path,
) -> list[dict[str, Any]]:
  """score_i = r_i of `critic.aggregate_pairwise` over all K(K-1) ordered pairs of a prompt's
  candidates, judged by `judge` (a `Judge`: the critic model behind `ModelJudge`). Each record
  keeps the verdicts where it was shown first ({j: winner}), so the file holds every verdict
  once. Written prompt by prompt, resumable."""
  from lmm_align.feedback import critic

  f = config.feedback
  template = (
    critic.PromptTemplate.from_file(f.critic_prompt, "pairwise") if f.critic_prompt else None
  )
  groups = collections.defaultdict(list)
  for c in candidates:
    groups[c["prompt_id"]].append(c)
  done = jsonl.resume_jsonl(
    out_path,
    "prompt_id",
    lambda pid, rs, where: {r["id"] for r in rs} == {c["id"] for c in groups[pid]},
  )
  with open(out_path, "a", encoding="utf-8") as f_out:
    for pid, group in groups.items():
      if pid in done:
        continue
      group = sorted(group, key=lambda c: c["sample_index"])
      ranking, verdicts = critic.rank_responses(
          judge, group[0]["question"], [c["response"] for c in group],
          str(prompts_dir / group[0]["image"]), template=template, debias=f.critic_debias,
          max_tokens=f.critic_max_tokens,
      )  # fmt: skip
      records = [
        {
          "id": c["id"],
          "prompt_id": pid,
          "question": c["question"],
          "image": c["image"],
          "response": c["response"],
          "score": float(ranking.scores[i]),
          "status": "ok" if ranking.judged else "not_judged",
          "verdicts_as_first": {str(j): v.winner for (a, j), v in verdicts.items() if a == i},
        }  # fmt: skip
        for i, c in enumerate(group)
      ]
      jsonl.append_jsonl(f_out, records)
      done[pid] = records
  by_id = {r["id"]: r for rs in done.values() for r in rs}
  return [by_id[c["id"]] for c in candidates]


def critic_judge(config: ml_collections.ConfigDict) -> Any:
  """The critic folder behind `ModelJudge` (greedy replies, critic_max_tokens long), decoding
  on the loop's mesh when its params are sharded."""
  from lmm_align.judges.model import ModelJudge

  f = config.feedback
  critic_model = loop_model(config, f.critic)
  return ModelJudge(
      critic_model.model, critic_model.params, critic_model.tokenizer, critic_model.image_config,
      template=config.data.template, batch_size=f.batch_size, max_new_tokens=f.critic_max_tokens,
      name="critic", mesh=critic_model.mesh, rules=critic_model.rules,
  )  # fmt: skip


def run_feedback(
  config: ml_collections.ConfigDict,
  policy: Callable[[], Any],
  candidates: Sequence[dict[str, Any]],
  prompts_dir: pathlib.Path,
  out: pathlib.Path,
) -> None:
  """The feedback kind config.feedback.kind names (`feedback.registry`) into
  out/labelled.jsonl. `policy()` loads the round's policy (the labeler of `self`)."""
  kind = feedback_registry.get_kind(config.feedback.kind)
  kind.label(config, policy, candidates, prompts_dir, out / "labelled.jsonl")


@feedback_registry.register_kind("rlaifv", pair_method="rlaifv")
def _rlaifv_kind(config, policy, candidates, prompts_dir, out_path) -> None:
  """RLAIF-V: a separate labeler model (feedback.labeler) answers the claims' questions."""
  if not config.feedback.labeler:
    raise ValueError("feedback.kind='rlaifv' needs feedback.labeler, an HF labeler folder")
  labeler = yes_no_labeler(config, loop_model(config, config.feedback.labeler))
  rlaifv_feedback(config, candidates, labeler, prompts_dir, out_path)


@feedback_registry.register_kind("self", pair_method="rlaifv")
def _self_kind(config, policy, candidates, prompts_dir, out_path) -> None:
  """RLAIF-V's self-feedback: the round's policy labels its own claims."""
  rlaifv_feedback(config, candidates, yes_no_labeler(config, policy()), prompts_dir, out_path)


@feedback_registry.register_kind("critic", pair_method="best_worst")
def _critic_kind(config, policy, candidates, prompts_dir, out_path) -> None:
  """LLaVA-Critic: a critic model (feedback.critic) judges every ordered pair."""
  if not config.feedback.critic:
    raise ValueError("feedback.kind='critic' needs feedback.critic, an HF critic folder")
  critic_feedback(config, candidates, critic_judge(config), prompts_dir, out_path)


def feedback_kinds() -> tuple[str, ...]:
  """The feedback kinds a config may name: the loop's own and the plugins'."""
  return feedback_registry.kind_names()


def feedback_stats(labelled: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Counts by status, the mean score, and (RLAIF-V) the share of claims rejected."""
  statuses = collections.Counter(r["status"] for r in labelled)
  scores = [r["score"] for r in labelled if r["score"] is not None]
  stats = {"candidates": len(labelled), "status": dict(sorted(statuses.items()))}
  stats["mean_score"] = float(np.mean(scores)) if scores else None
  if any("claim_rejected" in r for r in labelled):
    flags = [flag for r in labelled for flag in r.get("claim_rejected", [])]
    stats["claims"] = len(flags)
    stats["claims_rejected_share"] = float(np.mean(flags)) if flags else None
  return stats


# --------------------------------------------------------------------------------------------
# Pairs.
# --------------------------------------------------------------------------------------------


def best_worst_pairs(labelled: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict]:
  """LLaVA-Critic's pair per prompt: the highest vs the lowest score (the first index on ties,
  as `critic.aggregate_pairwise`); no pair when all scores are equal, or when the two texts
  are identical or either is empty."""
  groups = collections.defaultdict(list)
  for r in labelled:
    groups[r["prompt_id"]].append(r)
  pairs, stats = [], collections.Counter()
  for group in groups.values():
    scored = [r for r in group if r["status"] == "ok"]
    if len(scored) < 2 or len({r["score"] for r in scored}) == 1:
      stats["prompts_without_preference"] += 1
      continue
    scores = [r["score"] for r in scored]
    chosen, rejected = scored[int(np.argmax(scores))], scored[int(np.argmin(scores))]
    a, b = chosen["response"].strip(), rejected["response"].strip()
    if not a or not b or a == b:
      stats["pairs_identical_or_empty"] += 1
      continue
    pairs.append({
      "id": f"{chosen['id']}|{rejected['id']}", "image": chosen["image"],
      "question": chosen["question"], "chosen": chosen["response"],
      "rejected": rejected["response"], "chosen_score": chosen["score"],
      "rejected_score": rejected["score"],
    })  # fmt: skip
  return pairs, {**stats, "pairs": len(pairs), "prompts": len(groups)}


def correction_pairs(
  labelled: Sequence[dict[str, Any]], per_prompt: int
) -> tuple[list[dict[str, Any]], dict]:
  """RLHF-V's pairs: (correction, original answer) for each answer that has a correction, at
  most `per_prompt` per prompt (0: all), the lowest ground-truth score first (the most
  hallucinated, the least recalled), identical answers once."""
  groups = collections.defaultdict(list)
  for r in labelled:
    if r.get("correction"):
      groups[r["prompt_id"]].append(r)
  pairs, stats = [], collections.Counter()
  for group in groups.values():
    seen: set[str] = set()
    for r in sorted(group, key=lambda r: r["score"]):
      if r["response"] in seen or (per_prompt and len(seen) == per_prompt):
        stats["duplicates_or_over_limit"] += 1
        continue
      seen.add(r["response"])
      pairs.append({
        "id": f"{r['id']}|corrected", "image": r["image"], "question": r["question"],
        "chosen": r["correction"], "rejected": r["response"],
      })  # fmt: skip
  stats["hallucinating_without_correction"] = sum(
    r["hallucinated"] > 0 and r["correction"] is None for r in labelled
  )
  return pairs, {**stats, "pairs": len(pairs), "prompts": len(groups)}


def make_pairs(
  config: ml_collections.ConfigDict, round_index: int, labelled_path: pathlib.Path,
  prompts_dir: pathlib.Path, out: pathlib.Path,
) -> None:  # fmt: skip
  """out/pairs.jsonl and out/stats.json (pair and feedback counts; "ground_truth": what the
  round prompt source's `annotate_pairs` reports of the pairs, e.g. the shapes scenes'
  agreement, or None)."""
  labelled = jsonl.read_jsonl(labelled_path, tolerate_cut_tail=True)
  p = config.pairs
  kind = feedback_registry.get_kind(config.feedback.kind)
  method = kind.pair_method if p.method == "auto" else p.method
  if method == "rlaifv":
    pairs, stats = rlaifv.build_preference_pairs(
        labelled, min_score_gap=p.min_score_gap, pairs_per_prompt=p.per_prompt or None,
        seed=config.seed + round_index, balance_lengths=p.balance_lengths,
    )  # fmt: skip
  elif method == "best_worst":
    pairs, stats = best_worst_pairs(labelled)
  elif method == "correction":
    if kind.pair_method != "correction":
      writers = [k for k in feedback_registry.kind_names()
                 if feedback_registry.get_kind(k).pair_method == "correction"]  # fmt: skip
      raise ValueError(
        f"pairs.method 'correction' needs a feedback kind that writes corrections ({writers}); "
        f"feedback.kind={kind.name!r} does not"
      )
    pairs, stats = correction_pairs(labelled, p.per_prompt)
  else:
    raise ValueError(
      f"pairs.method {p.method!r}: use 'auto', 'rlaifv', 'best_worst' or 'correction'"
    )
  # The round prompt source's ground truth, when it has one (shapes: each pair gets its scene's
  # facts, for a fact-augmented reward model, and the scene's agreement is counted).
  writer = feedback_registry.round_prompts(config.prompts.get("source", ""))
  agreement = None
  if writer is not None and writer.annotate_pairs is not None:
    agreement = writer.annotate_pairs(pairs, prompts_dir)
  if p.sft_on == "unrejected":  # RLAIF-V scores: 0 = the labeler rejected no claim
    for pair in pairs:
      pair["sft_weight"] = float(pair["chosen_score"] == 0)
    stats["pairs_sft_on_chosen"] = sum(pair["sft_weight"] > 0 for pair in pairs)
  stats = {**stats, "method": method, "ground_truth": agreement}
  stats["feedback"] = feedback_stats(labelled)
  rlaifv.write_preference_pairs(out / "pairs.jsonl", pairs)
  _write_json(out / "stats.json", stats)


# --------------------------------------------------------------------------------------------
# DPO, export, evaluation.
# --------------------------------------------------------------------------------------------


def dpo_config(
  config: ml_collections.ConfigDict, round_index: int, policy: str, pairs_dir: pathlib.Path,
  prompts_dir: pathlib.Path,
) -> ml_collections.ConfigDict:  # fmt: skip
  """config.train for one round: pairs_jsonl from the round's pairs, init_from (and so the
  reference) the round's policy, no built-in evaluation (the eval stage runs on the export).
  With epochs_per_round > 0, total_steps = ceil(epochs * pairs / batch_size)."""
  c = copy.deepcopy(config.train)
  c.init_from = policy
  c.seed = config.seed + round_index
  c.data.source = "pairs_jsonl"
  c.data.path = str(pairs_dir / "pairs.jsonl")
  c.data.image_folder = str(prompts_dir)
  c.data.template = config.data.template
  c.eval.enabled = False
  if config.epochs_per_round > 0:
    num_pairs = len(jsonl.read_jsonl(pairs_dir / "pairs.jsonl", tolerate_cut_tail=True))
    c.total_steps = max(1, math.ceil(config.epochs_per_round * num_pairs / c.batch_size))
  return c


def too_few_pairs(config: ml_collections.ConfigDict, pairs_dir: pathlib.Path) -> str | None:
  """Why the round cannot train (fewer pairs than one DPO batch), or None."""
  num_pairs = len(jsonl.read_jsonl(pairs_dir / "pairs.jsonl", tolerate_cut_tail=True))
  if num_pairs >= config.train.batch_size:
    return None
  return f"{num_pairs} pairs, fewer than one batch (train.batch_size={config.train.batch_size})"


def train_or_skip(train_config: ml_collections.ConfigDict, skip: str | None, out: pathlib.Path):
  """DPO in `out`, or (too few pairs) out/skipped.json: the round keeps its starting policy.
  A skipped round is reported, not an error, so one poor round does not end a long run."""
  # The loop's cached models (a 34B labeler, a 72B critic) leave the devices before DPO
  # shards the policy and its optimizer state over them.
  load_policy.cache_clear()
  if skip is None:
    registry.get("dpo").train(train_config, str(out))
  else:
    print(f"[iterative] DPO skipped: {skip}")
    _write_json(out / "skipped.json", {"reason": skip})


def export_policy(dpo_dir: pathlib.Path, start_policy: str, out: pathlib.Path) -> None:
  """The DPO run's last checkpoint as an HF folder; a copy of the starting policy when the
  round's DPO was skipped (the next round then starts from the same weights)."""
  if (dpo_dir / "skipped.json").exists():
    shutil.copytree(start_policy, out, dirs_exist_ok=True)
  else:
    export.export_workdir(str(dpo_dir), str(out))


def _dpo_metrics(dpo_dir: pathlib.Path) -> dict[str, Any]:
  """The DPO summary plus the last logged window's reward statistics ({"skipped": why} for a
  round without DPO)."""
  if (dpo_dir / "skipped.json").exists():
    return {"skipped": _read_json(dpo_dir / "skipped.json")["reason"]}
  summary = _read_json(dpo_dir / "summary.json")
  lines = (dpo_dir / "metrics.jsonl").read_text().splitlines()
  last = json.loads(lines[-1]) if lines else {}
  keys = ("rewards/accuracy", "rewards/margin", "rewards/chosen", "rewards/rejected")
  return {
    "final_step": summary["final_step"],
    "final_train_loss": summary["final_train_loss"],
    **{k: last[k] for k in keys if k in last},
  }


def evaluate_policy(config: ml_collections.ConfigDict, path: str, out: pathlib.Path) -> None:
  """out/metrics.json: the evaluation `config.eval.kind` names (`evals.registry`; the shapes
  world's held-out scenes for a shapes loop) of an HF folder, or {"skipped": ...} for "none"
  (a loop on real prompts)."""
  if eval_registry.active_kind(config) == eval_registry.NONE:
    _write_json(out / "metrics.json", {"skipped": "eval.kind is 'none'"})
    return
  metrics = eval_registry.evaluate_model(config, loop_model(config, path))
  _write_json(out / "metrics.json", metrics)


# --------------------------------------------------------------------------------------------
# The loop.
# --------------------------------------------------------------------------------------------


def check_config(config: ml_collections.ConfigDict) -> None:
  if not config.init_from:
    raise ValueError("set config.init_from to the starting (SFT) policy's HF folder")
  kind = feedback_registry.get_kind(config.feedback.kind)  # an unknown kind names the others
  # Evaluation settings fail here, not after the first round's training.
  if eval_registry.active_kind(config) != eval_registry.NONE:
    eval_registry.get(eval_registry.active_kind(config))
  if config.eval.get("select_metric") and config.eval.get("select_mode", "max") not in SELECT_MODES:
    raise ValueError(f"eval.select_mode={config.eval.select_mode!r}: use one of {SELECT_MODES}")
  source = config.prompts.get("source", "")
  if kind.prompt_sources and source not in kind.prompt_sources:
    raise ValueError(
      f"feedback.kind={kind.name!r} scores against the ground truth of prompts.source "
      f"{' or '.join(kind.prompt_sources)}; prompts.source={source!r} has none"
    )
  if config.rounds < 1 or config.sampling.num_samples < 2 or config.prompts.num_per_round < 1:
    raise ValueError("need rounds >= 1, sampling.num_samples >= 2 and prompts.num_per_round >= 1")
  if config.pairs.sft_on not in SFT_ON:
    raise ValueError(f"pairs.sft_on {config.pairs.sft_on!r}: use one of {SFT_ON}")
  if config.pairs.sft_on == "unrejected" and config.feedback.kind not in ("rlaifv", "self"):
    raise ValueError(
      f"pairs.sft_on 'unrejected' reads RLAIF-V scores (rejected claims): feedback.kind "
      f"{config.feedback.kind!r} has none; use 'rlaifv' or 'self', or sft_on 'all'"
    )
  check_models_config(config)


def check_models_config(config: ml_collections.ConfigDict) -> None:
  """The loop's models' fields (inference.dtype, mesh), checked before any model loads; an
  error names the field."""
  if config.inference.dtype not in INFERENCE_DTYPES:
    raise ValueError(f"inference.dtype={config.inference.dtype!r}: use one of {INFERENCE_DTYPES}")
  m = config.mesh
  if not 0 <= m.num_devices <= jax.device_count():
    raise ValueError(f"mesh.num_devices={m.num_devices}: use 0 (all) to {jax.device_count()}")
  try:
    shape = sharding.mesh_shape(tuple(m.sizes), m.num_devices or jax.device_count())
  except ValueError as e:
    raise ValueError(f"mesh.sizes={tuple(m.sizes)}: {e}") from None
  rows = shape[0] * shape[1]  # the labeler splits its batch over data x fsdp
  if rows > 1 and config.feedback.kind in ("rlaifv", "self") and config.feedback.batch_size % rows:
    raise ValueError(
      f"feedback.batch_size={config.feedback.batch_size} must be a multiple of the loop mesh's "
      f"data x fsdp size {rows} (mesh.sizes={tuple(m.sizes)}): the labeler splits its rows over it"
    )


def run_round(
  config: ml_collections.ConfigDict, workdir: pathlib.Path, r: int, hook: StageHook | None
) -> dict[str, Any]:
  """Round r's stages (module docstring); returns and writes round_<r>/summary.json."""
  round_dir = workdir / f"round_{r}"
  start_policy = policy_path(config, workdir, r)
  policy = lambda: loop_model(config, start_policy)
  prompts_dir = _stage(round_dir, "prompts", lambda d: write_prompts(config, r, d), hook)
  cand_dir = _stage(
    round_dir, "candidates", lambda d: sample_candidates(config, r, policy(), prompts_dir, d), hook
  )
  candidates = candidates_lib.read_candidates(cand_dir / "candidates.jsonl")
  feedback_dir = _stage(
    round_dir, "feedback", lambda d: run_feedback(config, policy, candidates, prompts_dir, d), hook
  )
  pairs_dir = _stage(
    round_dir, "pairs",
    lambda d: make_pairs(config, r, feedback_dir / "labelled.jsonl", prompts_dir, d), hook,
  )  # fmt: skip
  train_config = dpo_config(config, r, start_policy, pairs_dir, prompts_dir)
  skip = too_few_pairs(config, pairs_dir)
  dpo_dir = _stage(
    round_dir, "dpo", lambda d: train_or_skip(train_config, skip, d), hook,
    every_process_writes=True,
  )  # fmt: skip
  export_dir = _stage(round_dir, "export", lambda d: export_policy(dpo_dir, start_policy, d), hook)
  eval_dir = _stage(round_dir, "eval", lambda d: evaluate_policy(config, str(export_dir), d), hook)
  summary = {
    "round": r,
    "policy": str(export_dir),
    "started_from": start_policy,
    "prompts": config.prompts.num_per_round,
    "candidates": len(candidates),
    "pairs": _read_json(pairs_dir / "stats.json"),
    "dpo": _dpo_metrics(dpo_dir),
    "metrics": _read_json(eval_dir / "metrics.json"),
  }
  if jax.process_index() == 0:
    _write_json(round_dir / "summary.json", summary)
  return summary


def run(
  config: ml_collections.ConfigDict, workdir: str, *, after_stage: StageHook | None = None
) -> dict[str, Any]:
  """Runs (or resumes) config.rounds rounds in `workdir`; returns WORKDIR/summary.json.

  after_stage: called as after_stage(round, stage) once each stage is complete (tests use it
  to interrupt a run at a chosen point).
  """
  from lmm_align.trainers import loop

  check_config(config)
  root = pathlib.Path(workdir)
  loop.write_config(config, str(root))
  round0 = root / "round_0"
  eval0 = _stage(
    round0, "eval", lambda d: evaluate_policy(config, config.init_from, d), after_stage
  )
  rows = [{"round": 0, "policy": config.init_from, "metrics": _read_json(eval0 / "metrics.json")}]
  rounds = [run_round(config, root, r, after_stage) for r in range(1, config.rounds + 1)]
  rows += rounds
  best = best_round(
    rows, config.eval.get("select_metric", ""), config.eval.get("select_mode", "max")
  )
  selection = "the last checkpoint of each round (one checkpoint per round)"
  if best is not None:
    selection += f"; the best round by {best['mode']} {best['metric']}: round {best['round']}"
  summary = {
    "feedback": config.feedback.kind,
    "labeler": config.feedback.labeler if config.feedback.kind == "rlaifv" else None,
    "critic": config.feedback.critic if config.feedback.kind == "critic" else None,
    "checkpoint_selection": selection,
    "best": best,
    "rounds": [_summary_row(row) for row in rows],
  }
  if jax.process_index() == 0:
    _write_json(root / "summary.json", summary)
  print(format_rounds_table(summary["rounds"]))
  return summary


def best_round(rows: Sequence[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
  """The round (0: the starting policy) whose evaluation has the largest ("max") or smallest
  ("min") `metric`, the earliest on a tie, as {round, policy, metric, mode, value}; None when
  no metric is asked for (eval.select_metric empty)."""
  if not metric:
    return None
  if mode not in SELECT_MODES:
    raise ValueError(f"eval.select_mode={mode!r}: use one of {SELECT_MODES}")
  scored = [r for r in rows if isinstance(r["metrics"].get(metric), int | float)]
  if not scored:
    reported = sorted({k for r in rows for k in r["metrics"]})
    raise ValueError(
      f"eval.select_metric={metric!r}: no round's evaluation reports it (they report {reported})"
    )
  sign = 1.0 if mode == "max" else -1.0
  best = max(scored, key=lambda r: (sign * float(r["metrics"][metric]), -r["round"]))
  return {"round": best["round"], "policy": best["policy"], "metric": metric, "mode": mode,
          "value": float(best["metrics"][metric])}  # fmt: skip


def _summary_row(row: dict[str, Any]) -> dict[str, Any]:
  out = {"round": row["round"], "policy": row["policy"]}
  out.update({k: row["metrics"][k] for k in SUMMARY_METRICS if k in row["metrics"]})
  if "pairs" in row:
    out["pairs"] = row["pairs"]["pairs"]
    out["pairs_ground_truth"] = row["pairs"]["ground_truth"]
    out["dpo_final_train_loss"] = row["dpo"].get("final_train_loss")
    if "skipped" in row["dpo"]:
      out["dpo_skipped"] = row["dpo"]["skipped"]
  return out


def format_rounds_table(rows: Sequence[dict[str, Any]]) -> str:
  """One line per round: hallucination rate first, then the other metrics and pair counts."""
  columns = [c for c in (*SUMMARY_METRICS, "pairs") if any(c in r for r in rows)]
  cell = lambda v: "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
  table = [["round", *columns]] + [
    [str(r["round"]), *(cell(r.get(c)) for c in columns)] for r in rows
  ]
  widths = [max(len(line[i]) for line in table) for i in range(len(columns) + 1)]
  return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths)) for line in table)


def main(argv: Sequence[str]) -> None:
  """`python -m lmm_align.trainers.iterative --config=configs/X.py[:arg] --workdir=DIR`."""
  del argv
  from absl import flags, logging

  logging.set_verbosity(logging.WARNING)  # orbax's INFO lines would bury the round table
  run(flags.FLAGS.config, flags.FLAGS.workdir)


# The rounds export their policies as HF folders themselves (round_<r>/policy): no export.
registry.register(registry.Trainer("iterative", run))


if __name__ == "__main__":
  import sys

  from absl import app, flags
  from ml_collections import config_flags

  from lmm_align import config_files

  for arg in sys.argv:
    if arg.startswith("--config="):
      config_files.make_config_package_importable(arg.split("=", 1)[1].split(":", 1)[0])
  config_flags.DEFINE_config_file("config", None, "configs/shapes/iterative_dpo.py[:arg]")
  flags.DEFINE_string("workdir", None, "where the rounds go")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
