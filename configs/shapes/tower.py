"""Pretrains the shapes world's vision tower (LLaVA's CLIP stand-in): CPU, about 1.5 minutes.

  lmm-align train --config=configs/shapes/tower.py --workdir=/tmp/shapes_tower
  lmm-align train --config=configs/shapes/tower.py:runlocal --workdir=/tmp/t          # seconds
  lmm-align train --config=configs/shapes/tower.py:variant=shapes-judge --workdir=/tmp/judge_tower

The workdir becomes a CLIPVisionModel folder that `configs/shapes/sft.py:tower=DIR` starts from
(lmm_align/shapes/tower.py: one classification head per scene cell on the patch features the
LLaVA projector reads). The scenes and preprocessing are the SFT config's, so the tower sees
what the policy will see; `variant` picks the model whose tower to train (the shapes-judge
critic's is twice as wide and deep).
"""

import ml_collections

from configs import common
from configs.shapes import sft


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, runlocal=False, variant="")
  config = sft.get_config("runlocal" if arg.runlocal else None)
  config.trainer = "shapes_tower"
  if arg.variant:
    config.model.variant = arg.variant
  config.tower = ml_collections.ConfigDict(
    dict(steps=5000, batch_size=64, lr=1e-3, eval_scenes=512)
  )
  if arg.runlocal:
    config.tower.update(steps=20, batch_size=16, eval_scenes=16)
  return config
