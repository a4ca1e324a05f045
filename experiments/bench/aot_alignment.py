"""Plans of the RL recipes' runs, by `lmm-align plan`: LLaVA-RLHF's PPO and RLAIF-V's loop.

  python experiments/bench/aot_alignment.py --topology=v5p-16 [--save_dir=DIR]
  python experiments/bench/aot_alignment.py --runlocal --topology=cpu-8 --mesh=2,2,2

A thin caller of lmm_align/aot (the programs themselves are lmm_align/aot/rl_programs.py):
`configs/llava_rlhf/ppo.py:model=7b` (the 7B policy, the 13B reward model and value, LoRA
r=64) and `configs/rlaifv/iterative.py:model=7b` (the 7B policy's candidate sampler, the
34B LLaVA-NeXT labeler, the DPO step), one after the other (each compile is heavy). With
--runlocal the recipes' tiny runlocal models. Exit status: the worse of the two plans' (0
fits, 3 does not fit, 2 bad input).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
RECIPES = {"ppo": "configs/llava_rlhf/ppo.py", "iterative": "configs/rlaifv/iterative.py"}


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--topology", default="v5p-16", help="accelerator type or cpu-N")
  p.add_argument("--mesh", default="", help="data,fsdp,tensor (default: each config's)")
  p.add_argument("--runlocal", action="store_true", help="the recipes' tiny runlocal models")
  p.add_argument("--cost", default="unrolled", choices=("unrolled", "scanned", "none"))
  p.add_argument("--save_dir", default="", help="write <recipe>.json plans here")
  args = p.parse_args(argv)
  from lmm_align import aot

  status = 0
  for name, path in RECIPES.items():
    spec = str(REPO / path) + (":runlocal" if args.runlocal else ":model=7b")
    argv_ = [f"--config={spec}", f"--topology={args.topology}", f"--cost={args.cost}"]
    argv_ += [f"--mesh={args.mesh}"] if args.mesh else []
    argv_ += [f"--save={os.path.join(args.save_dir, name + '.json')}"] if args.save_dir else []
    status = max(status, aot.main(argv_))
  return status


if __name__ == "__main__":
  sys.exit(main())
