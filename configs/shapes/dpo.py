"""DPO on shapes-world ground-truth pairs, from an SFT policy exported to HF format.

  python -m lmm_align.main --config=configs/shapes/sft.py --workdir=/tmp/sft
  python -m lmm_align.main export --workdir=/tmp/sft --out=/tmp/sft_hf
  python -m lmm_align.main --config=configs/shapes/dpo.py --workdir=/tmp/dpo --config.init_from=/tmp/sft_hf

Pairs: the scene's truthful caption (chosen) vs the same caption with an injected
hallucination (rejected). The reference is the starting policy, its log-probs precomputed
once (RLAIF-V) unless dpo.precompute_reference=False.
"""

import ml_collections

from configs import common
from configs import shapes as shapes_configs


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, runlocal=False)
  config = shapes_configs.base_config()
  config.trainer = "dpo"
  config.data.source = "shapes_pairs"
  config.data.shapes.pair_set = "captions"  # caption pairs only (no yes/no questions)
  config.data.aspect_mode = "crop"
  config.data.max_length = 128
  config.data.buckets = (96, 128)
  config.data.shapes.num_train = 2000
  config.data.shapes.seed = 1  # pairs from scenes the SFT data did not use
  config.total_steps = 150
  config.batch_size = 16
  config.log_every = 10
  config.checkpoint_every = 50
  # 1e-4 collapses both answers' log-probs (3-token answers after 150 steps); 1e-5 does not.
  config.optim.lr = 1e-5
  # The vision tower stays frozen, as in LLaVA-RLHF and RLAIF-V: preferences tune the answers.
  config.trainable = ("(multi_modal_projector|language_model)/.*",)
  config.optim.warmup_steps = 10
  config.optim.weight_decay = 0.0
  config.dpo = ml_collections.ConfigDict(
    dict(
      loss="sigmoid",  # a key of lmm_align.preference_losses.DPO_LOSSES
      beta=0.1,
      label_smoothing=0.0,  # cdpo / robust
      sft_weight=0.0,
      average_logps=False,  # True for IPO-style length-averaged log-probs
      token_weight=1.0,  # RLHF-V dense DPO: 3.0 on the tokens where chosen and rejected differ
      precompute_reference=True,
    )
  )
  config.eval.enabled = True
  config.eval.num_scenes = 128
  config.sweep = tuple((name, {"dpo.loss": name}) for name in ("sigmoid", "ipo", "hinge", "robust"))
  if arg.runlocal:
    config.total_steps = 4
    config.batch_size = 8
    config.log_every = 1
    config.checkpoint_every = 2
    config.data.shapes.num_train = 32
    config.eval.num_scenes = 8
    config.eval.pope_per_split = 8
    config.eval.max_new_tokens = 16
  return config
