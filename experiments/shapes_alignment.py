"""The shapes-world alignment chain, on CPU, from one command:

  python experiments/shapes_alignment.py --workdir=/tmp/chain            # full: about an hour
  python experiments/shapes_alignment.py --workdir=/tmp/chain --quick    # every stage, tiny

  vision tower pretrained on the world's scenes (LLaVA's CLIP; configs/shapes/tower.py)
  -> SFT over it, tower frozen (answers with injected hallucinations) -> export
    -> reward model, fact-augmented -> export -> PPO with it          (ppo_fact)
    -> reward model, vanilla        -> export -> PPO with it          (ppo_vanilla)
    -> DPO on ground-truth pairs                                       (dpo)
    -> iterative DPO on its own answers and their corrections by the
       scene (RLHF-V's fine-grained feedback, shapes_iterative_dpo.py
       with feedback=correction), the last round's policy          (dpo_corrections)

Each stage trains in WORKDIR/<stage> and writes its summary.json there (policy stages:
hallucination_rate, object_recall, pope_f1, mean_answer_tokens on held-out scenes; reward
stages: held-out pair accuracy). WORKDIR/summary.json maps stage names to those metrics and
the table is printed; WORKDIR/report.html shows it with plots and example answers. A stage
whose summary.json exists is not rerun, so a killed chain continues where it stopped (each
trainer also resumes mid-stage from its checkpoints). `--sft_workdir=DIR` starts from an
already trained SFT run (its summary is the sft row; it is exported into WORKDIR/sft_hf). `--set stage.key=value` overrides any stage's config, e.g.
`--set ppo_fact.ppo.kl_coef=0.05`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

POLICY_METRICS = ("hallucination_rate", "object_recall", "pope_f1", "mean_answer_tokens")
REWARD_METRICS = ("eval_accuracy", "eval_margin")
TOWER_METRICS = ("shape_accuracy", "colour_accuracy", "size_accuracy")
STAGES = (
  "tower", "sft", "rm_fact", "rm_vanilla", "ppo_fact", "ppo_vanilla", "dpo", "dpo_corrections"
)  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--quick", action="store_true", help="runlocal configs: checks the plumbing")
  p.add_argument("--sft_workdir", default="", help="a trained SFT run (skips the SFT stage)")
  p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset, in order")
  p.add_argument("--set", action="append", default=[], help="stage.key=value overrides")
  return p.parse_args(argv)


def _overrides(items: list[str]) -> dict[str, dict[str, object]]:
  out: dict[str, dict[str, object]] = {}
  for item in items:
    key, _, raw = item.partition("=")
    stage, _, field = key.partition(".")
    if stage not in STAGES or not field or not raw:
      raise SystemExit(f"--set {item!r}: use stage.key=value with stage in {STAGES}")
    try:
      value = json.loads(raw)
    except json.JSONDecodeError:
      value = raw
    out.setdefault(stage, {})[field] = value
  return out


def stage_configs(quick: bool, tower: str = "") -> dict[str, object]:
  from lmm_align import config_files

  arg = "runlocal" if quick else ""
  load = lambda spec: config_files.load_config(spec, str(REPO))
  join = lambda *a: ",".join(x for x in a if x)
  return {
    "sft": load(f"configs/shapes/sft.py:{join(arg, f'tower={tower}' if tower else '')}"),
    "rm_fact": load(f"configs/shapes/reward.py:{arg}"),
    "rm_vanilla": load(f"configs/shapes/reward.py:{join(arg, 'vanilla')}"),
    "ppo_fact": load(f"configs/shapes/ppo.py:{arg}"),
    "ppo_vanilla": load(f"configs/shapes/ppo.py:{join(arg, 'vanilla')}"),
    "dpo": load(f"configs/shapes/dpo.py:{arg}"),
    "dpo_corrections": load(f"configs/shapes/iterative_dpo.py:{join(arg, 'feedback=correction')}"),
  }


def _done(workdir: pathlib.Path) -> dict | None:
  path = workdir / "summary.json"
  return json.loads(path.read_text()) if path.exists() else None


def run_chain(args: argparse.Namespace) -> dict[str, dict]:
  from lmm_align import main
  from lmm_align.trainers import export, reward

  root = pathlib.Path(args.workdir)
  root.mkdir(parents=True, exist_ok=True)
  tower = root / "tower"
  configs = stage_configs(args.quick, str(tower) if "tower" in args.stages.split(",") else "")
  overrides = _overrides(args.set)
  wanted = [s for s in args.stages.split(",") if s]
  unknown = set(wanted) - set(STAGES)
  if unknown:
    raise SystemExit(f"--stages: unknown {sorted(unknown)}; known {STAGES}")
  sft_hf = root / "sft_hf"
  summaries: dict[str, dict] = {}

  def run(stage: str, **fields) -> dict:
    workdir = root / stage
    done = _done(workdir)
    if done is None:
      config = main.apply_overrides(configs[stage], {**fields, **overrides.get(stage, {})})
      print(f"=== {stage} -> {workdir}")
      done = main.train(config, str(workdir))
    summaries[stage] = done
    return done

  def exported(stage: str, out: pathlib.Path, fn) -> pathlib.Path:
    if not (out / "config.json").exists():
      fn(str(root / stage), str(out))
    return out

  if args.sft_workdir:
    sft_run = pathlib.Path(args.sft_workdir)
    summaries["sft"] = _done(sft_run) or {}
    if not (sft_hf / "config.json").exists():
      export.export_workdir(str(sft_run), str(sft_hf))
  elif "sft" in wanted:
    if "tower" in wanted:
      from lmm_align.shapes import tower as shapes_tower

      summaries["tower"] = shapes_tower.ensure_tower(configs["sft"], tower, args.quick)
    run("sft")
    exported("sft", sft_hf, export.export_workdir)
  elif not (sft_hf / "config.json").exists():
    raise SystemExit(f"{sft_hf} has no SFT policy: run the sft stage or pass --sft_workdir")
  for kind in ("fact", "vanilla"):
    if f"rm_{kind}" in wanted or f"ppo_{kind}" in wanted:
      run(f"rm_{kind}", init_from=str(sft_hf))
      rm_hf = exported(f"rm_{kind}", root / f"rm_{kind}_hf", reward.export_reward_workdir)
      if f"ppo_{kind}" in wanted:
        run(f"ppo_{kind}", init_from=str(sft_hf), **{"ppo.reward_model": str(rm_hf)})
  if "dpo" in wanted:
    run("dpo", init_from=str(sft_hf))
  if "dpo_corrections" in wanted:
    from lmm_align.trainers import iterative

    config = main.apply_overrides(
      configs["dpo_corrections"], {"init_from": str(sft_hf), **overrides.get("dpo_corrections", {})}
    )
    print(f"=== dpo_corrections -> {root / 'dpo_corrections'}")
    rounds = iterative.run(config, str(root / "dpo_corrections"))["rounds"]  # resumes
    summaries["dpo_corrections"] = {
      **rounds[-1], "hallucination_rate_by_round": [r["hallucination_rate"] for r in rounds]
    }  # fmt: skip

  table = {}
  for stage, summary in summaries.items():
    keys = (
      TOWER_METRICS if stage == "tower"
      else REWARD_METRICS if stage.startswith("rm_")
      else POLICY_METRICS
    )  # fmt: skip
    table[stage] = {k: summary[k] for k in keys if k in summary}
  (root / "summary.json").write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
  print(format_table(table))
  # The iterative stage's workdir holds rounds, not one run: its numbers are in the table.
  _write_report(
    root, [s for s in STAGES if s in summaries and s not in ("tower", "dpo_corrections")]
  )
  return table


def format_table(table: dict[str, dict]) -> str:
  columns = sorted({k for row in table.values() for k in row}, key=lambda k: (
    (POLICY_METRICS + REWARD_METRICS).index(k) if k in POLICY_METRICS + REWARD_METRICS else 99, k
  ))  # fmt: skip
  rows = [["stage", *columns]] + [
    [stage, *(f"{row[c]:.4g}" if c in row else "" for c in columns)] for stage, row in table.items()
  ]
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows)


def _write_report(root: pathlib.Path, stages: list[str]) -> None:
  try:
    from lmm_align.evals import report
  except ImportError:  # the report module is optional for the chain itself
    return
  from lmm_align.shapes import data as shapes_data
  from lmm_align.shapes import world as shapes

  config = stage_configs(quick=False)["sft"]
  world = shapes_data.world_config(config.data)
  scenes = shapes.make_scenes(config.eval.num_scenes, world, seed=config.data.shapes.eval_seed)
  by_id = {s.id: s for s in scenes}
  image_for = lambda e: (
    shapes.render(by_id[e["scene"]], world.image_size) if e.get("scene") in by_id else None
  )
  html, _ = report.pipeline_report(
    str(root), [(s, str(root / s)) for s in stages], str(root), image_for=image_for
  )
  print(f"report: {html}")


if __name__ == "__main__":
  os.environ.setdefault("LMM_ALIGN_PROGRESS", "1")
  run_chain(parse_args())
