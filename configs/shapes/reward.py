"""Reward model on shapes-world pairs (LLaVA-RLHF's Fact-RLHF RM), from an exported SFT policy.

  python -m lmm_align.main --config=configs/shapes/reward.py --workdir=/tmp/rm_fact --config.init_from=/tmp/sft_hf
  python -m lmm_align.main --config=configs/shapes/reward.py:vanilla --workdir=/tmp/rm_vanilla --config.init_from=/tmp/sft_hf
  python -m lmm_align.main export --workdir=/tmp/rm_fact --out=/tmp/rm_fact_hf

Pairs: a truthful answer (chosen) vs the same answer with an injected hallucination. The
fact-augmented RM reads the scene's facts (caption-like sentences, shuffled per example) in
its evaluation prompt; `:vanilla` reads the same prompt without them.
"""

import pathlib

import ml_collections

from configs import common
from configs import shapes as shapes_configs

PROMPTS = pathlib.Path(__file__).resolve().parent / "prompts"


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, runlocal=False, vanilla=False, lora=0)
  config = shapes_configs.base_config()
  config.trainer = "reward"
  config.data.source = "shapes_pairs"
  config.data.aspect_mode = "crop"
  config.data.max_length = 320
  config.data.buckets = (192, 256, 320)
  config.data.shapes.num_train = 3000
  config.data.shapes.seed = 2  # scenes neither SFT nor DPO used
  config.total_steps = 150
  config.batch_size = 16
  config.log_every = 10
  config.checkpoint_every = 100
  config.optim.lr = 1e-4  # 3e-5 (LLaVA-RLHF's 2e-5 scale) barely moves the loss in 150 steps
  config.optim.warmup_steps = 10
  config.optim.weight_decay = 0.0
  config.lora.rank = arg.lora  # LLaVA-RLHF: 64 (on a 13B base)
  config.reward = ml_collections.ConfigDict(
    dict(
      fact_augmented=not arg.vanilla,
      # A short request of our own (the shapes tokenizer spells long prose in many tokens);
      # "" = the default wording; the published file for exact reproduction.
      prompt_path=str(PROMPTS / f"shapes_reward_{'vanilla' if arg.vanilla else 'fact'}.txt"),
      # "after_response": in the request after the answer (LLaVA-RLHF); "before_response":
      # under the question, where the answer's own tokens can read them.
      facts_position="after_response",
      fact_lead_in="",  # the sentence above the facts; "" = reward_data.DEFAULT_FACT_LEAD_IN
      centering_coef=1e-3,  # LLaVA-RLHF: BCE + 1e-3 |mean(r_chosen + r_rejected)|
      centering="abs_mean",
      eval_pairs=300,
    )
  )
  if arg.runlocal:
    config.total_steps = 4
    config.batch_size = 8
    config.log_every = 1
    config.checkpoint_every = 2
    config.data.shapes.num_train = 48
    config.reward.eval_pairs = 8
  return config
