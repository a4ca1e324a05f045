"""Iterative DPO with AI feedback in the shapes world, with every model it needs (CPU):

  python experiments/shapes_iterative_dpo.py --config=configs/shapes/iterative_experiment.py \\
      --workdir=/tmp/iter                                              # rlaifv feedback
  python experiments/shapes_iterative_dpo.py --config=configs/shapes/iterative_experiment.py \\
      --workdir=/tmp/iter --config.feedback=all                        # rlaifv, self, critic
  python experiments/shapes_iterative_dpo.py --config=configs/shapes/iterative_experiment.py \\
      --workdir=/tmp/iter --config.sft_from=/tmp/chain/sft_hf --config.loop.train.optim.lr=2e-5
  python experiments/shapes_iterative_dpo.py --config=configs/shapes/iterative_experiment.py:quick \\
      --workdir=/tmp/t                                       # minutes; the plumbing only

arg keys: quick (the runlocal configs of every stage and a few steps each: numbers
meaningless). The script trains what is missing (vision tower, SFT policy, labeler, critic),
each into WORKDIR, then runs configs/shapes/iterative_dpo.py's loop once per feedback kind;
its docstring has the stages and the workdir layout.
"""

import ml_collections

from configs import common
from configs.shapes import iterative_dpo


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, quick=False)
  config = ml_collections.ConfigDict()
  config.quick = arg.quick  # runlocal configs: checks the plumbing
  # A feedback kind of the loop (rlaifv, self, critic, ground_truth, correction), or "all"
  # (rlaifv, self and critic, one loop each).
  config.feedback = "rlaifv"
  config.sft_from = ""  # an exported SFT policy (skips SFT)
  # The pretrained vision tower the SFT policy (when trained here) and the labeler start from,
  # frozen: "auto" (pretrain into WORKDIR/tower), a CLIPVisionModel folder, or "none" (towers
  # trained from scratch through the language loss).
  config.tower = "auto"
  config.labeler = ml_collections.ConfigDict({
    "exported": "",  # an exported labeler to use (skips its training)
    # exist: the SFT mixture's existence task alone; hard: existence questions whose
    # negatives are as popular as the objects and near misses (see hard_existence_records);
    # binding: hard with half the negatives a present colour on another present shape
    # (measured: it catches 39% of the SFT policy's false claims instead of 18%, but accepts
    # 83% of its true ones instead of 96%, and three RLAIF-V rounds then do not lower the
    # hallucination rate); policy_claims: half the claims of the SFT policy's own descriptions
    # of fresh scenes, answered by the scene (see policy_claim_records); claims: half the rule
    # questions of caption claims the loop asks, about objects, the background and the count,
    # answered by the scene with false variants (see claim_records), half binding. The
    # functions named are in lmm_align/shapes/loop_models.py.
    "data": "hard",
    # An exported model the labeler is fine-tuned from (e.g. an earlier labeler) instead of a
    # new decoder on the pretrained tower.
    "init": "",
    # The labeler's vision input side (0: the SFT config's 48); 96 with 16-pixel patches sees
    # each grid cell as 2x2 patches instead of one. Only with tower="none".
    "image_size": 0,
    # 0: the labeler keeps the pretrained tower frozen; > 0: the tower trains too, at this
    # multiple of the labeler's learning rate (RLAIF-V's labeler sees better than its policy).
    "tower_lr": 0.0,
    # The labeler's model: "shapes" (the policy's size), "shapes-wide" (a twice-as-wide decoder
    # on the same tower), or "shapes-judge" (that decoder on a larger tower of its own,
    # pretrained into WORKDIR/labeler_tower: a labeler that sees better than the policy; the
    # policy's tower misreads the shapes its false claims confuse).
    "variant": "shapes",
    # With data="claims": the share of claim records about the picture (background, count), 0:
    # the captions' proportion; with "policy_claims": the share of records that are such
    # picture questions (0: none). In [0, 1).
    "picture_share": 0.0,
    # The share of labeler records that ask about a present object with its shape swapped (or
    # as it is): shape_near_miss_records; the rest are `data`'s. In [0, 1).
    "near_miss_share": 0.0,
    # With data="policy_claims": comma-separated exported policies whose claims (about fresh
    # scenes each) the labeler learns, e.g. a finished loop's later rounds, whose remaining
    # errors differ from the SFT policy's (default: the SFT policy).
    "claims_from": "",
    "steps": 1500,
    "records": 12000,
  })  # fmt: skip
  config.critic = ml_collections.ConfigDict({
    "exported": "",  # an exported critic to use (skips its training)
    # What the critic learns to write: "verdict" (the verdict line alone), or "reason"
    # (LLaVA-Critic's reason, then the verdict; measured: 400 CPU steps leave the reasons
    # garbled and no verdict parses).
    "answer": "verdict",
    "steps": 400,
    "records": 3000,
  })  # fmt: skip
  config.eval_items = 256  # held-out labeler / critic items
  config.models_only = False  # train and measure the models, skip the loops
  # The loop: configs/shapes/iterative_dpo.py (runlocal with quick). Its fields changed here
  # or on the command line (--config.loop.train.optim.lr=2e-5) override every feedback kind's
  # loop config, after the script sets the models (init_from, feedback.labeler,
  # feedback.critic, feedback.critic_prompt); the kind is `feedback`'s (not loop.feedback.kind).
  config.loop = iterative_dpo.get_config("runlocal" if arg.quick else None)
  if arg.quick:
    config.labeler.update(steps=4, records=32)
    config.critic.update(steps=4, records=16)
    config.eval_items = 8
  return config
