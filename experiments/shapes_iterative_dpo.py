"""Iterative DPO with AI feedback in the shapes world, from one command (CPU): the driver of
configs/shapes/iterative_experiment.py (its docstring has more commands, its comments every field).

  python experiments/shapes_iterative_dpo.py --config=configs/shapes/iterative_experiment.py \
      --workdir=/tmp/iter [--config.feedback=all] [--config.sft_from=/tmp/chain/sft_hf] \
      [--config.labeler.exported=HF] [--config.critic.exported=HF] \
      [--config.loop.train.optim.lr=2e-5]
  python experiments/shapes_iterative_dpo.py \
      --config=configs/shapes/iterative_experiment.py:quick --workdir=/tmp/t   # minutes

It trains what is missing, each into WORKDIR and skipped when already there:

  tower     (tower="auto", the default) the shapes world's vision tower, pretrained
            (lmm_align/shapes/tower.py) -> WORKDIR/tower; the SFT policy and the
            labeler start from it and keep it frozen, as LLaVA keeps CLIP
  sft       configs/shapes/sft.py -> WORKDIR/sft, exported to WORKDIR/sft_hf (or sft_from)
  labeler   (rlaifv) a separate small LLaVA trained by SFT on yes/no questions about scenes
            ("Is there a red circle in the image?" -> Yes/No; labeler.data), with the
            policy's tokenizer, on the policy's frozen tower or (labeler.variant=
            shapes-judge) a larger one pretrained into WORKDIR/labeler_tower ->
            WORKDIR/labeler_hf (or labeler.exported). Its yes/no
            accuracy is measured on held-out existence questions and on the claims of
            held-out captions (half of them with an injected hallucination), beside the SFT
            policy's own accuracy (the `self` labeler) -> WORKDIR/labeler_accuracy.json
  critic    (critic) the SFT policy fine-tuned on pairwise `critic_records.make_critic_records`
            (shapes critiques: the verdict line, or with critic.answer=reason a reason
            naming every hallucinated object first; asked with COMPACT_CRITIC_PROMPT, saved
            as WORKDIR/critic_prompt.txt) ->
            WORKDIR/critic_hf (or critic.exported); its pairwise accuracy against ground truth
            on held-out pairs, with and without ties, one order and both orders (MT-Bench's
            swap rule) -> WORKDIR/critic_accuracy.json

The records and measurements are lmm_align/shapes/loop_models.py's. Then it runs
`lmm_align.trainers.iterative` (configs/shapes/iterative_dpo.py with config.loop's changes)
into WORKDIR/<feedback>/ for each feedback kind asked and prints the hallucination rate per
round. WORKDIR/summary.json gathers the round tables and the labeler and critic accuracies
(results of earlier commands into the same WORKDIR are kept); WORKDIR/config.json is the last
command's config. A killed command rerun as it was resumes where it stopped.
`models_only=True` stops before the loops. The config arg `quick` uses the runlocal configs:
every stage in minutes, numbers meaningless.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from absl import app, flags
from ml_collections import ConfigDict, config_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LABELER_VARIANTS = ("shapes", "shapes-wide", "shapes-judge")
CRITIC_ANSWERS = ("verdict", "reason")


# --------------------------------------------------------------------------------------------
# The config: configs/shapes/iterative_experiment.py.
# --------------------------------------------------------------------------------------------


def define_flags(flag_values: flags.FlagValues, argv: Sequence[str]) -> None:
  """--config (with --config.x=y overrides, read from `argv`) and --workdir."""
  config_flags.DEFINE_config_file(
    "config", None, "configs/shapes/iterative_experiment.py[:quick]", flag_values=flag_values,
    lock_config=True, sys_argv=list(argv),
  )  # fmt: skip
  flags.DEFINE_string("workdir", None, "where every model and loop goes", flag_values=flag_values)
  flags.mark_flags_as_required(["config", "workdir"], flag_values=flag_values)


def named_loop_fields(config_flag: flags.Flag) -> list[str]:
  """The loop fields named on the command line (--config.loop.train.optim.lr=2e-5 ->
  "train.optim.lr"): overrides even when the value is configs/shapes/iterative_dpo.py's."""
  names = config_flags.get_override_values(config_flag)
  return [name.removeprefix("loop.") for name in names if name.startswith("loop.")]


def parse_flags(argv: Sequence[str]) -> tuple[ConfigDict, str, list[str]]:
  """(config, workdir, named loop fields) of a command line (argv[0] the program)."""
  flag_values = flags.FlagValues()
  define_flags(flag_values, argv)
  flag_values(list(argv))
  return flag_values.config, flag_values.workdir, named_loop_fields(flag_values["config"])


def feedback_kinds(config: ConfigDict) -> tuple[str, ...]:
  """The loops to run: config.feedback, or rlaifv, self and critic for "all"."""
  return ("rlaifv", "self", "critic") if config.feedback == "all" else (config.feedback,)


def check_config(config: ConfigDict) -> None:
  """A ValueError naming the field, for values or combinations the stages cannot use."""
  from lmm_align.shapes.loop_models import LABELER_DATA

  for kind in feedback_kinds(config):  # the loop config knows its kinds
    try:
      _load(f"configs/shapes/iterative_dpo.py:feedback={kind}")
    except ValueError as e:
      raise ValueError(f"config.feedback={config.feedback!r}: {e}, or 'all'") from None
  labeler = config.labeler
  for field, value, allowed in (
    ("labeler.data", labeler.data, LABELER_DATA),
    ("labeler.variant", labeler.variant, LABELER_VARIANTS),
    ("critic.answer", config.critic.answer, CRITIC_ANSWERS),
  ):
    if value not in allowed:
      raise ValueError(f"config.{field}={value!r}: use one of {allowed}")
  for field in ("picture_share", "near_miss_share"):
    if not 0.0 <= labeler[field] < 1.0:
      raise ValueError(f"config.labeler.{field}={labeler[field]}: use a share in [0, 1)")
  if labeler.claims_from and labeler.data != "policy_claims":
    raise ValueError("config.labeler.claims_from names the policies of labeler.data=policy_claims")
  if labeler.tower_lr and config.tower == "none":
    raise ValueError(
      "config.labeler.tower_lr scales a pretrained tower's learning rate: not with tower=none"
    )
  if labeler.image_size and config.tower != "none":
    raise ValueError("config.labeler.image_size changes the tower's input: use it with tower=none")


def _load(spec: str) -> ConfigDict:
  from lmm_align import config_files

  return config_files.load_config(spec, str(REPO))


def _with_fields(config: ConfigDict, fields: dict[str, Any]) -> ConfigDict:
  """A copy of `config` with dotted-key fields set (an unknown key is a KeyError)."""
  out = copy.deepcopy(config)
  was_locked = out.is_locked
  out.lock().update_from_flattened_dict(fields)  # locked: no new fields
  return out if was_locked else out.unlock()


def _sft_config(quick: bool, tower_dir: str = "") -> ConfigDict:
  """configs/shapes/sft.py with runlocal and the pretrained tower as asked."""
  parts = (["runlocal"] if quick else []) + ([f"tower={tower_dir}"] if tower_dir else [])
  return _load(f"configs/shapes/sft.py:{','.join(parts)}")


def _world(quick: bool):
  from lmm_align.shapes import data as shapes_data

  return shapes_data.world_config(_sft_config(quick).data)


def _flat(config: ConfigDict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in config.items():
    if isinstance(value, ConfigDict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def loop_overrides(config: ConfigDict, named: Iterable[str] = ()) -> dict[str, Any]:
  """config.loop's fields that differ from configs/shapes/iterative_dpo.py's (runlocal with
  quick), or are `named` (set on the command line, maybe to that file's value: the correction
  kind's own defaults differ)."""
  default = _flat(_load(f"configs/shapes/iterative_dpo.py:{'runlocal' if config.quick else ''}"))
  loop = _flat(config.loop)
  named = set(named)
  out = {k: v for k, v in loop.items() if k in named or k not in default or v != default[k]}
  if "feedback.kind" in out:
    raise ValueError("config.loop.feedback.kind: set the loops' feedback with config.feedback")
  return out


# --------------------------------------------------------------------------------------------
# Models the loop needs: each trained once, exported, marked done.
# --------------------------------------------------------------------------------------------


def ensure_tower(config: ConfigDict, root: pathlib.Path) -> str:
  """The tower folder per config.tower ("" for none)."""
  if config.tower == "none":
    return ""
  if config.tower != "auto":
    return config.tower
  from lmm_align.shapes import tower as shapes_tower

  shapes_tower.ensure_tower(_sft_config(config.quick), root / "tower", config.quick)
  return str(root / "tower")


def _train_and_export(config: ConfigDict, workdir: pathlib.Path, out: pathlib.Path) -> str:
  """SFT in `workdir` (resuming), then export to `out`; `out/done` marks a finished export."""
  from lmm_align.trainers import export, sft

  if not (out / "done").exists():
    if not (workdir / "summary.json").exists():
      sft.train(config, str(workdir))
    export.export_workdir(str(workdir), str(out))
    (out / "done").write_text("exported\n")
  return str(out)


def ensure_sft(config: ConfigDict, root: pathlib.Path, tower_dir: str) -> str:
  if config.sft_from:
    return config.sft_from
  sft_config = _sft_config(config.quick, tower_dir)
  if config.quick:  # long enough to describe scenes in shapes words, so feedback finds pairs
    sft_config.total_steps, sft_config.checkpoint_every, sft_config.optim.lr = 40, 40, 3e-3
  print(f"=== sft -> {root / 'sft'}")
  return _train_and_export(sft_config, root / "sft", root / "sft_hf")


def _json_sft_config(
  config: ConfigDict, tower_dir: str, data_json: pathlib.Path, **fields: Any
) -> ConfigDict:
  """configs/shapes/sft.py reading a saved LLaVA JSON (its images beside it), no evaluation."""
  base = {
    "data.source": "llava_json",
    "data.json_path": str(data_json),
    "data.image_folder": str(data_json.parent),
    "eval.enabled": False,
  }
  return _with_fields(_sft_config(config.quick, tower_dir), {**base, **fields})


def _saved_records(data_dir: pathlib.Path, make_records: Callable[[], list]) -> pathlib.Path:
  """data_dir/data.json, a LLaVA JSON written from `make_records()` once (reruns reuse it)."""
  from lmm_align.data.llava_json import save_llava_dataset

  if not (data_dir / "data.json").exists():
    save_llava_dataset(make_records(), data_dir)
  return data_dir / "data.json"


def labeler_overrides(config: ConfigDict, labeler_tower_dir: str = "") -> dict[str, Any]:
  """The labeler's changes to the SFT config: steps, sequence length, and its vision."""
  labeler = config.labeler
  fields = {
    "total_steps": labeler.steps,
    "checkpoint_every": max(1, labeler.steps // 6),
    "keep_checkpoints": 6,
    "data.max_length": 128,
    "data.buckets": (96, 128),
    "model.variant": labeler.variant,
  }
  if labeler.image_size:
    fields["model.image_size"] = labeler.image_size
  if labeler.init:
    fields["init_from"] = labeler.init
    fields["model.vision_init"] = ""  # the tower comes with the model
  elif labeler_tower_dir:
    fields["model.vision_init"] = labeler_tower_dir
  if labeler.tower_lr:
    fields["trainable"] = (".*",)
    fields["optim.lr_groups"] = (("vision_tower/.*", labeler.tower_lr),)
  return fields


def labeler_data(config: ConfigDict, sft_hf: str) -> list[dict[str, Any]]:
  """The labeler's records per config.labeler (data, records and the shares); the policies
  described for data="policy_claims": labeler.claims_from, else the SFT policy."""
  from lmm_align.shapes import loop_models

  labeler = config.labeler
  return loop_models.labeler_training_records(
    labeler.data, labeler.records, _world(config.quick),
    near_miss_share=labeler.near_miss_share, picture_share=labeler.picture_share,
    policy_folders=[f for f in labeler.claims_from.split(",") if f] or [sft_hf],
    template=config.loop.data.template,
  )  # fmt: skip


def ensure_labeler_tower(config: ConfigDict, root: pathlib.Path, tower_dir: str) -> str:
  """The pretrained tower a new labeler starts from ("" when it has none: labeler.init brings
  its own, tower=none trains it from scratch): the policy's tower when the labeler variant
  has the policy's vision config, else one pretrained for the labeler's variant into
  WORKDIR/labeler_tower."""
  from lmm_align.models.variants import get_variant

  if config.labeler.init or not tower_dir:
    return ""
  sft_config = _sft_config(config.quick)
  variant = config.labeler.variant
  if get_variant(variant).vision == get_variant(sft_config.model.variant).vision:
    return tower_dir
  from lmm_align.shapes import tower as shapes_tower

  sft_config.model.variant = variant
  shapes_tower.ensure_tower(sft_config, root / "labeler_tower", config.quick)
  return str(root / "labeler_tower")


def ensure_labeler(config: ConfigDict, root: pathlib.Path, sft_hf: str, tower_dir: str) -> str:
  """A labeler trained on labeler.data's yes/no records (the policy's tokenizer)."""
  if config.labeler.exported:
    return config.labeler.exported
  labeler_tower_dir = ensure_labeler_tower(config, root, tower_dir)
  data_json = _saved_records(root / "labeler_data", lambda: labeler_data(config, sft_hf))
  fields = {"tokenizer": sft_hf, **labeler_overrides(config, labeler_tower_dir)}
  print(f"=== labeler -> {root / 'labeler'}")
  return _train_and_export(
    _json_sft_config(config, tower_dir, data_json, **fields),
    root / "labeler",
    root / "labeler_hf",
  )


def critic_prompt_file(root: pathlib.Path) -> str:
  """WORKDIR/critic_prompt.txt: the pairwise prompt the critic is trained and asked with."""
  from lmm_align.shapes.loop_models import COMPACT_CRITIC_PROMPT

  path = root / "critic_prompt.txt"
  path.write_text(COMPACT_CRITIC_PROMPT)
  return str(path)


def ensure_critic(config: ConfigDict, root: pathlib.Path, sft_hf: str, tower_dir: str) -> str:
  """The SFT policy fine-tuned on pairwise shapes critic data, asked with the compact prompt."""
  from lmm_align.shapes import loop_models

  critic = config.critic
  if critic.exported:
    return critic.exported
  data_json = _saved_records(
    root / "critic_data",
    lambda: loop_models.critic_records(
      critic.records, _world(config.quick), loop_models.CRITIC_DATA_SEED,
      critic_prompt_file(root), critic.answer,
    ),
  )  # fmt: skip
  sft_config = _json_sft_config(
    config, tower_dir, data_json, init_from=sft_hf, total_steps=critic.steps,
    checkpoint_every=max(1, critic.steps // 3), batch_size=16 if not config.quick else 8,
    **{"data.max_length": 320, "data.buckets": (256, 320), "optim.lr": 1e-4},
  )  # fmt: skip
  print(f"=== critic -> {root / 'critic'}")
  return _train_and_export(sft_config, root / "critic", root / "critic_hf")


def _saved_json(path: pathlib.Path, compute: Callable[[], dict]) -> dict:
  """path's JSON, computed and written once (reruns reuse it)."""
  if not path.exists():
    path.write_text(json.dumps(compute(), indent=2) + "\n")
  return json.loads(path.read_text())


def ensure_labeler_accuracy(
  config: ConfigDict, root: pathlib.Path, loop: ConfigDict, labeler: str, sft_hf: str
) -> dict:
  """WORKDIR/labeler_accuracy.json: loop_models.labeler_report on eval_items per set."""
  from lmm_align.shapes import loop_models

  return _saved_json(
    root / "labeler_accuracy.json",
    lambda: loop_models.labeler_report(
      _world(config.quick), loop, labeler, sft_hf, config.eval_items
    ),
  )


def ensure_critic_accuracy(config: ConfigDict, root: pathlib.Path, loop: ConfigDict) -> dict:
  """WORKDIR/critic_accuracy.json: loop_models.critic_report of the loop's critic."""
  from lmm_align.shapes import loop_models

  return _saved_json(
    root / "critic_accuracy.json",
    lambda: loop_models.critic_report(_world(config.quick), loop, config.eval_items),
  )


# --------------------------------------------------------------------------------------------
# The loop.
# --------------------------------------------------------------------------------------------


def loop_config(
  config: ConfigDict,
  kind: str,
  root: pathlib.Path,
  sft_hf: str,
  labeler: str = "",
  critic_folder: str = "",
  named: Iterable[str] = (),
) -> ConfigDict:
  """configs/shapes/iterative_dpo.py for feedback `kind`, from the models trained here, with
  config.loop's changes (`loop_overrides`)."""
  runlocal = ",runlocal" if config.quick else ""
  loop = _load(f"configs/shapes/iterative_dpo.py:feedback={kind}{runlocal}")
  fields = {"init_from": sft_hf, "feedback.labeler": labeler, "feedback.critic": critic_folder}
  if critic_folder:
    fields["feedback.critic_prompt"] = critic_prompt_file(root)
  return _with_fields(loop, {**fields, **loop_overrides(config, named)})


def run_experiment(config: ConfigDict, workdir: str, named: Iterable[str] = ()) -> dict[str, Any]:
  """Every stage into `workdir`; the summary (also WORKDIR/summary.json). `named`: the loop
  fields set on the command line (`named_loop_fields`)."""
  from lmm_align.trainers import iterative

  check_config(config)
  kinds, named = feedback_kinds(config), list(named)
  root = pathlib.Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  (root / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
  tower_dir = ensure_tower(config, root)
  sft_hf = ensure_sft(config, root, tower_dir)
  summary_path = root / "summary.json"
  # Another command may have run other feedback kinds into this workdir: keep their results.
  results = json.loads(summary_path.read_text()) if summary_path.exists() else {}
  results["sft"] = sft_hf
  labeler = critic_folder = ""
  if "rlaifv" in kinds:
    labeler = ensure_labeler(config, root, sft_hf, tower_dir)
    loop = loop_config(config, "rlaifv", root, sft_hf, labeler, named=named)
    results["labeler_accuracy"] = ensure_labeler_accuracy(config, root, loop, labeler, sft_hf)
    print("labeler yes/no accuracy:", json.dumps(results["labeler_accuracy"], indent=1))
  if "critic" in kinds:
    critic_folder = ensure_critic(config, root, sft_hf, tower_dir)
    loop = loop_config(config, "critic", root, sft_hf, critic_folder=critic_folder, named=named)
    results["critic_accuracy"] = ensure_critic_accuracy(config, root, loop)
    print("critic pairwise accuracy:", json.dumps(results["critic_accuracy"], indent=1))
  for kind in () if config.models_only else kinds:
    print(f"=== iterative DPO, {kind} feedback -> {root / kind}")
    loop = loop_config(config, kind, root, sft_hf, labeler, critic_folder, named)
    results[kind] = iterative.run(loop, str(root / kind))["rounds"]
  summary_path.write_text(json.dumps(results, indent=2) + "\n")
  for kind in () if config.models_only else kinds:
    print(f"\n{kind} feedback:\n{iterative.format_rounds_table(results[kind])}")
  return results


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config_flag = flags.FLAGS["config"]
  run_experiment(config_flag.value, flags.FLAGS.workdir, named_loop_fields(config_flag))


if __name__ == "__main__":
  os.environ.setdefault("LMM_ALIGN_PROGRESS", "0")
  from absl import logging

  logging.set_verbosity(logging.WARNING)
  define_flags(flags.FLAGS, sys.argv)
  app.run(main)
