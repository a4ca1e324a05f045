"""PPO on shapes-world prompts with a (fact-augmented) reward model, from an exported SFT policy.

  python -m lmm_align.main --config=configs/shapes/ppo.py --workdir=/tmp/ppo_fact \
    --config.init_from=/tmp/sft_hf --config.ppo.reward_model=/tmp/rm_fact_hf
  python -m lmm_align.main --config=configs/shapes/ppo.py:vanilla --workdir=/tmp/ppo_vanilla \
    --config.init_from=/tmp/sft_hf --config.ppo.reward_model=/tmp/rm_vanilla_hf

Textbook defaults (KL k1 at the EOS score position, whitened advantages over response tokens);
configs/llava_rlhf/ppo.py carries LLaVA-RLHF's published values and quirks. LoRA on policy and
value over shared frozen bases (lora=0 in the arg for full fine-tuning).
"""

import ml_collections

from configs import common
from configs import shapes as shapes_configs


def ppo_config(**overrides) -> ml_collections.ConfigDict:
  """PPO knobs; the defaults are the textbook choices (TRL-like), not LLaVA-RLHF's."""
  ppo = dict(
    reward_model="",  # an exported reward-model folder (lmm-align export of a reward run)
    fact_augmented=True,  # must match the reward model
    query_len=128,  # prompts are left-padded to this; longer ones are dropped (LLaVA-RLHF: 128)
    max_new_tokens=48,  # response columns (LLaVA-RLHF: 896)
    temperature=1.0,  # of the rollouts; log-probs, ratios and KL are taken under it too (TRL)
    top_p=1.0,
    top_k=0,
    truncate_at_question_mark=False,  # LLaVA-RLHF's quirk: cut after the first '?' token
    rollout_batch_size=64,
    step_batch_size=16,
    forward_batch_size=16,
    noptepochs=2,
    kl_coef=0.1,
    # > 0: the coefficient adapts so that the rollouts' mean sequence KL tracks this many nats
    # (Ziegler et al. 2019's proportional controller; TRL: target 6, horizon 10000); the
    # coefficient reached is saved with each checkpoint. 0: kl_coef stays fixed (LLaVA-RLHF).
    kl_target=0.0,
    kl_horizon=10000,
    kl_estimator="k1",  # k1, k1_clamped (LLaVA-RLHF), k2, k3
    score_position="eos",  # or "last_column" (LLaVA-RLHF)
    whiten_rewards=False,
    reward_scale=1.0,  # LLaVA-RLHF: 10 (their unwhitened branch)
    gamma=1.0,
    lam=0.95,
    mean_over_padding=False,  # LLaVA-RLHF: True (losses and whitening over every column)
    clip_eps=0.2,
    clip_value=0.2,
    vf_coef=0.1,
    value_head_zero_init=True,
    correct_coef=2.0,  # LLaVA-RLHF: 2.0 on A-D and yes/no prompts
    length_coef=0.0,  # LLaVA-RLHF: -10.0
    stop_penalty=-8.0,  # LLaVA-RLHF: -8.0 when the response has no stop token
    relative_stop_penalty=True,
    reward_bias=0.0,
    reward_buckets=(192, 256, 320),
    # Samples drawn per prompt in a rollout batch (consecutive rows share the prompt), and
    # whether each sample's score is taken relative to the mean of its prompt's other samples
    # (RLOO's baseline, ppo_math.leave_one_out_scores) before the KL penalty and GAE. Off in
    # LLaVA-RLHF and TRL's PPO: one sample per prompt, the value model is the only baseline.
    samples_per_prompt=1,
    prompt_baseline=False,
    # "model": the reward model scores the responses. "scene" (shapes prompts only): the ground
    # truth does (descriptions: -(hallucinated mentions) + scene_recall_weight * (objects
    # recalled); yes/no: +-1), an oracle upper bound; the RM then only starts the value model.
    reward_source="model",
    scene_recall_weight=0.5,
    # "segments": the score is also taken of each prefix that ends before a separator token
    # (and of the whole response), and each increment is paid at the prefix's last token, so
    # a wrong object is charged where it was named, not spread over the whole answer
    # (potential-based shaping: a row's rewards still sum to its score). "none": the score
    # at the score position only (LLaVA-RLHF, TRL). Costs one RM row per segment.
    dense_reward="none",
    segment_separators=(",", ".", ";", "and"),
    # Shapes prompts (data.source=shapes_prompts): the share of yes/no existence questions;
    # the rest are "Describe the image.".
    yes_no_fraction=0.5,
  )
  ppo.update(overrides)
  return ml_collections.ConfigDict(ppo)


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, runlocal=False, vanilla=False, lora=8)
  config = shapes_configs.base_config()
  config.trainer = "ppo"
  config.data.source = "shapes_prompts"
  config.data.aspect_mode = "crop"
  config.data.shapes.num_train = 2000
  config.data.shapes.seed = 3  # scenes no earlier stage used
  config.total_steps = 40  # iterations: rollout + noptepochs passes
  config.log_every = 1
  config.checkpoint_every = 10
  config.lora.rank = arg.lora
  config.lora.alpha = 2.0 * arg.lora if arg.lora else 16.0
  config.optim.lr = 1e-4 if arg.lora else 1e-5
  config.optim.warmup_steps = 5
  config.optim.weight_decay = 0.0
  # Shapes prompts are at most 53 tokens (9 image tokens): a 64-token query instead of 128
  # cuts the columns of every PPO forward and backward pass from 176 to 112 (48 response).
  config.ppo = ppo_config(fact_augmented=not arg.vanilla, query_len=64)
  config.eval.enabled = True
  config.eval.num_scenes = 128
  if arg.runlocal:
    config.total_steps = 2
    config.checkpoint_every = 1
    config.data.shapes.num_train = 32
    config.ppo.rollout_batch_size = 8
    config.ppo.step_batch_size = 4
    config.ppo.forward_batch_size = 8
    config.ppo.max_new_tokens = 12
    config.eval.num_scenes = 8
    config.eval.pope_per_split = 8
    config.eval.max_new_tokens = 16
  return config
