"""LLaVA-RLHF's PPO (arXiv 2309.14525; RLHF/scripts/*/train_rl_model.sh) on its published data.

  python -m lmm_align.main --config=configs/llava_rlhf_ppo.py --workdir=gs://B/ppo7b \
    --config.init_from=/ckpt/llava-rlhf-7b-sft-hf --config.ppo.reward_model=/ckpt/rm13b-fact-hf \
    --config.data.path=/data/llava_ppo50k-aokvqa12k-vqa10k.json \
    --config.data.image_folder=/data/coco/train2017 --config.data.captions_path=/data/image_to_caption.json
  python -m lmm_align.main --config=configs/llava_rlhf_ppo.py:runlocal ...   # shapes-sized check

Every published quirk is a flag here, set to the published value: k1 clamped at 0 with coef
0.1; the score on the last column of the padded response, not at EOS; rewards (KL included)
x10 instead of whitening; GAE over all columns with gamma = lam = 1; advantages whitened over
the whole batch, padding included; losses averaged over every column; responses cut after the
first '?' token; a relative -8 penalty for a missing stop token; length term -10 x tokens /
response_len; correctness +2. Rollout 512 / step 256, 2 PPO epochs, lr 3e-5 cosine, 5 warmup
steps, grad norm 1.0, LoRA r=64 on policy and value.
"""

from configs import common
from configs.shapes import ppo as shapes_ppo


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, runlocal=False, vanilla=False)
  config = common.base_config()
  config.trainer = "ppo"
  config.data.source = "llava_rlhf_prompts"
  config.data.template = "vicuna_v1"
  config.model.dtype = "bfloat16"
  config.model.param_dtype = "bfloat16"
  config.model.remat_policy = "full"
  config.mesh.sizes = (1, -1, 1)
  config.lora.rank = 64
  config.lora.alpha = 16.0
  config.lora.targets = (r"language_model/.*_proj",)
  config.optim.lr = 3e-5
  config.optim.schedule = "cosine"
  config.optim.warmup_steps = 5
  config.optim.grad_clip_norm = 1.0
  config.optim.weight_decay = 0.0
  # 4 epochs of the 72k prompts in rollouts of 512.
  config.total_steps = 4 * 72_000 // 512
  config.checkpoint_every = 20
  config.ppo = shapes_ppo.ppo_config(
    fact_augmented=not arg.vanilla, query_len=128, max_new_tokens=896,
    truncate_at_question_mark=True, rollout_batch_size=512, step_batch_size=256,
    forward_batch_size=32, noptepochs=2, kl_coef=0.1, kl_estimator="k1_clamped",
    score_position="last_column", whiten_rewards=False, reward_scale=10.0, gamma=1.0, lam=1.0,
    mean_over_padding=True, clip_eps=0.2, clip_value=0.2, vf_coef=0.1, correct_coef=2.0,
    length_coef=-10.0, stop_penalty=-8.0, relative_stop_penalty=True,
    reward_buckets=(1280, 1536, 2048),
  )  # fmt: skip
  if arg.runlocal:
    local = shapes_ppo.get_config("runlocal")
    config.data, config.model, config.mesh = local.data, local.model, local.mesh
    config.lora.rank, config.lora.alpha = 8, 16.0
    config.total_steps, config.checkpoint_every = 2, 1
    for key in ("query_len", "max_new_tokens", "rollout_batch_size", "step_batch_size",
                "forward_batch_size", "reward_buckets"):  # fmt: skip
      config.ppo[key] = local.ppo[key]
    config.eval = local.eval
  return config
