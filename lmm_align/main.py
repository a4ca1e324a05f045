"""Entry point: `python -m lmm_align.main --config=configs/X.py[:arg] --workdir=DIR [--config.k=v]`.

The console script `lmm-align` takes a command first:
  lmm-align train  --config=... --workdir=...     (the same as python -m lmm_align.main)
  lmm-align sweep  --config=... --workdir=ROOT [--print_launch --tpu_name=N --tpu_zone=Z --tpu_accelerator=T]
  lmm-align export --workdir=DIR --out=HF_DIR [--peft]
  lmm-align eval <pope|mmhal|chair|llava_bench|shapes> ...   (lmm_align.evaluate; its --help)
  lmm-align plan --config=... --topology=v5p-64 [--mesh=d,f,t]  (lmm_align.aot: the TPU compiler's
                                                              per-chip memory plan; its --help)
"""

from __future__ import annotations

import copy
import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from lmm_align import config_files, sharding

FLAGS = flags.FLAGS


def _make_config_package_importable(argv: list[str]) -> None:
  for arg in argv:
    if arg.startswith("--config="):
      config_files.make_config_package_importable(arg.split("=", 1)[1].split(":", 1)[0])


_make_config_package_importable(sys.argv)
config_flags.DEFINE_config_file(
  "config", None, "A configs/*.py file, optionally :arg.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and summaries go (local or gs://).")
flags.DEFINE_string("out", None, "export: the HF folder to write.")
flags.DEFINE_bool("peft", False, "export: write LoRA params as a PEFT adapter instead of merging.")
flags.DEFINE_bool(
  "print_launch", False, "sweep: print launch/tpu_run.sh commands instead of running."
)
flags.DEFINE_string("tpu_name", "lmm-align", "sweep --print_launch: TPU name.")
flags.DEFINE_string("tpu_zone", "us-central2-b", "sweep --print_launch: zone.")
flags.DEFINE_string("tpu_accelerator", "v4-32", "sweep --print_launch: accelerator type.")

COMMANDS = ("train", "sweep", "export")


def train(config, workdir: str) -> dict:
  """Runs the trainer registered as config.trainer."""
  from lmm_align.trainers import registry

  return registry.get(config.trainer).train(config, workdir)


def apply_overrides(config, overrides: dict):
  """A copy of a (locked) config with dotted-key overrides; unknown keys are errors."""
  out = copy.deepcopy(config)
  for key, value in overrides.items():
    node = out
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise KeyError(f"sweep override {key!r}: no such config key")
    node[leaf] = value
  return out


def sweep(config, root: str, launch: dict | None = None) -> list[dict]:
  """Runs each sweep point in ROOT/<name>, then prints a table of their summaries; with
  `launch` (name, zone, accelerator, config_arg) prints each point's TPU command instead."""
  if not config.sweep:
    raise ValueError("this config defines no sweep points (config.sweep)")
  rows = []
  for name, overrides in config.sweep:
    workdir = os.path.join(root, name)
    if launch is not None:
      args = [f"--config={launch['config_arg']}", f"--workdir={workdir}"]
      args += [f"--config.{k}={v}" for k, v in overrides.items()]
      print(
        f"launch/tpu_run.sh --name {launch['name']}-{name} --zone {launch['zone']} "
        f"--accelerator {launch['accelerator']} -- " + " ".join(_quote(a) for a in args)
      )
      continue
    summary = train(apply_overrides(config, dict(overrides)), workdir)
    rows.append({"run": name, **summary})
  if rows:
    print(format_table(rows))
  return rows


def format_table(rows: list[dict]) -> str:
  keys = ["run"] + sorted(
    {k for r in rows for k in r if k != "run" and isinstance(r[k], int | float)}
  )
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
  table = [keys] + [[fmt(r.get(k, "")) for k in keys] for r in rows]
  widths = [max(len(row[i]) for row in table) for i in range(len(keys))]
  return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in table)


def _config_arg() -> str:
  for arg in sys.argv:
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
  raise ValueError("--config= not found on the command line")


def _quote(arg: str) -> str:
  import shlex

  return shlex.quote(arg)


def main(argv) -> None:
  command = argv[1] if len(argv) > 1 else "train"
  if command not in COMMANDS or len(argv) > 2:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; commands: {COMMANDS + ('eval',)}")
  if not any(a.startswith(("--verbosity", "-v", "--v=")) for a in sys.argv):
    logging.set_verbosity(logging.WARNING)  # orbax and absl INFO lines drown the progress bar
  sharding.initialize_distributed()
  if command == "export":
    if not FLAGS.workdir or not FLAGS.out:
      raise app.UsageError("export needs --workdir and --out")
    from lmm_align.trainers import export

    try:
      export.export_workdir(FLAGS.workdir, FLAGS.out, peft=FLAGS.peft)
    except ValueError as e:  # a refused export is a usage error, not a traceback
      raise app.UsageError(str(e)) from None
    return
  if FLAGS.config is None or not FLAGS.workdir:
    raise app.UsageError("--config and --workdir are required")
  if command == "sweep":
    launch = None
    if FLAGS.print_launch:
      launch = dict(
        name=FLAGS.tpu_name,
        zone=FLAGS.tpu_zone,
        accelerator=FLAGS.tpu_accelerator,
        config_arg=_config_arg(),
      )
    sweep(FLAGS.config, FLAGS.workdir, launch)
  else:
    summary = train(FLAGS.config, FLAGS.workdir)
    print(json.dumps(summary, indent=2, sort_keys=True))


def run() -> None:
  """The `lmm-align` console script."""
  if sys.argv[1:2] == ["eval"]:  # lmm_align.evaluate parses its own (argparse) flags
    from lmm_align import evaluate

    evaluate.main(sys.argv[2:])
    return
  if sys.argv[1:2] == ["plan"]:  # lmm_align.aot parses its own flags (--topology, --mesh, ...)
    from lmm_align import aot

    sys.exit(aot.main(sys.argv[2:]))
  app.run(main)


if __name__ == "__main__":
  run()
